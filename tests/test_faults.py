"""Perf mode under injected faults: no arena memory, no executable memory,
an unwritable /tmp, a full disk, a short write, for the perf map and for
perf_jit's dump.

tests/faults/faultshim.c, preloaded with LD_PRELOAD, makes the chosen
system calls fail.  In every case the program must print what it prints
without perf support and exit normally; perf support turns off with one
warning at startup or mid-run, or the sys call raises OSError; and the map
holds only complete, well-formed lines."""

import errno
import os
import re
import tempfile
import time
import unittest

from support import (PATCHED, ROOT, clean_env, python, read_map_entries,
                     run, written_since)
from test.test_perf_profiler import read_jitdump

SHIM_SOURCE = os.path.join(ROOT, "tests", "faults", "faultshim.c")
FUNCTIONS = 10_000     # more trampolines than the first three arenas hold
WORK = f"""
import os, sys
print("pid", os.getpid(), file=sys.stderr)
src = "\\n".join(f"def f{{i}}(x): return x + {{i}}" for i in range({FUNCTIONS}))
exec(src)
print(sum(globals()[f"f{{i}}"](1) for i in range({FUNCTIONS})))
"""
EXPECTED = f"{sum(1 + i for i in range(FUNCTIONS))}\n"
# WORK, then perf mode turned on again with the "perf" backend, and a new
# function run.
WORK_THEN_PERF_AGAIN = WORK + """
print(sys.is_stack_trampoline_active())
sys.activate_stack_trampoline("perf")
def after(): return 1
print(after(), sys.is_stack_trampoline_active())
"""
WARNING = "python: perf support disabled: "
# A loss told where no exception can turn perf mode off: at exit, by
# os._exit() and os.exec*(), or when perf mode is turned on again.
LOST = "python: perf support lost entries: "

shim_dir = None


def setUpModule():
    global shim_dir
    shim_dir = tempfile.TemporaryDirectory()
    run(["gcc", "-shared", "-fPIC", "-O2", "-o", shim(), SHIM_SOURCE, "-ldl"])


def tearDownModule():
    shim_dir.cleanup()


def shim():
    return os.path.join(shim_dir.name, "faultshim.so")


