"""Tools/perf/pystacks.py on real perf data and on bad input."""

import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

from support import PATCHED, ROOT, VIEWERS, python, run
from test.test_perf_profiler import SEED  # the howto's foo/bar/baz

PYSTACKS = os.path.join(ROOT, "Tools", "perf", "pystacks.py")
NPM = os.path.join(VIEWERS, "npm")
PPROF = os.path.join(VIEWERS, "pprof")
VALIDATE_SPEEDSCOPE = os.path.join(ROOT, "tests", "viewers",
                                   "validate_speedscope.js")


def pystacks(*args, stdin=None):
    return subprocess.run([sys.executable, PYSTACKS, *args], input=stdin,
                          capture_output=True, text=True)


def record_seed(tmp):
    """perf record -F 999 -g of the seed under -X perf, in tmp; returns
    the path of its perf script text."""
    seed = os.path.join(tmp, "seed.py")
    with open(seed, "w") as f:
        f.write(SEED)
    data = os.path.join(tmp, "perf.data")
    proc = subprocess.Popen(
        ["perf", "record", "-F", "999", "-g", "-o", data, "--",
         python(PATCHED), "-X", "perf", seed],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate()
    if proc.returncode != 0:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"perf record failed: {err}")
        raise unittest.SkipTest(f"perf cannot record: {err[-200:]}")
    script = os.path.join(tmp, "perf.script")
    with open(script, "w") as out:
        # -F +pid: headers then name the process of every thread
        # (perf mode's map flusher is a second thread).
        subprocess.run(["perf", "script", "-F", "+pid", "-i", data],
                       stdout=out, stderr=subprocess.DEVNULL, check=True)
    # perf script has named the trampolines: the seed's map has served.
    os.unlink(f"/tmp/perf-{seed_pid(script)}.map")
    return script


def seed_pid(script):
    """The process id in the first sample of perf script -F +pid text."""
    with open(script) as f:
        return int(f.readline().split()[1].split("/")[0])


def need_viewer(path):
    """Skip without a reader that `bash driver/cperf.sh viewers`
    installs; make test installs them, so under CI a missing one fails."""
    if not os.path.exists(path):
        message = f"{path} missing: run bash driver/cperf.sh viewers"
        if os.environ.get("CI") == "true":
            raise AssertionError(message)
        raise unittest.SkipTest(message)


def script_samples(path):
    """(tid, time, period, symbols innermost first) of each sample in
    perf script -F +pid text, split plainly on spaces (the commands here
    are single words), in the order perf printed them."""
    with open(path) as f:
        blocks = f.read().split("\n\n")
    for block in blocks:
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        *_, ids, time, period, _ = lines[0].split()
        yield (int(ids.split("/")[1]), float(time.rstrip(":")), int(period),
               [line.split()[1] for line in lines[1:]])


def speedscope_stacks(doc, profile):
    """A speedscope profile's samples as lists of frames, root first."""
    frames = doc["shared"]["frames"]
    return [[frames[i] for i in sample] for sample in profile["samples"]]


def validate_speedscope(path):
    """ajv's errors for path against speedscope's own schema."""
    need_viewer(NPM)
    proc = subprocess.run(["node", VALIDATE_SPEEDSCOPE, NPM, path],
                          capture_output=True, text=True)
    return json.loads(proc.stdout), proc.returncode


