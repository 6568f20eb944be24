"""Tools/perf/pystacks.py on real perf data and on bad input."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

from support import PATCHED, ROOT, python
from test.test_perf_profiler import SEED  # the howto's foo/bar/baz

PYSTACKS = os.path.join(ROOT, "Tools", "perf", "pystacks.py")


def pystacks(*args, stdin=None):
    return subprocess.run([sys.executable, PYSTACKS, *args], input=stdin,
                          capture_output=True, text=True)


def folded(text):
    """{stack: count} of folded output."""
    stacks = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        stacks[stack] = int(count)
    return stacks


class RealProfileTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        seed = os.path.join(cls.tmp, "seed.py")
        with open(seed, "w") as f:
            f.write(SEED)
        data = os.path.join(cls.tmp, "perf.data")
        proc = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "-o", data, "--",
             python(PATCHED), "-X", "perf", seed],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate()
        if proc.returncode != 0:
            if os.environ.get("CI") == "true":
                raise AssertionError(f"perf record failed: {err}")
            raise unittest.SkipTest(f"perf cannot record: {err[-200:]}")
        cls.script = os.path.join(cls.tmp, "perf.script")
        with open(cls.script, "w") as out:
            # -F +pid: headers then name the process of every thread
            # (perf mode's map flusher is a second thread).
            subprocess.run(["perf", "script", "-F", "+pid", "-i", data],
                           stdout=out,
                           stderr=subprocess.DEVNULL, check=True)

    @classmethod
    def tearDownClass(cls):
        for name in os.listdir(cls.tmp):
            os.unlink(os.path.join(cls.tmp, name))
        os.rmdir(cls.tmp)

    def test_python_frames_only(self):
        proc = pystacks(self.script)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        stacks = folded(proc.stdout)
        top = max(stacks, key=stacks.get)
        self.assertEqual(top, "<module>;baz;bar;foo")
        self.assertGreater(stacks[top], sum(stacks.values()) // 2)
        self.assertNotIn("_PyEval_EvalFrameDefault", proc.stdout)
        self.assertNotIn("py::", proc.stdout)

    def test_file_names(self):
        stacks = folded(pystacks("--file-names", self.script).stdout)
        seed = os.path.join(self.tmp, "seed.py")
        self.assertIn(f"{seed}:<module>;{seed}:baz;{seed}:bar;{seed}:foo",
                      stacks)

    def test_native_leaf(self):
        stacks = folded(pystacks("--native-leaf", self.script).stdout)
        leaves = {s.split(";")[-1] for s in stacks
                  if s.startswith("<module>;baz;bar;foo;")}
        self.assertIn("_PyEval_EvalFrameDefault", leaves)
        # Where the C time of foo goes: int arithmetic, allocation...
        self.assertTrue(leaves - {"_PyEval_EvalFrameDefault"}, leaves)
        # No interpreter plumbing between the Python frames.
        for stack in stacks:
            if stack.startswith("<module>;baz;bar;foo;"):
                native = set(stack.split(";")[4:])
                self.assertFalse(native & {"<module>", "baz", "bar", "foo"})

    def test_all_frames_and_filters(self):
        everything = folded(pystacks("--all", self.script).stdout)
        self.assertTrue(any("_PyEval_EvalFrameDefault" in s
                            for s in everything))
        self.assertTrue(any("py::foo:" in s for s in everything))
        proc = pystacks("--comm", "no-such-command", self.script)
        self.assertEqual((proc.returncode, proc.stdout), (0, ""))
        with open(self.script) as f:
            pid = int(f.readline().split()[1].split("/")[0])
        self.assertEqual(folded(pystacks("--pid", str(pid),
                                         self.script).stdout),
                         folded(pystacks(self.script).stdout))

    def test_speedscope(self):
        out = os.path.join(self.tmp, "profile.json")
        proc = pystacks("--speedscope", out, self.script)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(out) as f:
            doc = json.load(f)
        # The fields speedscope's file-format schema requires.
        self.assertEqual(doc["$schema"],
                         "https://www.speedscope.app/file-format-schema.json")
        frames = doc["shared"]["frames"]
        self.assertTrue(all(isinstance(f["name"], str) for f in frames))
        profile = doc["profiles"][0]
        for key in ("type", "name", "unit", "startValue", "endValue",
                    "samples", "weights"):
            self.assertIn(key, profile)
        self.assertEqual(profile["type"], "sampled")
        self.assertEqual(len(profile["samples"]), len(profile["weights"]))
        self.assertEqual(profile["endValue"], sum(profile["weights"]))
        for sample in profile["samples"]:
            self.assertTrue(all(0 <= i < len(frames) for i in sample))
        names = [[frames[i]["name"] for i in s] for s in profile["samples"]]
        self.assertIn(["<module>", "baz", "bar", "foo"], names)


SAMPLE = ("python 42/43 [000] 1.5: 1 cpu-clock:ppp:\n"
          "\t    55aa _PyLong_Add+0x10 (/usr/bin/python3.11)\n"
          "\t    55ab _PyEval_EvalFrameDefault+0x20 (/usr/bin/python3.11)\n"
          "\t    7f01 py::leaf:/app/x.py+0x5 (/tmp/perf-42.map)\n"
          "\t    55ab _PyEval_EvalFrameDefault+0x20 (/usr/bin/python3.11)\n"
          "\t    7f02 py::Klass.method:/app/a:b.py+0x5 (/tmp/perf-42.map)\n"
          "\t    55ac main+0x1 (/usr/bin/python3.11)\n\n")


class BadInputTests(unittest.TestCase):

    def test_synthetic_sample(self):
        proc = pystacks("--file-names", stdin=SAMPLE)
        self.assertEqual(proc.stdout,
                         "/app/a:b.py:Klass.method;/app/x.py:leaf 1\n")
        proc = pystacks("--tid", "43", "--native-leaf", stdin=SAMPLE)
        self.assertEqual(proc.stdout, "Klass.method;leaf;"
                         "_PyEval_EvalFrameDefault;_PyLong_Add 1\n")
        self.assertEqual(pystacks("--tid", "42", stdin=SAMPLE).stdout, "")

    def test_lone_number_is_a_thread_id(self):
        # perf script's default header: "comm tid", with no process id.
        thread_only = SAMPLE.replace("python 42/43", "python 43")
        proc = pystacks("--tid", "43", stdin=thread_only)
        self.assertEqual(proc.stdout, "Klass.method;leaf 1\n")
        proc = pystacks("--pid", "43", stdin=thread_only)
        self.assertEqual(proc.stdout, "")
        self.assertIn("--pid left out 1 sample(s) without a process id; "
                      "run perf script -F +pid", proc.stderr)

    def test_malformed_lines_counted_not_fatal(self):
        junk = ("garbage at the top\n\t  not a frame\n" + SAMPLE
                + "\x00\x01binary junk\n" + SAMPLE
                + "python 42 [000] 2.0: 1 cpu-clock:\n\t    55aa trunc")
        proc = pystacks(stdin=junk)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIn("3 line(s) could not be parsed", proc.stderr)
        self.assertIn("Klass.method;leaf 2", proc.stdout)

    def test_no_samples(self):
        for text in ("", "nothing useful\n", "\t    55aa frame (x)\n"):
            with self.subTest(text=text):
                proc = pystacks(stdin=text)
                self.assertEqual(proc.returncode, 1)
                self.assertNotIn("Traceback", proc.stderr)
                self.assertIn("no samples", proc.stderr)

    def test_help_shows_a_pipeline(self):
        proc = pystacks("--help")
        self.assertEqual(proc.returncode, 0)
        self.assertIn("perf script -i perf.data | python pystacks.py",
                      proc.stdout)

    def test_200_mb_input_in_bounded_memory(self):
        block = "".join(SAMPLE.replace("leaf", f"leaf{i}")
                        for i in range(1000))
        with tempfile.NamedTemporaryFile("w", suffix=".script") as f:
            while f.tell() < 200 * 1024 * 1024:
                f.write(block)
            f.flush()
            # A fresh parent whose only child is pystacks, so that
            # RUSAGE_CHILDREN's peak is pystacks' own.
            measure = ("import resource, subprocess, sys\n"
                       "out = subprocess.run(sys.argv[1:], check=True,\n"
                       "                     capture_output=True).stdout\n"
                       "print(len(out.splitlines()),\n"
                       "      resource.getrusage(\n"
                       "          resource.RUSAGE_CHILDREN).ru_maxrss)\n")
            proc = subprocess.run(
                [sys.executable, "-c", measure, sys.executable, PYSTACKS,
                 f.name], capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        stacks, peak_kib = map(int, proc.stdout.split())
        self.assertEqual(stacks, 1000)
        # Far below the input size: the input is streamed.
        self.assertLess(peak_kib, 64 * 1024)


if __name__ == "__main__":
    unittest.main()
