#!/usr/bin/env python3
"""Turn perf mode on or off in a running patched CPython 3.11.

    attach.py [--backend perf|perf_jit] [--off] [--timeout SECONDS] PID

A service started without -X perf is profiled without a restart:

    attach.py 1234                       # perf mode on, as with -X perf
    perf record -F 999 -g -p 1234 -- sleep 10
    attach.py --off 1234

gdb (Debian's package `gdb`) attaches to the process, calls
PyUnstable_PerfTrampoline_Request() in it and detaches.  That function
only records the request (no lock, no allocation, no Python code), so
stopping the process wherever it is cannot deadlock it.  The process's
main thread carries the request out the next time it checks for signals,
that is as soon as it runs Python code; a main thread blocked in a C call,
a lock or a sleep does it when that returns.  The command then asks, with
gdb again, until the request was carried out or --timeout seconds passed.
Each gdb call stops the process for 25-30 ms (gdb reads only the
symbol tables, and runs the call on one thread with the others stopped).
Stopping a process interrupts a system call it is blocked in: Python's
own calls retry it (PEP 475), but C code that does not retry on EINTR
sees that error, once per gdb call.

Before any of that, the executable files the process maps are searched
for the function's name: a process that is not a patched CPython 3.11 is
told apart without being stopped at all.

Python functions that were already running when perf mode came on (the
main loop, say) keep running without a trampoline until they return, so
perf shows their callees under an unnamed _PyEval_EvalFrameDefault
(Doc/howto/perf_profiling.rst, "Attaching to a running process").  Only
the main interpreter is switched, not sub-interpreters.

Rights: those of a debugger, as for gdb -p: the same user as the process
(and not a setuid program) or CAP_SYS_PTRACE; where the Yama module's
kernel.yama.ptrace_scope is 1, only CAP_SYS_PTRACE (or the process's
parent), 2 needs CAP_SYS_PTRACE, 3 forbids attaching.

Exit status: 0 when the process did as asked, 1 when it could not (or is
not a patched CPython 3.11, or cannot be attached to, or carried out a
newer request made meanwhile by someone else), 2 for bad
arguments, 3 when the request was made but not carried out within
--timeout (it stays pending and takes effect later).  Standard library
only, Python >= 3.8.
"""

import argparse
import itertools
import mmap
import os
import re
import shutil
import subprocess
import sys
import time

PROG = "attach.py"
REQUEST = "PyUnstable_PerfTrampoline_Request"
STATUS = "PyUnstable_PerfTrampoline_RequestStatus"
BACKENDS = {"off": 0, "perf": 1, "perf_jit": 2}
# What Request() returns when the interpreter is not running (yet), and
# when the process has used up its request numbers.
NOT_RUNNING = -2
NO_MORE_REQUESTS = -3
# What RequestStatus() returns when a newer request was carried out after
# (or instead of) the one asked about.
REPLACED = 2
RESULT_MARK = "cperf-attach-result"
GDB_TIMEOUT = 60
# Attaching is retried while another tracer has the process.
ATTACH_ATTEMPTS = 5
ATTACH_RETRY_DELAY = 0.2
# Waits between asking whether the request was carried out.
POLL_DELAYS = (0.05, 0.2, 0.5, 1.0)
PENDING_EXIT = 3


class Failure(Exception):
    """Something the user must hear about; the exit status becomes 1."""


def read_status(pid):
    """/proc/PID/status as a dict.  (perf_files.py parses it the same way;
    each tool stays one file that can be copied to a host alone.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise Failure(f"no process with PID {pid}") from None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def program_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "?"


def check_state(pid):
    """Refuse a process that cannot carry a request out, or that gdb must
    not be let loose on."""
    if pid == os.getpid():
        raise Failure("attach.py cannot attach to itself")
    status = read_status(pid)
    if status.get("Tgid", str(pid)) != str(pid):
        raise Failure(f"{pid} is a thread of process {status['Tgid']}: "
                      f"give the process's PID")
    state = status.get("State", "")
    if state.startswith("Z") or state.startswith("X"):
        raise Failure(f"PID {pid} has exited ({state})")
    if state.startswith("T") or state.startswith("t"):
        # A call made in a stopped process is interrupted by the stop
        # itself, and the process could not carry the request out anyway.
        raise Failure(f"PID {pid} is stopped (state {state[:1]}); continue "
                      f"it first (kill -CONT {pid})")
    try:
        os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise Failure(f"PID {pid} is a kernel thread, not a program") \
            from None
    except OSError:
        pass                        # not ours to read: gdb will say
    return status


def executable_files(pid):
    """The files the process maps executable, as paths readable here."""
    paths = {f"/proc/{pid}/exe"}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6 and "x" in fields[1] \
                        and fields[5].startswith("/"):
                    # Through the process's root: a container's files.
                    path = fields[5].rstrip("\n")
                    if not path.endswith(" (deleted)"):
                        paths.add(f"/proc/{pid}/root{path}")
    except OSError:
        pass
    return paths


def file_has(path, needle):
    """Does the file hold the bytes needle?  None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return False
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return data.find(needle) >= 0
    except (OSError, ValueError):
        return None