def read_pprof(*args):
    need_viewer(PPROF)
    return run([PPROF, *args]).stdout


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
        cls.script = record_seed(cls.tmp)

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
        self.assertNotIn("py::", proc.stdout)
        # C frames only as the one frame under [native] (a sample in the
        # evaluator outside any Python frame is [native];_PyEval_...).
        for stack in stacks:
            if stack.startswith("[native];"):
                self.assertEqual(stack.count(";"), 1, stack)
            else:
                self.assertNotIn("_PyEval_EvalFrameDefault", stack)

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
        pid = seed_pid(self.script)
        self.assertEqual(folded(pystacks("--pid", str(pid),
                                         self.script).stdout),
                         folded(pystacks(self.script).stdout))

    def speedscope(self):
        out = os.path.join(self.tmp, "profile.json")
        proc = pystacks("--speedscope", out, self.script)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(out) as f:
            return out, json.load(f)

    def test_speedscope_threads_in_time_order(self):
        _, doc = self.speedscope()
        samples = list(script_samples(self.script))
        profiles = doc["profiles"]
        for tid in {tid for tid, *_ in samples}:
            with self.subTest(tid=tid):
                mine = [p for p in profiles if f"tid {tid})" in p["name"]]
                self.assertEqual(len(mine), 1, [p["name"] for p in profiles])
                profile = mine[0]
                # perf's samples of the thread sorted by time, one by one.
                perf = sorted((s for s in samples if s[0] == tid),
                              key=lambda s: s[1])
                self.assertEqual(profile["unit"], "nanoseconds")
                self.assertEqual(profile["weights"],
                                 [period for _, _, period, _ in perf])
                self.assertEqual(profile["endValue"],
                                 sum(profile["weights"]))
                stacks = speedscope_stacks(doc, profile)
                self.assertEqual(
                    [any(f["name"] == "foo" for f in stack)
                     for stack in stacks],
                    [any(sym.startswith("py::foo:") for sym in symbols)
                     for *_, symbols in perf])
        # The seed's thread is the one speedscope opens.
        busiest = max(profiles, key=lambda p: len(p["samples"]))
        self.assertIs(profiles[doc["activeProfileIndex"]], busiest)

    def test_speedscope_frames_have_files(self):
        _, doc = self.speedscope()
        seed = os.path.join(self.tmp, "seed.py")
        frames = doc["shared"]["frames"]
        for name in ("<module>", "baz", "bar", "foo"):
            self.assertIn({"name": name, "file": seed}, frames)
        # Every frame but [native] has its file (a Python file or the
        # shared object of a C function), and no two frames are equal:
        # each module's <module> is a frame of its own.
        self.assertEqual([f for f in frames if "file" not in f],
                         [{"name": "[native]"}])
        self.assertEqual(len({(f["name"], f.get("file")) for f in frames}),
                         len(frames))
        # The map has no line numbers, so no frame claims one.  (Look at
        # the keys: a sampled C function such as find_or_make_trampoline
        # has "line" in its name.)
        self.assertEqual([f for f in frames if "line" in f], [])

    def test_speedscope_native_split(self):
        _, doc = self.speedscope()
        profile = doc["profiles"][doc["activeProfileIndex"]]
        for stack in speedscope_stacks(doc, profile):
            if stack[0]["name"] == "[native]":
                # [native] and under it what the sample was running.
                self.assertEqual(len(stack), 2, stack)
                self.assertNotIn(stack[1]["name"], ("[native]", "[unknown]"))
                self.assertIn("file", stack[1])

    def test_speedscope_schema(self):
        out, doc = self.speedscope()
        self.assertEqual(validate_speedscope(out), ([], 0))
        # The validator can fail.
        del doc["profiles"][0]["weights"]
        doc["shared"]["frames"][0]["file"] = 1
        broken = os.path.join(self.tmp, "broken.json")
        with open(broken, "w") as f:
            json.dump(doc, f)
        errors, status = validate_speedscope(broken)
        self.assertEqual(status, 1)
        self.assertEqual({e["instancePath"] for e in errors},
                         {"/profiles/0", "/profiles/0/type",
                          "/shared/frames/0/file"})

    def test_pprof(self):
        out = os.path.join(self.tmp, "profile.pb.gz")
        proc = pystacks("--pprof", out, self.script)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        stacks = folded(proc.stdout)
        raw = read_pprof("-raw", out)
        self.assertIn("PeriodType: cpu-clock nanoseconds\n", raw)
        self.assertIn("Period: 1001001\n", raw)
        self.assertIn("samples/count cpu-clock/nanoseconds", raw)
        # Go's pprof counts what the folded output counts.
        top = read_pprof("-top", "-sample_index=samples", "-nodecount=5",
                         out)
        self.assertIn("Type: samples\n", top)
        foo = [line.split() for line in top.splitlines()
               if line.endswith(" foo")]
        self.assertEqual(int(foo[0][0]), stacks["<module>;baz;bar;foo"])
        # Leaf first, with the thread as labels; functions with files.
        traces = read_pprof("-traces", out)
        self.assertRegex(traces, r"comm:  python\n +pid:  \d+\n +tid:  \d+\n"
                                 r" +\S+ +foo\n +bar\n +baz\n +<module>\n")
        seed = os.path.join(self.tmp, "seed.py")
        self.assertRegex(read_pprof("-top", "-filefunctions", out),
                         rf"\s+foo {seed}\n")


