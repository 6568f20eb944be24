"""Tools/perf/attach.py: perf mode turned on and off in a running process
started without it, with the real gdb and perf."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

from support import (PATCHED, ROOT, clean_env, python, read_map_entries,
                     written_since)
from test.test_perf_profiler import read_jitdump, remove_jit_files, \
    remove_map, require_perf

ATTACH = os.path.join(ROOT, "Tools", "perf", "attach.py")

# Threads (the main one too) that call Python functions until stdin
# closes, each adding up work(0), work(1), ...; then each prints how far
# it got and its sum, which check_results() recomputes.  The main thread
# runs main_loop() from before any attach to the end.
WORKLOAD = """
import os, sys, threading, time

def leaf(i):
    return i * i

def work(k):
    total = 0
    for i in range(k % 50):
        total += leaf(i)
    return total

def run(stop, results, index):
    n = total = 0
    while not stop.is_set():
        total += work(n)
        n += 1
    results[index] = (n, total)

def main_loop(threads):
    stop = threading.Event()
    results = [None] * (threads + 1)
    workers = [threading.Thread(target=run, args=(stop, results, i))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set())).start()
    print("ready", os.getpid(), flush=True)
    run(stop, results, threads)
    for worker in workers:
        worker.join()
    for index, (n, total) in enumerate(results):
        print("result", index, n, total)
    print("active", sys.is_stack_trampoline_active())

main_loop(int(sys.argv[1]))
"""


def expected_total(n):
    """work(0) + ... + work(n - 1) of WORKLOAD, in closed form."""
    def squares(m):                 # 0 + 1 + ... + (m - 1) ** 2
        return (m - 1) * m * (2 * m - 1) // 6
    cycles, rest = divmod(n, 50)
    return cycles * sum(squares(m) for m in range(50)) + \
        sum(squares(m) for m in range(rest))


def attach(*args):
    return subprocess.run([sys.executable, ATTACH, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


class Target:
    """A process running a script under the patched interpreter, without
    perf mode; its files are removed when it is done."""

    def __init__(self, test, script, *args):
        self.test = test
        self.dir = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.dir)
        path = os.path.join(self.dir, "target.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent(script))
        # Its files in /tmp are those written since; older ones were left
        # by earlier processes with its pid.
        self.started = time.time()
        self.proc = subprocess.Popen(
            [python(PATCHED), path, *map(str, args)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env())
        test.addCleanup(self.kill)
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self.proc.kill()
            test.fail(f"no start: {line}{self.proc.communicate()[1]}")
        self.ready_line = line
        self.pid = int(line.split()[1])
        test.addCleanup(self.remove_files)

    def finish(self):
        """Close its stdin: the workload ends; its (stdout, stderr)."""
        out, err = self.proc.communicate(timeout=60)
        self.test.assertEqual(self.proc.returncode, 0, err)
        return out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def remove_files(self):
        remove_map(self.pid)
        remove_jit_files(self.pid)

    def map_names(self):
        return [entry.name.split(":")[2]
                for entry in read_map_entries(self.pid)]


def check_results(test, out, threads):
    """Every thread's sum is right."""
    results = [line.split() for line in out.splitlines()
               if line.startswith("result ")]
    test.assertEqual(len(results), threads + 1, out)
    for _, index, n, total in results:
        test.assertGreater(int(n), 0)
        test.assertEqual(int(total), expected_total(int(n)),
                         f"thread {index}")