def find_request_function(pid):
    """The file that holds our function (its name is in the symbol tables
    of whatever exports it), or raise Failure if none does.  Files that
    cannot be read are left to gdb to judge."""
    unreadable = None
    for path in sorted(executable_files(pid)):
        found = file_has(path, REQUEST.encode())
        if found:
            return path
        if found is None:
            unreadable = path
    if unreadable is not None:
        return None
    raise not_patched(pid)


def not_patched(pid):
    return Failure(f"PID {pid} is not a patched CPython 3.11: its program "
                   f"({program_of(pid)}) and the libraries it loaded have "
                   f"no {REQUEST}() (stock CPython, or not Python at all)")


def ptrace_advice():
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = None
    advice = ("attaching needs a debugger's rights: the same user as the "
              "process, or root (CAP_SYS_PTRACE)")
    if scope in ("1", "2"):
        advice += (f"; kernel.yama.ptrace_scope is {scope}, so only "
                   f"CAP_SYS_PTRACE" + (" or its parent" if scope == "1"
                                        else ""))
    elif scope == "3":
        advice += "; kernel.yama.ptrace_scope is 3: no process may attach"
    return advice


def gdb_command(pid, library, function, argument):
    """gdb's command line to call function(argument) in PID and print the
    result after RESULT_MARK."""
    commands = [
        "-iex", "set debuginfod enabled off",   # never download anything
        "-iex", "set auto-load off",            # run nothing of the target's
        "-iex", "set auto-solib-add off",       # read only the symbols needed
        # A signal that stops the call restores the thread as it was.
        "-iex", "set unwindonsignal on",
        # The executable's symbols before the process is stopped.
        "-ex", f"file /proc/{pid}/exe",
        "-ex", f"attach {pid}",
    ]
    if library is not None:
        commands += ["-ex", f"sharedlibrary /{re.escape(library)}$"]
    commands += [
        # Only the calling thread runs: the function never waits for one.
        "-ex", "set scheduler-locking on",
        "-ex", f'printf "{RESULT_MARK} %d\\n", '
               f"((int (*)(int)){function})({argument})",
    ]
    # --readnever: the ELF symbol tables are all it needs, and reading
    # debugging information would keep the process stopped for longer.
    return ["gdb", "--batch", "--nx", "--quiet", "--readnever", *commands]


