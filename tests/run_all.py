"""The test command behind `make test`; run with build/python.

Runs, and counts test cases of:
  1. the driver's own tests (tests/test_*.py: patches, dist, ABI, builds);
  2. Lib/test/test_perf_profiler.py and the CPython regression tests the
     patch touches, as they are, with PYTHONPERFSUPPORT=1 and with
     PYTHON_PERF_JIT_SUPPORT=1;
  3. the memory-safety set on the debug build (build/python-debug).
With --memory PYTHON, only the memory-safety set, on PYTHON (make
check-asan runs it on the sanitizer build).
Ends with the line "N passed, N failed, N skipped"; exits non-zero when
anything failed."""

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

from support import ROOT, clean_env

sys.path.insert(0, os.path.join(ROOT, "Tools", "perf"))
from perf_files import kind_of, pid_alive  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))

CPYTHON_TESTS = [
    "test_perf_profiler", "test_sys", "test_cmd_line", "test_embed",
    "test_capi", "test_os", "test_threading", "test_generators",
    "test_coroutines", "test_sys_settrace", "test_sysconfig",
]

# The memory-safety set: where perf mode's frames meet generators,
# coroutines, the cyclic GC and tracing.  Run with perf on and a GC that
# collects every few allocations, on a build that catches what a release
# build hides (a running generator's popped stack slots seen by the GC
# crashed only there, and in users' asyncio programs).
MEMORY_TESTS = [
    "test_perf_profiler", "test_asyncio", "test_generators",
    "test_coroutines", "test_gc", "test_contextlib_async",
    "test_sys_settrace", "test_threading",
]
MEMORY_DRIVER_TESTS = ["test_stress", "test_faults", "test_attach"]
AGGRESSIVE_GC = "import gc\ngc.set_threshold(20, 5, 5)\n"
# Sanitizer reports fail the run: AddressSanitizer stops the process by
# default, UndefinedBehaviorSanitizer only when told.  (The fault shim is
# preloaded before the sanitizer's runtime.)
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:verify_asan_link_order=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


class Tally:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0

    def add(self, name, passed, failed, skipped):
        self.passed += passed
        self.failed += failed
        self.skipped += skipped
        print(f"== {name}: {passed} passed, {failed} failed, "
              f"{skipped} skipped", flush=True)


def run_driver_tests(tally):
    sys.path.insert(0, TESTS)
    suite = unittest.defaultTestLoader.discover(TESTS, pattern="test_*.py")
    count_unittest(tally, "driver tests", suite)


def count_unittest(tally, label, suite):
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(
        suite)
    failed = len(result.failures) + len(result.errors) + \
        len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    tally.add(label, result.testsRun - failed - skipped, failed, skipped)


def count_junit(path):
    passed = failed = skipped = 0
    for case in ET.parse(path).iter("testcase"):
        if case.find("failure") is not None or \
                case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


def run_cpython_tests(tally, label, extra_env, python=sys.executable,
                      tests=CPYTHON_TESTS):
    # The caller's PYTHON* variables (PYTHONUNBUFFERED, ...) change what
    # CPython's own tests expect; run them in a clean environment.
    env = clean_env(**extra_env)
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        # --timeout: a hang fails its test file instead of the whole run.
        cmd = [python, "-m", "test", "-j2", "--timeout", "900",
               "--junit-xml", junit, *tests]
        print(f"== {label}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=env)
        if os.path.exists(junit):
            passed, failed, skipped = count_junit(junit)
        else:
            passed = failed = skipped = 0
    if proc.returncode != 0 and failed == 0:
        failed = 1  # the run itself failed (crash, timeout, env change)
    tally.add(label, passed, failed, skipped)


def perf_files():
    """Maps and jitdumps, with when each was last written: every process
    started with perf support on leaves its own."""
    stamps = {}
    for path in glob.glob("/tmp/perf-*.map") + glob.glob("/tmp/jit-*.dump"):
        try:
            stamps[path] = os.stat(path, follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:
            pass
    return stamps


def written_during(before, after):
    """The files of after that are new or were written since before: a
    process of the run may have reused a pid whose leftover was there, and
    emptied and filled that file."""
    return [path for path, stamp in after.items()
            if before.get(path) != stamp]


def remove_files_of_exited(paths):
    """Remove the maps and jitdumps that the run's processes left.  A
    process that still lives keeps its file: it is not one of ours (ours
    have all been waited for), perhaps a service someone is profiling."""
    for path in paths:
        _, pid = kind_of(os.path.basename(path))
        if pid_alive(pid):
            continue
        try:
            os.unlink(path)
        except OSError:
            pass


def let_tests_see_sigint():
    """A command started in the background by a shell without job control
    (`cmd &` in a script) has SIGINT ignored, and its children inherit
    that: Python then installs no KeyboardInterrupt handler, and the
    regression tests that send themselves SIGINT (test_generators,
    test_threading) fail.  A handler of our own is reset to the default
    in the children."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_memory_tests(tally, python):
    """The memory-safety set on python, with each backend and an
    aggressive GC (a sitecustomize only these runs see), then the stress,
    fault and attach tests of the driver on the same build."""
    python = os.path.abspath(python)
    name = os.path.basename(python)
    with tempfile.TemporaryDirectory() as site:
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(AGGRESSIVE_GC)
        for variable in ("PYTHONPERFSUPPORT", "PYTHON_PERF_JIT_SUPPORT"):
            run_cpython_tests(tally, f"{name}: memory set with {variable}=1",
                              {variable: "1", "PYTHONPATH": site,
                               **SANITIZER_ENV},
                              python=python, tests=MEMORY_TESTS)
    os.environ.update(SANITIZER_ENV)
    sys.path.insert(0, TESTS)
    import support
    release_obj = support.PATCHED["obj"]
    support.PATCHED["obj"] = os.path.dirname(os.path.realpath(python))
    try:
        suite = unittest.defaultTestLoader.loadTestsFromNames(
            MEMORY_DRIVER_TESTS)
        count_unittest(tally, f"{name}: stress, fault and attach tests", suite)
    finally:
        support.PATCHED["obj"] = release_obj


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", metavar="PYTHON",
                        help="only the memory-safety set, on PYTHON")
    args = parser.parse_args()
    let_tests_see_sigint()
    tally = Tally()
    files_before = perf_files()
    try:
        if args.memory:
            run_memory_tests(tally, args.memory)
        else:
            run_driver_tests(tally)
            run_cpython_tests(tally, "CPython tests", {})
            run_cpython_tests(tally,
                              "CPython tests with PYTHONPERFSUPPORT=1",
                              {"PYTHONPERFSUPPORT": "1"})
            run_cpython_tests(tally,
                              "CPython tests with PYTHON_PERF_JIT_SUPPORT=1",
                              {"PYTHON_PERF_JIT_SUPPORT": "1"})
            run_memory_tests(tally, os.path.join(os.path.dirname(TESTS),
                                                 "build", "python-debug"))
    finally:
        remove_files_of_exited(written_during(files_before, perf_files()))
    print(f"{tally.passed} passed, {tally.failed} failed, "
          f"{tally.skipped} skipped")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