class FaultTests(unittest.TestCase):

    def run_under_shim(self, faults, args, script):
        """Run script under the shim; return (pid, stdout, warnings) after
        checking the exit status.  Sets self.started: files of its
        processes older than that are leftovers of earlier processes."""
        self.started = time.time()
        env = clean_env(LD_PRELOAD=shim(),
                        **{k: str(v) for k, v in faults.items()})
        proc = run([python(PATCHED), *args, "-c", script], check=False,
                   env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        pid = int(re.search(r"^pid (\d+)$", proc.stderr, re.M)[1])
        warnings = [line for line in proc.stderr.splitlines()
                    if not line.startswith("pid ")]
        return pid, proc.stdout, warnings

    def run_faulty(self, faults, args=("-X", "perf"), script=WORK):
        """Run script under the shim; return (stdout, warnings, map names)
        after checking the exit status and the formats of the map and
        dump, which are removed."""
        pid, out, warnings = self.run_under_shim(faults, args, script)
        return out, warnings, self.check_files(pid)

    def check_files(self, pid):
        """Check and remove the process's map and dump (map_names(),
        jitdump_loads()); returns the map's names."""
        names = self.map_names(pid)
        self.jitdump_loads(pid)
        return names

    def map_names(self, pid):
        """The names in the process's map ([] if it has none), which is
        removed; every line must be a whole entry for a Python function."""
        if not written_since(f"/tmp/perf-{pid}.map", self.started):
            return []
        names = [entry.name for entry in read_map_entries(pid, remove=True)]
        self.assertEqual([name for name in names
                          if not name.startswith("py::")], [])
        return names

    def assert_one_warning(self, warnings, reason):
        self.assertEqual(len(warnings), 1, warnings)
        self.assertTrue(warnings[0].startswith((WARNING, LOST)), warnings)
        self.assertIn(reason, warnings[0])

    def test_no_memory_for_the_first_arena(self):
        out, warnings, lines = self.run_faulty({"FAULT_ARENA_SIZE": 16384})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "Cannot allocate memory")
        self.assertEqual(lines, [])

    def test_no_memory_for_a_later_arena(self):
        # Perf mode stops where the third arena (16 + 32 + 64 KiB) is full.
        out, warnings, lines = self.run_faulty({"FAULT_ARENA_SIZE": 131072})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "Cannot allocate memory")
        self.assertGreater(len(lines), 1000)
        self.assertLess(len(lines), FUNCTIONS)

    def test_no_address_space_for_arenas(self):
        out, warnings, lines = self.run_faulty({"FAULT_RESERVE": 1})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "Cannot allocate memory")
        self.assertEqual(lines, [])

    def test_no_executable_memory(self):
        out, warnings, lines = self.run_faulty({"FAULT_MPROTECT_EXEC": 1})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "Permission denied")
        self.assertEqual(lines, [])

    def test_tmp_not_writable(self):
        for err in (errno.EACCES, errno.EROFS, errno.ENOSPC):
            with self.subTest(errno=errno.errorcode[err]):
                out, warnings, lines = self.run_faulty(
                    {"FAULT_MAP_OPEN": err})
                self.assertEqual(out, EXPECTED)
                self.assert_one_warning(warnings, os.strerror(err))
                self.assertEqual(lines, [])

    def test_disk_full_mid_run(self):
        out, warnings, lines = self.run_faulty(
            {"FAULT_MAP_WRITE": errno.ENOSPC, "FAULT_AFTER": 3})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "No space left on device")
        self.assertLess(len(lines), FUNCTIONS)

    def test_short_write_leaves_no_partial_line(self):
        # The shim writes half of a buffer, then the disk is full.
        out, warnings, lines = self.run_faulty(
            {"FAULT_MAP_WRITE": 0, "FAULT_AFTER": 2})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "No space left on device")
        self.assertLess(len(lines), FUNCTIONS)

    def test_disk_full_after_the_last_trampoline(self):
        # The failed write is the helper thread's; nothing runs after it
        # to report it but finalization.
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "def only(): return 7\n"
                  "print(only())\n")
        out, warnings, lines = self.run_faulty(
            {"FAULT_MAP_WRITE": errno.ENOSPC}, script=script)
        self.assertEqual(out, "7\n")
        self.assert_one_warning(warnings, "No space left on device")
        self.assertEqual(lines, [])

    def run_faulty_jitdump(self, faults):
        """run_faulty() under perf_jit with the faults aimed at its dump;
        returns (stdout, warnings, code loads), the loads None if there is
        no dump, after checking that it holds whole records only."""
        pid, out, warnings = self.run_under_shim(
            {"FAULT_FILE": "jitdump", **faults}, ("-X", "perf_jit"), WORK)
        self.map_names(pid)     # checks and removes the map
        return out, warnings, self.jitdump_loads(pid)

    def jitdump_loads(self, pid):
        """The code loads of the process's dump, None if it has none; the
        dump must hold whole records only, and is removed."""
        path = f"/tmp/jit-{pid}.dump"
        if not written_since(path, self.started):
            return None
        if os.path.getsize(path) == 0:     # its header could not be written
            os.unlink(path)
            return []
        try:
            return read_jitdump(pid)[1]
        finally:
            os.unlink(path)

    def test_jitdump_disk_full_mid_run(self):
        # The header and the first buffer of records are written; then a
        # write fails, or (0) writes half of its buffer first.
        for err in (errno.ENOSPC, 0):
            with self.subTest(errno=err):
                out, warnings, loads = self.run_faulty_jitdump(
                    {"FAULT_MAP_WRITE": err, "FAULT_AFTER": 2})
                self.assertEqual(out, EXPECTED)
                self.assert_one_warning(warnings, "No space left on device")
                self.assertIn("/tmp/jit-", warnings[0])
                self.assertGreater(len(loads), 0)
                self.assertLess(len(loads), FUNCTIONS)

    def test_jitdump_cannot_be_created(self):
        out, warnings, loads = self.run_faulty_jitdump(
            {"FAULT_MAP_OPEN": errno.EACCES})
        self.assertEqual(out, EXPECTED)
        self.assert_one_warning(warnings, "Permission denied")
        self.assertIn("/tmp/jit-", warnings[0])
        self.assertIsNone(loads)

    def assert_warnings_name(self, warnings, paths):
        """One warning per lost file, in order: paths are their prefixes."""
        self.assertEqual(len(warnings), len(paths), warnings)
        for warning, path in zip(warnings, paths):
            self.assertTrue(warning.startswith("python: perf support"),
                            warnings)
            self.assertIn("No space left on device", warning)
            self.assertIn(path, warning)

    def test_both_files_fail_each_reported(self):
        # The map's and the dump's writes both fail; the map's failure turns
        # perf mode off with a warning, the dump's is told at exit.
        out, warnings, _ = self.run_faulty(
            {"FAULT_FILE": "both", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 3}, ("-X", "perf_jit"),
            WORK + "print(sys.is_stack_trampoline_active())\n")
        self.assertEqual(out, f"{EXPECTED}False\n")
        self.assert_warnings_name(warnings, ["/tmp/perf-", "/tmp/jit-"])

    def test_turned_on_again_after_losses(self):
        # The first file to fail turns perf mode off; turning it on again
        # tells the other file's loss, and the "perf" backend, which writes
        # no dump, is not stopped by it: it runs until the map fails again
        # (at exit), a new loss.  Which file fails first depends on where
        # the writes of a batch fell.
        out, warnings, _ = self.run_faulty(
            {"FAULT_FILE": "both", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 3}, ("-X", "perf_jit"), WORK_THEN_PERF_AGAIN)
        self.assertEqual(out, f"{EXPECTED}False\n1 True\n")
        first = "/tmp/perf-" if "/tmp/perf-" in warnings[0] else "/tmp/jit-"
        other = "/tmp/jit-" if first == "/tmp/perf-" else "/tmp/perf-"
        self.assert_warnings_name(warnings, [first, other, "/tmp/perf-"])
        self.assertTrue(warnings[1].startswith(LOST), warnings)

    def test_dump_loss_reported_once(self):
        # Closing the failed dump writes what is pending, which fails too:
        # the same loss, told once; "perf" then runs without the dump.
        out, warnings, names = self.run_faulty(
            {"FAULT_FILE": "jitdump", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 3}, ("-X", "perf_jit"), WORK_THEN_PERF_AGAIN)
        self.assertEqual(out, f"{EXPECTED}False\n1 True\n")
        self.assert_warnings_name(warnings, ["/tmp/jit-"])
        self.assertTrue(any(name.startswith("py::after:")
                            for name in names))

    def test_forked_child_leaves_the_parents_loss_to_it(self):
        # The parent's dump write failed before the fork: the parent tells
        # it, the child (which never wrote that file) does not.
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "def f(): return 1\n"
                  "f()\n"
                  "child = os.fork()\n"
                  "if child == 0:\n"
                  "    sys.exit(0)\n"
                  "print(child, os.waitpid(child, 0)[1])\n")
        pid, out, warnings = self.run_under_shim(
            {"FAULT_FILE": "jitdump", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 1}, ("-X", "perf_jit"), script)
        child, status = map(int, out.split())
        for process in (pid, child):
            self.check_files(process)
        self.assertEqual(status, 0)
        self.assert_warnings_name(warnings, [f"/tmp/jit-{pid}.dump"])

    def test_both_files_fail_after_the_last_trampoline(self):
        # Only finalization is left to report them: one warning per file.
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "def only(): return 7\n"
                  "print(only())\n")
        out, warnings, _ = self.run_faulty(
            {"FAULT_FILE": "both", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 1}, ("-X", "perf_jit"), script)
        self.assertEqual(out, "7\n")
        self.assert_warnings_name(warnings, ["/tmp/perf-", "/tmp/jit-"])

    def test_switching_away_from_a_failed_dump(self):
        # The dump's records still pending when perf_jit is switched to
        # perf fail as the dump closes: told then, and perf goes on.
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "sys.activate_stack_trampoline('perf_jit')\n"
                  "def before(): return 1\n"
                  "before()\n"
                  "sys.activate_stack_trampoline('perf')\n"
                  "def after(): return 2\n"
                  "print(after(), sys.is_stack_trampoline_active())\n")
        out, warnings, names = self.run_faulty(
            {"FAULT_FILE": "jitdump", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 1}, (), script)
        self.assertEqual(out, "2 True\n")
        self.assert_warnings_name(warnings, ["/tmp/jit-"])
        self.assertTrue(any(name.startswith("py::after:") for name in names))

    def test_compile_code_failure_stops_perf_mode(self):
        # PyUnstable_PerfTrampoline_CompileCode reports the loss with its
        # exception, and perf mode stops as after a failure in the hook:
        # no later loss goes untold with perf mode on.
        # Perf mode is turned on just before: the flusher, 10 ms later,
        # must not be first to find the failure (a slow build's start-up
        # and ctypes' import took that long).
        script = ("import ctypes, os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "compile_code = ctypes.pythonapi."
                  "PyUnstable_PerfTrampoline_CompileCode\n"
                  "compile_code.argtypes = [ctypes.py_object]\n"
                  "write_out = ctypes.pythonapi.PyUnstable_PerfMapState_Fini\n"
                  "ns = {}\n"
                  "exec('def fresh(): return 7\\ndef before(): return 1',"
                  " ns)\n"
                  "sys.activate_stack_trampoline('perf')\n"
                  "ns['before']()\n"
                  "write_out()  # writes out the line so far: that fails\n"
                  "try:\n"
                  "    compile_code(ns['fresh'].__code__)\n"
                  "except OSError as exc:\n"
                  "    print('OSError', exc.errno)\n"
                  "print(ns['fresh'](), sys.is_stack_trampoline_active())\n")
        out, warnings, _ = self.run_faulty(
            {"FAULT_MAP_WRITE": errno.ENOSPC, "FAULT_AFTER": 0}, (), script)
        self.assertEqual(out, f"OSError {errno.ENOSPC}\n7 False\n")
        self.assertEqual(warnings, [])

    def test_os_exit_reports_the_loss(self):
        # Nothing runs after os._exit() to report a failed write of the
        # lines it writes out: it reports it itself.
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "def only(): return 7\n"
                  "print(only(), flush=True)\n"
                  "os._exit(0)\n")
        out, warnings, lines = self.run_faulty(
            {"FAULT_MAP_WRITE": errno.ENOSPC}, script=script)
        self.assertEqual(out, "7\n")
        self.assert_one_warning(warnings, "No space left on device")
        self.assertEqual(lines, [])

    def test_forked_child_reports_its_own_loss_once(self):
        # The child's dump cannot be written: its first trampoline turns
        # perf mode off with a warning, and that loss is not told again at
        # its exit.
        script = ("import os, sys, time\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "sys.activate_stack_trampoline('perf_jit')\n"
                  "def f(): return 1\n"
                  "f()\n"
                  "sys.deactivate_stack_trampoline()\n"
                  "sys.activate_stack_trampoline('perf_jit')\n"
                  "child = os.fork()\n"
                  "if child == 0:\n"
                  "    exec('def g(): return 2\\ng()')\n"
                  "    time.sleep(0.05)\n"
                  "    exec('def h(): return 3\\nh()')\n"
                  "    sys.exit(0)\n"
                  "print(child, os.waitpid(child, 0)[1])\n")
        pid, out, warnings = self.run_under_shim(
            {"FAULT_FILE": "jitdump", "FAULT_MAP_WRITE": errno.ENOSPC,
             "FAULT_AFTER": 2}, (), script)
        child, status = map(int, out.split())
        for process in (pid, child):
            self.check_files(process)
        self.assertEqual(status, 0)
        self.assert_warnings_name(warnings, [f"/tmp/jit-{child}.dump"])

    def test_failed_exec_reports_and_perf_mode_stops(self):
        # os.execv() writes the lines out and tells their loss; when it
        # fails, the next trampoline turns perf mode off.
        # Perf mode is turned on just before, so that the flusher is not
        # first to find the failure (see the CompileCode test).
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "def f(): return 1\n"
                  "sys.activate_stack_trampoline('perf')\n"
                  "f()\n"
                  "try:\n"
                  "    os.execv('/nonexistent', ['nonexistent'])\n"
                  "except OSError as exc:\n"
                  "    print('OSError', exc.errno)\n"
                  "def g(): return 2\n"
                  "print(g(), sys.is_stack_trampoline_active())\n")
        out, warnings, lines = self.run_faulty(
            {"FAULT_MAP_WRITE": errno.ENOSPC}, args=(), script=script)
        self.assertEqual(out, f"OSError {errno.ENOENT}\n2 False\n")
        self.assert_warnings_name(warnings, ["/tmp/perf-", "/tmp/perf-"])
        self.assertEqual(lines, [])

    def test_every_interpreter_stops_after_a_loss(self):
        # The map is the process's: once its loss is told, a
        # sub-interpreter's perf mode stops at its next trampoline too.
        script = ("import ctypes, os, sys\n"
                  "import _xxsubinterpreters as interpreters\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "sub = interpreters.create()\n"
                  "def f(): return 1\n"
                  "f()\n"
                  "ctypes.pythonapi.PyUnstable_PerfMapState_Fini()  "
                  "# writes the lines out: that fails\n"
                  "def g(): return 2\n"
                  "g()\n"
                  "print(sys.is_stack_trampoline_active(), flush=True)\n"
                  "interpreters.run_string(sub, 'import sys\\n"
                  "def h(): return 3\\n"
                  "h()\\n"
                  "print(sys.is_stack_trampoline_active(), flush=True)')\n")
        out, warnings, lines = self.run_faulty(
            {"FAULT_MAP_WRITE": errno.ENOSPC}, script=script)
        self.assertEqual(out, "False\nFalse\n")
        self.assert_warnings_name(warnings, ["/tmp/perf-", "/tmp/perf-"])

    def test_losses_before_turning_on_again_are_told_then(self):
        # Lines still buffered when perf mode is turned on again are
        # written then: their loss is the time before's, and the new time
        # goes on until a failure of its own (here, at exit).
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "backend = sys.argv[1]\n"
                  "sys.activate_stack_trampoline(backend)\n"
                  "def f(): return 1\n"
                  "f()\n"
                  "sys.activate_stack_trampoline(backend)\n"
                  "def g(): return 2\n"
                  "print(g(), sys.is_stack_trampoline_active())\n")
        for backend in ("perf", "perf_jit"):
            with self.subTest(backend=backend):
                out, warnings, _ = self.run_faulty(
                    {"FAULT_MAP_WRITE": errno.ENOSPC}, (),
                    script.replace("sys.argv[1]", repr(backend)))
                self.assertEqual(out, "2 True\n")
                self.assert_warnings_name(warnings,
                                          ["/tmp/perf-", "/tmp/perf-"])
                self.assertTrue(warnings[0].startswith(LOST), warnings)
                self.assertTrue(warnings[1].startswith(LOST), warnings)

    def test_no_thread_for_the_flusher(self):
        # Without the helper thread every line is written at once: all of
        # them are in the map before the process exits, with no warning.
        script = WORK + """
with open(f"/tmp/perf-{os.getpid()}.map", "rb") as f:
    print(sum(b" py::f" in line for line in f))
"""
        for backend in ("perf", "perf_jit"):
            with self.subTest(backend=backend):
                pid, out, warnings = self.run_under_shim(
                    {"FAULT_THREAD": errno.EAGAIN}, ("-X", backend), script)
                lines = self.map_names(pid)
                self.assertEqual(out, f"{EXPECTED}{FUNCTIONS}\n")
                self.assertEqual(warnings, [])
                self.assertEqual(sum(name.startswith("py::f")
                                     for name in lines), FUNCTIONS)
                if backend == "perf_jit":
                    loads = self.jitdump_loads(pid)
                    self.assertEqual(sum(load["name"].startswith("py::f")
                                         for load in loads), FUNCTIONS)

    def test_sys_api_raises(self):
        script = ("import os, sys\n"
                  "print('pid', os.getpid(), file=sys.stderr)\n"
                  "try:\n"
                  "    sys.activate_stack_trampoline('perf')\n"
                  "except OSError as exc:\n"
                  "    print('OSError', exc.errno)\n"
                  "print(sys.is_stack_trampoline_active())\n")
        cases = [({"FAULT_ARENA_SIZE": 16384}, errno.ENOMEM),
                 ({"FAULT_RESERVE": 1}, errno.ENOMEM),
                 ({"FAULT_MPROTECT_EXEC": 1}, errno.EACCES),
                 ({"FAULT_MAP_OPEN": errno.EACCES}, errno.EACCES)]
        for faults, err in cases:
            with self.subTest(faults=faults):
                out, warnings, _ = self.run_faulty(faults, args=(),
                                                   script=script)
                self.assertEqual(out, f"OSError {err}\nFalse\n")
                self.assertEqual(warnings, [])


if __name__ == "__main__":
    unittest.main()
