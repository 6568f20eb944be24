"""The `make bench` harness (Tools/perf/bench): a short run must produce
the table and JSON, and the "on" runs must really run in perf mode."""

import json
import os
import statistics
import subprocess
import tempfile
import unittest

from support import PATCHED, ROOT, clean_env, run

BENCH = os.path.join(ROOT, "Tools", "perf", "bench")
PYTHON = os.path.join(PATCHED["obj"], "python")


def run_one(*args):
    """Run the harness's per-process timer; returns its pid and output."""
    proc = subprocess.Popen([PYTHON, os.path.join(BENCH, "run_one.py"),
                             *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"run_one.py {args} failed:\n{err}")
    return proc.pid, json.loads(out)


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
            result = report["ratios"][workload]
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
        self.assertEqual(len(report["ratios"]["calls"]["pairs"]), 2)
        self.assertEqual(len(report["ratios"]["imports"]["pairs"]), 4)

    def test_toggled_pairs_run_in_perf_mode(self):
        # Started without -X perf, the process must turn perf mode on for
        # its "on" runs: the workload's function then has a map line.
        pid, times = run_one("calls", "--pairs", "2", "--backend", "perf")
        map_file = f"/tmp/perf-{pid}.map"
        try:
            self.assertEqual((len(times["off"]), len(times["on"])), (2, 2))
            with open(map_file) as f:
                self.assertIn(" py::fib:", f.read())
        finally:
            if os.path.exists(map_file):
                os.unlink(map_file)

    def test_single_run_stays_in_its_startup_mode(self):
        pid, times = run_one("loops")
        self.assertGreater(times["once"], 0)
        self.assertFalse(os.path.exists(f"/tmp/perf-{pid}.map"))


if __name__ == "__main__":
    unittest.main()
