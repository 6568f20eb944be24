"""The `make bench` harness (Tools/perf/bench): a short run must produce
the table and JSON, and the "on" runs must really run in perf mode."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import unittest

from support import PATCHED, ROOT, clean_env, run, written_since

BENCH = os.path.join(ROOT, "Tools", "perf", "bench")
PYTHON = os.path.join(PATCHED["obj"], "python")


def run_one(*args):
    """Run the harness's per-process timer; returns its pid, output and
    start time."""
    start = time.time()
    proc = subprocess.Popen([PYTHON, os.path.join(BENCH, "run_one.py"),
                             *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"run_one.py {args} failed:\n{err}")
    return proc.pid, json.loads(out), start


class BenchHarnessTests(unittest.TestCase):

    def test_short_run_writes_pairs_and_ratios(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            proc = run([PYTHON, os.path.join(BENCH, "bench.py"),
                        "--python", PYTHON, "--rounds", "3",
                        "--processes", "2", "--process-rounds", "4",
                        "--no-callgrind",
                        "--json", out, "calls", "imports"],
                       env=clean_env())
            with open(out) as f:
                report = json.load(f)
        self.assertIn("calls ", proc.stdout)
        self.assertIn("imports ", proc.stdout)
        for workload in ("calls", "imports"):
            result = report["ours"]["ratios"][workload]
            pairs = [pair for group in result["pairs"] for pair in group]
            self.assertEqual(len(pairs), 3 if workload == "calls" else 4)
            self.assertTrue(all(t > 0 for pair in pairs for t in pair))
            self.assertAlmostEqual(
                result["ratio"],
                statistics.median(on / off for off, on in pairs))
            self.assertEqual(result["off_s"],
                             statistics.median(off for off, _ in pairs))
            low, high = result["ratio_95"]
            self.assertLessEqual(low, result["ratio"])
            self.assertLessEqual(result["ratio"], high)
        # calls: 3 pairs over 2 processes; imports: 4 pairs of fresh
        # processes, a group each.
        self.assertEqual(len(report["ours"]["ratios"]["calls"]["pairs"]), 2)
        self.assertEqual(len(report["ours"]["ratios"]["imports"]["pairs"]),
                         4)

    def test_toggled_pairs_run_in_perf_mode(self):
        # Started without -X perf, the process must turn perf mode on for
        # its "on" runs: the workload's function then has a map line.
        pid, times, _ = run_one("calls", "--pairs", "2",
                                "--backend", "perf")
        map_file = f"/tmp/perf-{pid}.map"
        try:
            self.assertEqual((len(times["off"]), len(times["on"])), (2, 2))
            with open(map_file) as f:
                self.assertIn(" py::fib:", f.read())
        finally:
            if os.path.exists(map_file):
                os.unlink(map_file)

    def test_single_run_stays_in_its_startup_mode(self):
        pid, times, start = run_one("loops")
        self.assertGreater(times["once"], 0)
        self.assertFalse(written_since(f"/tmp/perf-{pid}.map", start))

    def test_whole_interpreters_counted_and_in_perf_mode(self):
        # ci_loop's "on" loop turns perf support on by the environment
        # variable, in every interpreter of the loop.
        sys.path.insert(0, BENCH)
        try:
            import bench
        finally:
            del sys.path[0]
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "modes")
            script = ("import sys; open(sys.argv[1], 'a').write("
                      "str(sys.is_stack_trampoline_active())[0])")
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                for backend in ("perf", "perf_jit"):
                    for on in (False, True):
                        elapsed = bench.time_interpreters(
                            PYTHON, ["-c", script, out],
                            bench.perf_env(backend, on), 3, devnull)
                        self.assertGreater(elapsed, 0)
            finally:
                os.close(devnull)
            with open(out) as f:
                self.assertEqual(f.read(), "FFFTTTFFFTTT")

    def test_real_code_workloads_run_and_import_only(self):
        for workload in ("docutils_html", "pygments_highlight",
                         "sympy_integrate", "networkx_graph",
                         "difflib_diff"):
            with self.subTest(workload=workload):
                _, times, _ = run_one(workload)
                self.assertGreater(times["once"], 0)
                proc = run([PYTHON, os.path.join(BENCH, "run_one.py"),
                            workload, "--import-only"], env=clean_env())
                self.assertEqual(proc.stdout, "")


if __name__ == "__main__":
    unittest.main()