class AttachTests(unittest.TestCase):

    def setUp(self):
        if shutil.which("gdb") is None:
            if os.environ.get("CI") == "true":
                self.fail("CI=true but gdb is not installed")
            self.skipTest("gdb is not installed")

    def assert_attached(self, proc, what):
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn(f"perf mode is {what} in PID", proc.stdout)

    def test_profile_functions_called_after_attach(self):
        require_perf(self)
        target = Target(self, WORKLOAD, 0)
        self.assertFalse(written_since(f"/tmp/perf-{target.pid}.map",
                                       target.started))
        self.assert_attached(attach(target.pid), "on (perf)")
        data = os.path.join(target.dir, "perf.data")
        rec = subprocess.run(["perf", "record", "-F", "999", "-g", "-p",
                              str(target.pid), "-o", data, "--", "sleep",
                              "1"], capture_output=True, text=True)
        self.assertEqual(rec.returncode, 0, rec.stderr)
        report = subprocess.run(
            ["perf", "report", "--stdio", "--no-children", "-g", "caller",
             "-i", data], capture_output=True, text=True, errors="replace")
        self.assertEqual(report.returncode, 0, report.stderr)
        path = os.path.join(target.dir, "target.py")
        for name in ("work", "leaf"):
            self.assertIn(f"py::{name}:{path}", report.stdout)
        # main_loop() and the main thread's run() were running when perf
        # mode came on: they have no trampoline (the howto says why).
        names = target.map_names()
        self.assertIn("work", names)
        self.assertNotIn("main_loop", names)
        self.assertNotIn("run", names)
        out, err = target.finish()
        check_results(self, out, 0)
        self.assertIn("active True", out)
        self.assertEqual(err, "")

    def test_on_and_off_50_times_with_threads(self):
        target = Target(self, WORKLOAD, 4)
        for i in range(50):
            backend = "perf_jit" if i % 5 == 4 else "perf"
            self.assert_attached(attach("--backend", backend, target.pid),
                                 f"on ({backend})")
            self.assert_attached(attach("--off", target.pid), "off")
        out, err = target.finish()
        check_results(self, out, 4)
        self.assertIn("active False", out)
        self.assertEqual(err, "")
        # Every line is whole and ours, each function named once however
        # often perf mode came back, at distinct addresses.
        entries = read_map_entries(target.pid)
        self.assertTrue(all(e.name.startswith("py::") for e in entries))
        names = [e.name for e in entries]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(len({e.addr for e in entries}), len(entries))
        self.assertIn("work", target.map_names())
        header, loads = read_jitdump(target.pid)
        self.assertEqual(header["pid"], target.pid)
        self.assertLessEqual({load["name"] for load in loads}, set(names))

    def test_off_when_not_on(self):
        target = Target(self, WORKLOAD, 0)
        self.assert_attached(attach("--off", target.pid), "off")
        out, err = target.finish()
        self.assertIn("active False", out)
        self.assertFalse(written_since(f"/tmp/perf-{target.pid}.map",
                                       target.started))
        self.assertEqual(err, "")

    def test_blocked_main_thread_does_it_when_it_returns(self):
        target = Target(self, """
            import os, sys, time
            def after_sleep():
                return sys.is_stack_trampoline_active()
            print("ready", os.getpid(), flush=True)
            sys.stdin.read()          # the main thread blocks here
            print("active", after_sleep())
            """)
        proc = attach("--timeout", "1", target.pid)
        self.assertEqual(proc.returncode, 3, proc.stdout + proc.stderr)
        self.assertIn("the request stays pending", proc.stdout)
        out, err = target.finish()
        self.assertEqual(out.split(), ["active", "True"])
        self.assertIn("after_sleep", target.map_names())
        self.assertEqual(err, "")

    def test_a_newer_request_made_meanwhile_is_reported(self):
        # attach.py asks for "on" while the main thread is blocked in a
        # read; then a thread of the process asks for "off" and wakes it;
        # the main thread carries out the newest, "off".  attach.py must
        # not say "on".
        target = Target(self, """
            import ctypes, os, sys, threading
            wakeup_read, wakeup_write = os.pipe()
            def turn_off_when_told():
                sys.stdin.readline()
                print("off request",
                      ctypes.pythonapi.PyUnstable_PerfTrampoline_Request(0),
                      flush=True)
                os.write(wakeup_write, b"x")
            threading.Thread(target=turn_off_when_told).start()
            print("ready", os.getpid(), flush=True)
            os.read(wakeup_read, 1)
            print("active", sys.is_stack_trampoline_active(), flush=True)
            sys.stdin.read()        # lives on until attach.py has asked
            """)
        tool = subprocess.Popen([sys.executable, ATTACH, "--timeout", "60",
                                 str(target.pid)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        asked = tool.stdout.readline()
        self.assertIn(f"asked PID {target.pid}", asked)
        target.proc.stdin.write("now\n")
        target.proc.stdin.flush()
        out, err = tool.communicate(timeout=60)
        self.assertEqual(tool.returncode, 1, out + err)
        self.assertIn("carried out a newer request made since", err)
        self.assertNotIn("perf mode is on", out)
        out, err = target.finish()
        self.assertEqual(out.split()[-2:], ["active", "False"])
        self.assertEqual(err, "")

    def test_request_status_in_the_process(self):
        target = Target(self, """
            import ctypes, os, sys
            api = ctypes.pythonapi
            print("ready", os.getpid(), flush=True)
            # Each is carried out when its call returns (the main thread
            # checks for signals after a call).
            first = api.PyUnstable_PerfTrampoline_Request(1)
            second = api.PyUnstable_PerfTrampoline_Request(0)
            status = api.PyUnstable_PerfTrampoline_RequestStatus
            print(second - first, status(first), status(second),
                  status(second + 1), status(0), status(-1),
                  api.PyUnstable_PerfTrampoline_Request(3),
                  sys.is_stack_trampoline_active())
            """)
        out, err = target.finish()
        # The first was carried out before the second: 2; the second is
        # done; the next not made yet.
        self.assertEqual(out.split(), ["1", "2", "1", "0", "0", "0", "-1",
                                       "False"])
        self.assertEqual(err, "")

    def test_requests_run_out_without_harm(self):
        target = Target(self, WORKLOAD, 0)
        # Numbers stop at 2**30 - 1: the next request is refused (-3)
        # rather than wrapping around into a word that means another
        # request.  gdb moves the counter there.
        last = (1 << 30) - 1
        gdb = subprocess.run(
            ["gdb", "-p", str(target.pid), "--batch",
             "-ex", f"set var 'perf_attach.c'::attach.newest = {last} * 4",
             "-ex", f"set var 'perf_attach.c'::attach.seen = {last}"],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(gdb.returncode, 0, gdb.stderr)
        proc = attach(target.pid)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("has taken all the requests it can", proc.stderr)
        out, err = target.finish()
        check_results(self, out, 0)
        self.assertIn("active False", out)

    def test_thread_id_refused(self):
        target = Target(self, """
            import os, sys, threading
            thread = threading.Thread(target=sys.stdin.read)
            thread.start()
            print("ready", os.getpid(), thread.native_id, flush=True)
            thread.join()
            """)
        tid = int(target.ready_line.split()[2])
        proc = attach(tid)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(f"{tid} is a thread of process {target.pid}",
                      proc.stderr)
        target.finish()

    def test_stopped_target_refused_then_continued(self):
        target = Target(self, WORKLOAD, 0)
        os.kill(target.pid, signal.SIGSTOP)
        try:
            proc = attach(target.pid)
        finally:
            os.kill(target.pid, signal.SIGCONT)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"PID {target.pid} is stopped", proc.stderr)
        self.assert_attached(attach(target.pid), "on (perf)")
        out, _ = target.finish()
        check_results(self, out, 0)

    def test_failure_is_one_line_on_the_targets_stderr(self):
        target = Target(self, WORKLOAD, 0)
        # A map path that is a symbolic link is refused.  (A file there
        # now is a leftover of an earlier process with its pid.)
        remove_map(target.pid)
        os.symlink("/dev/null", f"/tmp/perf-{target.pid}.map")
        proc = attach(target.pid)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("could not turn perf mode on", proc.stderr)
        out, err = target.finish()
        check_results(self, out, 0)
        self.assertIn("active False", out)
        self.assertRegex(err, r"\Apython: perf support not turned on: .*"
                              r"perf-\d+\.map.*\n\Z")

    def assert_not_patched(self, argv):
        other = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        self.addCleanup(other.wait)
        self.addCleanup(other.kill)
        time.sleep(0.2)
        proc = attach(other.pid)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"PID {other.pid} is not a patched CPython 3.11",
                      proc.stderr)

    def test_stock_python_and_other_programs_refused(self):
        stock = shutil.which("python3.11", path="/usr/bin")
        if stock is not None:
            self.assert_not_patched(
                [stock, "-c", "import time; time.sleep(30)"])
        self.assert_not_patched(["sleep", "30"])

    def test_missing_process(self):
        gone = subprocess.Popen(["true"])
        gone.wait()
        proc = attach(gone.pid)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"no process with PID {gone.pid}", proc.stderr)

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv")
                         and os.path.exists("/usr/bin/python3"),
                         "needs root to run as another user")
    def test_without_the_rights(self):
        target = Target(self, WORKLOAD, 0)
        tool = os.path.join(target.dir, "attach.py")
        shutil.copy(ATTACH, tool)       # where nobody can read it
        os.chmod(target.dir, 0o755)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", tool, str(target.pid)],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"not allowed to attach to PID {target.pid}",
                      proc.stderr)
        out, _ = target.finish()
        self.assertIn("active False", out)


if __name__ == "__main__":
    unittest.main()