SAMPLE = ("python 42/43 [000] 1.5: 1 cpu-clock:ppp:\n"
          "\t    55aa _PyLong_Add+0x10 (/usr/bin/python3.11)\n"
          "\t    55ab _PyEval_EvalFrameDefault+0x20 (/usr/bin/python3.11)\n"
          "\t    7f01 py::leaf:/app/x.py+0x5 (/tmp/perf-42.map)\n"
          "\t    55ab _PyEval_EvalFrameDefault+0x20 (/usr/bin/python3.11)\n"
          "\t    7f02 py::Klass.method:/app/a:b.py+0x5 (/tmp/perf-42.map)\n"
          "\t    55ac main+0x1 (/usr/bin/python3.11)\n\n")


# Thread 43: two modules' <module> calling a.py's leaf, and C code only
# (no frame named, then an outer one named), printed out of time order,
# each sample with its own period; thread 44: kernel code.
THREADS = (
    "python 42/43 [000] 3.000000: 30 cpu-clock:ppp:\n"
    "\t    7f01 py::leaf:/app/a.py+0x5 (/tmp/perf-42.map)\n"
    "\t    55ab _PyEval_EvalFrameDefault+0x20 (/usr/bin/python3.11)\n"
    "\t    7f02 py::<module>:/app/b.py+0x5 (/tmp/perf-42.map)\n\n"
    "python 42/43 [000] 1.000000: 10 cpu-clock:ppp:\n"
    "\t    7f01 py::leaf:/app/a.py+0x5 (/tmp/perf-42.map)\n"
    "\t    7f03 py::<module>:/app/a.py+0x5 (/tmp/perf-42.map)\n\n"
    "python 42/43 [000] 2.000000: 20 cpu-clock:ppp:\n"
    "\t    1234 [unknown] (/usr/lib/libfoo.so)\n"
    "\t    5678 [unknown] (/usr/lib/libbar.so)\n\n"
    "perf-map-flush 42/44 [001] 2.200000: 5 cpu-clock:ppp:\n"
    "\t    ffff81 clear_page_erms+0x7 ([kernel.kallsyms])\n"
    "\t    55ac main+0x1 (/usr/bin/python3.11)\n\n"
    "python 42/43 [000] 2.500000: 25 cpu-clock:ppp:\n"
    "\t    1234 [unknown] (/usr/lib/libfoo.so)\n"
    "\t    1300 foo_call+0x3 (/usr/lib/libfoo.so)\n\n")


# THREADS as perf script -F comm,pid,tid,ip,sym,symoff,dso prints it: no
# time, period or event.
PLAIN = re.sub(r" \[\d+\] \S+: \d+ cpu-clock:ppp:", "", THREADS)