def run_gdb(command):
    """gdb's output.  If it hangs, SIGTERM lets it detach first."""
    with subprocess.Popen(command, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as gdb:
        try:
            return gdb.communicate(timeout=GDB_TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            gdb.terminate()
            gdb.communicate()
            raise Failure(f"gdb did not finish within {GDB_TIMEOUT} s") \
                from None


def gdb_call(pid, library, function, argument):
    """Call function(argument) in PID with gdb; its int result."""
    command = gdb_command(pid, library, function, argument)
    for _ in range(ATTACH_ATTEMPTS):
        output = run_gdb(command)
        match = re.search(rf"^{RESULT_MARK} (-?\d+)$", output, re.M)
        if match:
            return int(match.group(1))
        # Refused: maybe only while another tracer (a second attach.py)
        # has the process.
        if "ptrace: Operation not permitted" not in output:
            break
        time.sleep(ATTACH_RETRY_DELAY)
    else:
        tracer = read_status(pid).get("TracerPid", "0")
        if tracer != "0":
            raise Failure(f"PID {pid} is being traced by PID {tracer} "
                          f"({program_of(tracer)}); only one tracer at a "
                          f"time")
        raise Failure(f"not allowed to attach to PID {pid}: "
                      f"{ptrace_advice()}")
    if "ptrace: No such process" in output:
        raise Failure(f"no process with PID {pid}")
    if re.search(rf'No symbol "{function}" in current context', output):
        raise not_patched(pid)
    if "signaled while in a function called from GDB" in output:
        raise Failure(f"the call in PID {pid} was interrupted by a signal "
                      f"(was it stopped meanwhile?); its request may or "
                      f"may not have been made: run attach.py again")
    last = "\n".join(output.strip().splitlines()[-5:])
    raise Failure(f"gdb could not call {function}() in PID {pid}:\n{last}")


def wait_for(pid, library, number, timeout):
    """1 when request `number` was carried out, -1 if it failed, 2 if a
    newer request was carried out since, 0 if none within timeout
    seconds."""
    deadline = time.monotonic() + timeout
    for attempt in itertools.count():
        delay = POLL_DELAYS[min(attempt, len(POLL_DELAYS) - 1)]
        if time.monotonic() + delay > deadline:
            return 0
        time.sleep(delay)
        try:
            state = read_status(pid).get("State", "X")
        except Failure:
            state = "X"
        if state[:1] in "ZX":
            raise Failure(f"PID {pid} exited before telling whether it did")
        if state[:1] in "Tt":
            continue            # stopped meanwhile: it cannot do it now
        status = gdb_call(pid, library, STATUS, number)
        if status != 0:
            return status


def map_path(pid, status):
    """Where the process's perf map is, as seen here."""
    ns_pids = status.get("NSpid", str(pid)).split()
    if len(ns_pids) > 1:
        return (f"/proc/{pid}/root/tmp/perf-{ns_pids[-1]}.map (in its "
                f"container; perf_files.py export copies it out)")
    return f"/tmp/perf-{pid}.map"


def attach(pid, backend, timeout):
    status = check_state(pid)
    program = program_of(pid)
    if shutil.which("gdb") is None:
        raise Failure("gdb is needed (Debian: apt-get install gdb)")
    where = find_request_function(pid)
    library = None
    if where is not None and where != f"/proc/{pid}/exe":
        library = os.path.basename(where)
    number = gdb_call(pid, library, REQUEST, BACKENDS[backend])
    if number == NOT_RUNNING:
        raise Failure(f"PID {pid} is starting up or shutting down: its "
                      f"interpreter takes no requests now")
    if number == NO_MORE_REQUESTS:
        raise Failure(f"PID {pid} has taken all the requests it can "
                      f"(2**30 - 1); use sys.activate_stack_trampoline() in it")
    if number <= 0:
        raise Failure(f"PID {pid} refused the request ({number})")
    what = "off" if backend == "off" else f"on ({backend})"
    print(f"{PROG}: asked PID {pid} ({program}) to turn perf mode "
          f"{what}; its main thread does it when it next runs Python code")
    result = wait_for(pid, library, number, timeout)
    if result == 0:
        print(f"{PROG}: PID {pid} has not done it within {timeout:g} s: "
              f"its main thread has run no Python code of the main "
              f"interpreter since (blocked in a C call, a lock or a "
              f"sleep? running a sub-interpreter?); the request stays "
              f"pending and takes effect when it does.  A main thread "
              f"that has finished the program and waits for other "
              f"threads to end does it only at exit")
        return PENDING_EXIT
    if result == REPLACED:
        raise Failure(f"PID {pid} carried out a newer request made since "
                      f"(by another attach.py?); perf mode is as that one "
                      f"asked")
    if result < 0:
        raise Failure(f"PID {pid} could not turn perf mode {what}; its "
                      f"standard error says why (a line starting "
                      f"'python: perf support not turned')")
    print(f"{PROG}: perf mode is {what} in PID {pid}", end="")
    if backend == "off":
        print()
    else:
        print(f"; its map: {map_path(pid, status)}\n"
              f"{PROG}: functions that were running already (its main "
              f"loop, say) are named only from their next call on")
    return 0


def positive_number(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive number: {text}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int, metavar="PID")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--backend", choices=("perf", "perf_jit"),
                      default="perf",
                      help="as -X perf or -X perf_jit (default: perf)")
    what.add_argument("--off", action="store_true",
                      help="turn perf mode off instead")
    parser.add_argument("--timeout", type=positive_number, default=10.0,
                        metavar="SECONDS",
                        help="how long to wait for the process to do it "
                             "(default: 10)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return attach(args.pid, "off" if args.off else args.backend,
                      args.timeout)
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