class OutputFormatTests(unittest.TestCase):
    """The three outputs of THREADS."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = tmp.name

    def speedscope(self, text):
        out = os.path.join(self.tmp, "profile.json")
        proc = pystacks("--speedscope", out, stdin=text)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(out) as f:
            return json.load(f)

    def pprof(self, text, *args):
        out = os.path.join(self.tmp, "profile.pb.gz")
        proc = pystacks("--pprof", out, stdin=text)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return read_pprof(*args, out)

    def test_folded(self):
        self.assertEqual(folded(pystacks(stdin=THREADS).stdout), {
            "<module>;leaf": 2, "[native];[libfoo.so]": 1,
            "[native];foo_call": 1, "[native];clear_page_erms": 1})
        self.assertEqual(
            folded(pystacks("--file-names", stdin=THREADS).stdout), {
                "/app/a.py:<module>;/app/a.py:leaf": 1,
                "/app/b.py:<module>;/app/a.py:leaf": 1,
                "[native];[libfoo.so]": 1, "[native];foo_call": 1,
                "[native];clear_page_erms": 1})

    def test_speedscope(self):
        doc = self.speedscope(THREADS)
        self.assertEqual(doc["shared"]["frames"], [
            {"name": "<module>", "file": "/app/b.py"},
            {"name": "leaf", "file": "/app/a.py"},
            {"name": "<module>", "file": "/app/a.py"},
            {"name": "[native]"},
            {"name": "[libfoo.so]", "file": "/usr/lib/libfoo.so"},
            {"name": "clear_page_erms", "file": "[kernel.kallsyms]"},
            {"name": "foo_call", "file": "/usr/lib/libfoo.so"}])
        self.assertEqual(doc["activeProfileIndex"], 0)
        self.assertEqual(doc["profiles"], [
            {"type": "sampled", "name": "python (pid 42, tid 43) cpu-clock",
             "unit": "nanoseconds", "startValue": 0, "endValue": 85,
             # Time order: 1.0, 2.0, 2.5, 3.0.
             "samples": [[2, 1], [3, 4], [3, 6], [0, 1]],
             "weights": [10, 20, 25, 30]},
            {"type": "sampled",
             "name": "perf-map-flush (pid 42, tid 44) cpu-clock",
             "unit": "nanoseconds", "startValue": 0, "endValue": 5,
             "samples": [[3, 5]], "weights": [5]}])

    def test_speedscope_without_times_and_periods(self):
        # In input order, each sample weighing 1.
        profile = self.speedscope(PLAIN)["profiles"][0]
        self.assertEqual((profile["name"], profile["unit"]),
                         ("python (pid 42, tid 43)", "none"))
        self.assertEqual(profile["samples"], [[0, 1], [2, 1], [3, 4],
                                              [3, 6]])
        self.assertEqual(profile["weights"], [1, 1, 1, 1])

    def test_two_events(self):
        # perf record -e cpu-clock,sched:sched_switch: each event's
        # samples are profiles and a column of values of their own.
        switch = ("python 42/43 [000] 2.700000: 1 sched:sched_switch:"
                  " prev_comm=python\n"
                  "\t    7f01 py::leaf:/app/a.py+0x5 (/tmp/perf-42.map)\n"
                  "\t    7f03 py::<module>:/app/a.py+0x5 (/tmp/perf-42.map)"
                  "\n\n")
        names = [(p["name"], p["unit"], p["weights"]) for p in
                 self.speedscope(THREADS + switch)["profiles"]]
        self.assertEqual(names[2], ("python (pid 42, tid 43) "
                                    "sched:sched_switch", "none", [1]))
        raw = self.pprof(THREADS + switch, "-raw")
        self.assertIn("samples/count cpu-clock/nanoseconds "
                      "sched:sched_switch/count\n", raw)
        self.assertIn("PeriodType:  \nPeriod: 0\n", raw)   # not one event
        # pprof adds up the samples of a stack and thread: a.py's
        # <module>;leaf has 1 + 1 samples, 10 ns of cpu-clock and 1 switch.
        self.assertRegex(raw, r"\n +2 +10 +1: 1 3 \n")

    def test_pprof_without_times_and_periods(self):
        raw = self.pprof(PLAIN, "-raw")
        self.assertIn("\nsamples/count\n", raw)
        self.assertIn("PeriodType:  \nPeriod: 0\n", raw)   # none
        self.assertNotIn("Duration", raw)

    def test_pprof(self):
        raw = self.pprof(THREADS, "-raw")
        self.assertIn("PeriodType: cpu-clock nanoseconds\n", raw)
        self.assertIn("Period: 18\n", raw)   # 90 ns in 5 samples
        self.assertIn("Duration: 2s\n", raw)
        # A function per frame, with its file; no line numbers.
        for function in ("leaf /app/a.py:0 s=0", "<module> /app/a.py:0 s=0",
                         "<module> /app/b.py:0 s=0",
                         "[libfoo.so] /usr/lib/libfoo.so:0 s=0",
                         "clear_page_erms [kernel.kallsyms]:0 s=0"):
            self.assertIn(function, raw)
        top = self.pprof(THREADS, "-top", "-filefunctions")
        self.assertIn("Total samples = 90ns", top)
        self.assertRegex(top, r"40ns .* leaf /app/a.py\n")
        traces = self.pprof(THREADS, "-traces", "-tagfocus=tid=44")
        self.assertRegex(traces, r"comm:  perf-map-flush\n +pid:  42\n"
                                 r" +tid:  44\n +5ns +clear_page_erms\n"
                                 r" +\[native\]\n")
        self.assertNotIn("leaf", traces)


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
