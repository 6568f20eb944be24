"""Tests for Linux perf support: -X perf, PYTHONPERFSUPPORT and
sys.activate_stack_trampoline().

The tests that profile drive the real perf (perf record -g, perf script).
Where perf cannot record they skip with the reason; with CI=true in the
environment such a skip is a failure instead, because CI can record."""

import glob
import os
import re
import struct
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import typing
import unittest

from test.support import os_helper

if not sysconfig.get_config_var("PY_HAVE_PERF_TRAMPOLINE"):
    raise unittest.SkipTest("perf trampoline support is not built")

MAP_LINE = re.compile(rb"([0-9a-f]+) ([0-9a-f]+) (\S.*)")

def perf_max_stack():
    """The deepest stack perf records (kernel.perf_event_max_stack)."""
    try:
        with open("/proc/sys/kernel/perf_event_max_stack") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 127


PERF_MAX_STACK = perf_max_stack()

# An AddressSanitizer build (make asan) spends much of its time in the
# sanitizer's runtime, which the samples see too.
SANITIZED = "--with-address-sanitizer" in (
    sysconfig.get_config_var("CONFIG_ARGS") or "")


def map_path(pid):
    return f"/tmp/perf-{pid}.map"


class MapEntry(typing.NamedTuple):
    addr: int
    size: int
    name: str


def read_map_entries(pid, *, remove=False):
    """The entries of process pid's map, in order (the file is removed
    afterwards if remove is set).  Every line must be a complete,
    well-formed entry in valid UTF-8.  (tests/ reads maps with this too.)"""
    path = map_path(pid)
    with open(path, "rb") as f:
        data = f.read()
    if remove:
        os.unlink(path)
    if data and not data.endswith(b"\n"):
        raise AssertionError(f"{path} ends in a partial line")
    entries = []
    for raw in data.splitlines():
        match = MAP_LINE.fullmatch(raw)
        if match is None:
            raise AssertionError(f"{path}: malformed line {raw!r}")
        entries.append(MapEntry(int(match[1], 16), int(match[2], 16),
                                match[3].decode("utf-8")))
    return entries


def read_map(pid):
    """The symbol names in process pid's map (see read_map_entries)."""
    return [entry.name for entry in read_map_entries(pid)]


def remove_map(pid):
    os_helper.unlink(map_path(pid))


# Files are stamped with the kernel's coarse clock, which may lag
# time.time() by a tick (1-10 ms), and some filesystems keep whole
# seconds only (ext4 with 128-byte inodes).  A pid is not reused within a
# second.
STAMP_SLACK = 1.0


def written_since(path, start):
    """Was the file at path written at or after start, a time.time() taken
    before starting the process it is named for?  An older file of that
    name belongs to an earlier process that had the same pid: pids wrap
    at pid_max, and every process that ran in perf mode leaves its map in
    /tmp, so on a machine where perf mode is used often some new process
    finds one.  (tests/ checks its processes' files with this too.)"""
    try:
        return os.stat(path, follow_symlinks=False).st_mtime >= \
            start - STAMP_SLACK
    except FileNotFoundError:
        return False


# The start of a script that plants something at its own map's or dump's
# path: an earlier process with the same pid may have left a file there
# (see written_since()), on which the planting would fail.
PLANT_AT = """
import os
def plant_at(path):
    '''path, freed of what an earlier process with our pid left.'''
    if os.path.lexists(path):
        os.unlink(path)
    return path
"""


def run_python(*args, env=None, script=None):
    """Run the interpreter; return (returncode, stdout, stderr) as text."""
    cmd = [sys.executable, *args]
    if script is not None:
        cmd += ["-c", textwrap.dedent(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=env if env is not None else clean_env())
    return proc.returncode, proc.stdout, proc.stderr


def clean_env(**extra):
    """This environment without the caller's PYTHON* settings (a machine
    may set PYTHONUNBUFFERED, for one), plus extra.  (tests/ uses this
    too.)"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTHON")}
    env.update(extra)
    return env


def perf_unavailable_reason():
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "probe.data")
        proc = subprocess.run(
            [perf, "record", "-g", "-o", out, "--", sys.executable, "-c",
             "pass"], capture_output=True, text=True)
        if proc.returncode != 0:
            return "perf record fails here: " + proc.stderr.strip()[-300:]
    return None


_perf_reason = None
_perf_checked = False


def require_perf(test):
    """Skip test when perf cannot record, or fail it under CI=true."""
    global _perf_reason, _perf_checked
    if not _perf_checked:
        _perf_reason = perf_unavailable_reason()
        _perf_checked = True
    if _perf_reason is None:
        return
    if os.environ.get("CI") == "true":
        test.fail(f"CI=true but perf cannot record: {_perf_reason}")
    test.skipTest(_perf_reason)


def perf_stacks(script, *py_args, env=None, frequency=999, dwarf=False,
                inject=False, python=sys.executable):
    """Profile script under `perf record -g`; return the sampled stacks as
    lists of symbol names, innermost first, and the script's stdout.

    With dwarf, perf unwinds with DWARF call frame information
    (--call-graph dwarf); with inject, `perf inject --jit` reads the
    jitdump first, as a user of -X perf_jit does."""
    with tempfile.TemporaryDirectory() as tmp:
        script_file = os.path.join(tmp, "script.py")
        with open(script_file, "w") as f:
            f.write(textwrap.dedent(script))
        data = os.path.join(tmp, "perf.data")
        unwinding = ["--call-graph", "dwarf", "-k", "1"] if dwarf else []
        rec = subprocess.run(
            ["perf", "record", "-F", str(frequency), "-g", *unwinding,
             "-o", data, "--", python, *py_args, script_file],
            capture_output=True, text=True,
            env=env if env is not None else clean_env())
        if rec.returncode != 0:
            raise AssertionError(f"perf record failed: {rec.stderr}")
        if inject:
            data = inject_jit(data)
        rep = subprocess.run(
            ["perf", "script", "-F", "comm,pid,ip,sym", "-i", data],
            capture_output=True, text=True, errors="replace")
        if rep.returncode != 0:
            raise AssertionError(f"perf script failed: {rep.stderr}")
    # perf script has read them: the profiled processes' map, jitdump and
    # perf inject's ELF files go.
    for pid in set(re.findall(r"^\S+\s+(\d+)\s*$", rep.stdout, re.M)):
        remove_map(pid)
        remove_jit_files(pid)
    return parse_perf_script(rep.stdout), rec.stdout


def inject_jit(data):
    """perf inject --jit; returns the new data file.  perf inject writes
    an ELF file per trampoline next to the jitdump (/tmp/jitted-*.so),
    which perf script reads."""
    injected = data + ".jit"
    proc = subprocess.run(["perf", "inject", "--jit", "-i", data,
                           "-o", injected], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"perf inject failed: {proc.stderr}")
    return injected


def remove_jit_files(pid):
    """A perf_jit process's dump and perf inject's ELF files for it."""
    os_helper.unlink(f"/tmp/jit-{pid}.dump")
    for path in glob.glob(f"/tmp/jitted-{pid}-*.so"):
        os_helper.unlink(path)


JITDUMP_MAGIC = 0x4A695444
JIT_CODE_LOAD = 0
JIT_CODE_UNWINDING_INFO = 4


def read_jitdump(pid):
    """The header and records of /tmp/jit-<pid>.dump, checking the layout
    of Linux's tools/perf/util/jitdump.h: a 40-byte header, then records
    whose sizes add up to the file exactly; each code load comes after
    the unwinding tables that describe it."""
    with open(f"/tmp/jit-{pid}.dump", "rb") as f:
        data = f.read()
    (magic, version, header_size, elf_mach, _, dump_pid, _,
     flags) = struct.unpack_from("=IIIIIIQQ", data)
    header = {"magic": magic, "version": version, "size": header_size,
              "elf_mach": elf_mach, "pid": dump_pid, "flags": flags}
    loads = []
    offset = header_size
    unwinding = None
    while offset < len(data):
        kind, size, _ = struct.unpack_from("=IIQ", data, offset)
        if size < 16 or offset + size > len(data):
            raise AssertionError(f"record at {offset} has size {size}")
        body = data[offset + 16:offset + size]
        if kind == JIT_CODE_UNWINDING_INFO:
            table_size, hdr_size, mapped = struct.unpack_from("=QQQ", body)
            if 24 + table_size > len(body) or hdr_size >= table_size:
                raise AssertionError(f"bad unwinding record at {offset}")
            unwinding = body[24:24 + table_size]
        elif kind == JIT_CODE_LOAD:
            (load_pid, _, vma, addr, code_size,
             index) = struct.unpack_from("=IIQQQQ", body)
            name_end = body.index(b"\0", 40)
            code = body[name_end + 1:]
            if len(code) != code_size or vma != addr or unwinding is None:
                raise AssertionError(f"bad code load at {offset}")
            loads.append({"pid": load_pid, "addr": addr, "index": index,
                          "name": body[40:name_end].decode(),
                          "code": code, "unwinding": unwinding})
            unwinding = None
        offset += size
    return header, loads


def parse_perf_script(text):
    stacks = []
    for block in text.split("\n\n"):
        lines = [l.strip() for l in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        frames = []
        for line in lines[1:]:
            parts = line.split(None, 1)
            frames.append(parts[1] if len(parts) == 2 else "[unknown]")
        stacks.append(frames)
    return stacks


def assert_many_show(test, chains, wanted):
    """A quarter of the samples (ten on a sanitizer build) show the chain
    wanted innermost first."""
    hits = [c for c in chains if c[:len(wanted)] == wanted]
    least = 10 if SANITIZED else len(chains) // 4
    test.assertGreater(len(hits), least,
                       f"few samples show {wanted}: {chains[:5]}")


def py_frames(stack):
    """The py:: frames of a stack, innermost first, without the filename."""
    return [f.split(":", 3)[2] for f in stack if f.startswith("py::")]


# A forked child gets its own copy of its parent's lines once it has run
# Python for 10 ms (a child that execs or exits at once copies nothing).
# Scripts of forking tests start with this, to have a child wait for that.
WAIT_FOR_OWN_FILE = """
def wait_for_own_file(kind, text):
    import os, time
    path = f"/tmp/{kind}-{os.getpid()}.{'map' if kind == 'perf' else 'dump'}"
    start = time.monotonic()
    while time.monotonic() - start < 10:
        if os.path.exists(path):
            with open(path, "rb") as f:
                if text in f.read():
                    return True
        time.sleep(0.001)
    return False
"""


SEED = """
def foo(n):
    result = 0
    for _ in range(n):
        result += 1
    return result

def bar(n):
    foo(n)

def baz(n):
    bar(n)

baz(3_000_000)
"""


class PerfChainTests(unittest.TestCase):
    """perf record -g shows baz -> bar -> foo between the C frames."""

    def setUp(self):
        require_perf(self)

    def assert_seed_chain(self, stacks):
        chains = [py_frames(s) for s in stacks]
        wanted = ["foo", "bar", "baz", "<module>"]
        assert_many_show(self, chains, wanted)
        # Each trampoline calls the evaluator and is called from C, never
        # from another trampoline.  Frame-pointer unwinding loses the
        # caller of a function sampled in its prologue or epilogue, so the
        # callee side of the innermost trampoline is not checked, nor the
        # caller side of a trampoline that is itself the sampled leaf, nor
        # of one that ends a stack perf cut at its maximum depth (deep
        # imports on a debug build).
        checked = 0
        for stack in stacks:
            positions = [i for i, f in enumerate(stack) if f.startswith("py::")]
            for n, i in enumerate(positions):
                if i + 1 == len(stack) and len(stack) >= PERF_MAX_STACK:
                    continue
                self.assertLess(i + 1, len(stack), stack)
                if i > 0:
                    self.assertFalse(stack[i + 1].startswith("py::"), stack)
                if n > 0:
                    self.assertIn("_PyEval_EvalFrameDefault", stack[i - 1],
                                  stack)
                    checked += 1
        self.assertGreater(checked, 0)

    def test_xoption(self):
        stacks, _ = perf_stacks(SEED, "-X", "perf")
        self.assert_seed_chain(stacks)

    def test_environment_variable(self):
        stacks, _ = perf_stacks(SEED, env=clean_env(PYTHONPERFSUPPORT="1"))
        self.assert_seed_chain(stacks)

    def test_environment_ignored_under_E(self):
        stacks, _ = perf_stacks(SEED, "-E",
                                env=clean_env(PYTHONPERFSUPPORT="1"))
        self.assertEqual([s for s in stacks if py_frames(s)], [])

    def test_sys_api_only_activated_section(self):
        script = """
            import sys
            def cold(n):
                return sum(i * i for i in range(n))
            def hot(n):
                return sum(i * i for i in range(n))
            cold(1_000_000)
            sys.activate_stack_trampoline("perf")
            hot(1_000_000)
            sys.deactivate_stack_trampoline()
            cold(1_000_000)
        """
        stacks, _ = perf_stacks(script)
        names = {name for s in stacks for name in py_frames(s)}
        self.assertIn("hot", names)
        self.assertIn("hot.<locals>.<genexpr>", names)
        self.assertFalse([n for n in names if n.startswith("cold")], names)

    def test_generator_resumes_and_threads(self):
        script = """
            import threading
            def numbers(n):
                for i in range(n):
                    yield i * 2
            def consume(n):
                total = 0
                for x in numbers(n):
                    total += x
                return total
            def worker():
                consume(1_500_000)
            t = threading.Thread(target=worker)
            t.start()
            consume(1_500_000)
            t.join()
        """
        stacks, _ = perf_stacks(script, "-X", "perf")
        chains = [py_frames(s) for s in stacks]
        in_gen = [c for c in chains if c[:2] == ["numbers", "consume"]]
        self.assertTrue(in_gen, chains[:10])
        threaded = [c for c in chains if c[:3] == ["numbers", "consume",
                                                    "worker"]]
        self.assertTrue(threaded, chains[:10])
        self.assertIn("Thread.run", threaded[0])

    def test_fork_child_resolves_inherited_frames(self):
        script = """
            import os
            def child_work(n):
                total = 0
                for i in range(n):
                    total += i
                return total
            def parent_frame():
                pid = os.fork()
                if pid == 0:
                    child_work(3_000_000)
                    os._exit(0)
                os.waitpid(pid, 0)
                print(pid)
            parent_frame()
        """
        # parent_frame's trampoline is the parent's: the child's samples
        # name it only if the child's map lists it too.
        stacks, _ = perf_stacks(script, "-X", "perf")
        chains = [py_frames(s) for s in stacks]
        self.assertIn(["child_work", "parent_frame", "<module>"],
                      [c[:3] for c in chains])


class PerfMapTests(unittest.TestCase):
    """The map file and the sys API, without perf."""

    def run_checked(self, script, *args, env=None):
        code, out, err = run_python(*args, script=script, env=env)
        self.assertEqual(code, 0, err)
        return out, err

    def test_kinds_of_code(self):
        script = """
            import asyncio, os, sys
            def gen():
                yield 1
            async def coro():
                return 2
            class Klass:
                def method(self):
                    return [x for x in range(3)]
            f = lambda: 3
            list(gen()); asyncio.run(coro()); Klass().method(); f()
            exec(compile("def made(): pass\\nmade()", "<made>", "exec"))
            eval("len('x')")
            print(os.getpid())
        """
        out, _ = self.run_checked(script, "-X", "perf")
        pid = int(out)
        names = read_map(pid)
        remove_map(pid)
        for expected in ("py::gen:", "py::coro:", "py::Klass:",
                         "py::Klass.method:", "py::Klass.method.<locals>."
                         "<listcomp>:", "py::<lambda>:", "py::made:<made>",
                         "py::<module>:<made>", "py::<module>:<string>"):
            self.assertTrue(any(n.startswith(expected) for n in names),
                            expected)
        # One entry per code object, however often it ran.
        self.assertEqual(sum(n.startswith("py::gen:") for n in names), 1)

    def test_hostile_names(self):
        script = r"""
            import os, sys
            sys.activate_stack_trampoline("perf")
            def f():
                pass
            for name in ("new\nline", "car\rriage", "tab\tnul\x00x",
                         "del\x7fc1\x85", "lone\ud800surrogate",
                         "esc\udcffbyte", "long" + "x" * 1_000_000):
                f.__code__ = f.__code__.replace(co_qualname=name)
                f()
            code = compile("pass", "file\nname\udcfe.py", "exec")
            exec(code)
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        pid = int(out)
        names = read_map(pid)  # every line well-formed, valid UTF-8
        remove_map(pid)
        text = "\n".join(names)
        for escaped in (r"py::new\x0aline:", r"py::car\x0driage:",
                        r"tab\x09nul\x00x", r"del\x7fc1\x85",
                        "lone\ufffdsurrogate", r"esc\xffbyte",
                        r"py::<module>:file\x0aname\xfe.py"):
            self.assertIn(escaped, text)
        longest = max(names, key=len)
        self.assertTrue(longest.startswith("py::longxxx"))
        self.assertLess(len(longest.encode()), 5000)
        self.assertTrue(longest.endswith("..."))

    def test_escapes_at_every_offset(self):
        # ASCII names are scanned eight bytes at a time: a control
        # character must be found wherever it falls in a word, and the
        # printable characters next to the control range (space, "~")
        # must not be escaped.
        script = r"""
            import os, sys
            sys.activate_stack_trampoline("perf")
            def f():
                pass
            for offset in range(20):
                for ch in ("\x00", "\x1f", "\x7f", " ", "~"):
                    name = "a" * offset + ch + "b" * 19
                    f.__code__ = f.__code__.replace(co_qualname=name)
                    f()
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        pid = int(out)
        qualnames = {name[len("py::"):].split(":")[0]
                     for name in read_map(pid)}
        remove_map(pid)
        expected = set()
        for offset in range(20):
            for written in (r"\x00", r"\x1f", r"\x7f", " ", "~"):
                expected.add("a" * offset + written + "b" * 19)
        self.assertEqual({q for q in qualnames if q.endswith("b" * 19)},
                         expected)

    def test_errors_match_3_13(self):
        # The exception types and texts of CPython 3.13 (Argument Clinic's
        # str converter, then sys_activate_stack_trampoline_impl).
        script = r"""
            import sys
            def error(*args):
                try:
                    sys.activate_stack_trampoline(*args)
                except Exception as exc:
                    return f"{type(exc).__name__}: {exc}"
            for args in ((1,), (None,), (b"perf",), ("invalid",), ("",),
                         ("perf\0",), ("\udc80",), ()):
                print(error(*args))
            sys.deactivate_stack_trampoline()  # inactive: no effect
            assert not sys.is_stack_trampoline_active()
            assert sys.activate_stack_trampoline.__text_signature__
        """
        out, _ = self.run_checked(script)
        self.assertEqual(out.splitlines(), [
            "TypeError: activate_stack_trampoline() argument must be str, "
            "not int",
            "TypeError: activate_stack_trampoline() argument must be str, "
            "not None",
            "TypeError: activate_stack_trampoline() argument must be str, "
            "not bytes",
            "ValueError: invalid backend: invalid",
            "ValueError: invalid backend: ",
            "ValueError: embedded null character",
            "UnicodeEncodeError: 'utf-8' codec can't encode character "
            "'\\udc80' in position 0: surrogates not allowed",
            "TypeError: sys.activate_stack_trampoline() takes exactly one "
            "argument (0 given)",
        ])

    def test_precedence_and_environment(self):
        probe = "import sys; print(sys.is_stack_trampoline_active())"
        cases = [
            ((), {}, "False"),
            (("-X", "perf"), {}, "True"),
            ((), {"PYTHONPERFSUPPORT": "1"}, "True"),
            ((), {"PYTHONPERFSUPPORT": "7"}, "True"),
            ((), {"PYTHONPERFSUPPORT": "0"}, "False"),
            ((), {"PYTHONPERFSUPPORT": ""}, "False"),
            (("-E",), {"PYTHONPERFSUPPORT": "1"}, "False"),
            (("-I",), {"PYTHONPERFSUPPORT": "1"}, "False"),
            (("-X", "perf"), {"PYTHONPERFSUPPORT": "0"}, "True"),
            (("-X", "perf_jit_not_a_backend"), {}, "False"),
        ]
        for args, env, expected in cases:
            with self.subTest(args=args, env=env):
                code, out, err = run_python(*args, "-c", probe,
                                            env=clean_env(**env))
                self.assertEqual((code, out.strip(), err), (0, expected, ""))
        code, out, err = run_python(
            "-c", probe, env=clean_env(PYTHONPERFSUPPORT="yes"))
        self.assertEqual((code, out.strip()), (0, "False"))
        self.assertIn("PYTHONPERFSUPPORT", err)
        script = """
            import sys
            sys.deactivate_stack_trampoline()
            print(sys.is_stack_trampoline_active())
        """
        out, _ = self.run_checked(script, "-X", "perf")
        self.assertEqual(out.strip(), "False")

    def test_deactivate_deep_in_stack_and_reuse(self):
        script = """
            import os, sys
            def down(n):
                if n == 0:
                    sys.deactivate_stack_trampoline()
                    return 0
                return down(n - 1) + 1
            def count(name):
                with open(f"/tmp/perf-{os.getpid()}.map") as f:
                    return sum(f":{name}:" in line or
                               line.split()[2].startswith(f"py::{name}:")
                               for line in f)
            sys.activate_stack_trampoline("perf")
            assert down(200) == 200
            assert not sys.is_stack_trampoline_active()
            assert down(10) == 10
            sys.activate_stack_trampoline("perf")
            assert down(5) == 5
            assert count("down") == 1, count("down")
            for _ in range(1000):   # never exhausts the co_extra index
                sys.deactivate_stack_trampoline()
                sys.activate_stack_trampoline("perf")
            def fresh():
                return 1
            assert fresh() == 1
            sys.deactivate_stack_trampoline()   # writes out pending lines
            assert count("fresh") == 1
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        remove_map(int(out))

    def test_deep_recursion_never_crashes(self):
        # Each Python frame costs a native frame in perf mode: runaway
        # recursion must end in RecursionError, not a C stack overflow,
        # and deep but legal recursion works given a big enough stack.
        script = """
            import sys, threading
            sys.setrecursionlimit(1_000_000)
            def down(n):
                return 0 if n == 0 else down(n - 1) + 1
            try:
                down(900_000)
            except RecursionError:
                print("RecursionError")
            threading.stack_size(256 * 1024 * 1024)
            t = threading.Thread(target=lambda: print(down(50_000)))
            t.start()
            t.join()
        """
        out, _ = self.run_checked(script, "-X", "perf")
        self.assertEqual(out.split(), ["RecursionError", "50000"])

    def test_recursion_depth_follows_the_stack_limit(self):
        # The main thread's first C stack limit is provisional (an eighth
        # of RLIMIT_STACK below its first frame), and frames past it find
        # the real one: a small stack still ends in RecursionError, and a
        # big one allows recursion far past the provisional limit.
        import resource
        big = 64 * 1024 * 1024
        # A sanitizer's C frames are several times bigger.
        depth = 20_000 if SANITIZED else 100_000
        hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
        if hard != resource.RLIM_INFINITY and hard < big:
            self.skipTest("the hard stack limit is below 64 MiB")
        script = textwrap.dedent(f"""
            import os, sys
            sys.setrecursionlimit(1_000_000)
            def down(n):
                return 0 if n == 0 else down(n - 1) + 1
            try:
                result = down({depth})
            except RecursionError:
                result = "RecursionError"
            print(os.getpid(), result)
        """)

        def run_with_stack(size):
            def limit_stack():
                resource.setrlimit(resource.RLIMIT_STACK, (size, hard))
            proc = subprocess.run([sys.executable, "-X", "perf", "-c", script],
                                  capture_output=True, text=True,
                                  env=clean_env(), preexec_fn=limit_stack)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            pid, result = proc.stdout.split()
            remove_map(int(pid))
            return result

        self.assertEqual(run_with_stack(2 * 1024 * 1024), "RecursionError")
        self.assertEqual(run_with_stack(big), str(depth))

    def test_write_xor_execute(self):
        script = """
            import os, sys
            sys.activate_stack_trampoline("perf")
            src = "\\n".join(f"def f{i}(): return {i}" for i in range(20000))
            ns = {}
            exec(src, ns)
            for i in range(20000):
                ns[f"f{i}"]()
            with open("/proc/self/maps") as f:
                for line in f:
                    perms = line.split()[1]
                    assert not ("w" in perms and "x" in perms), line
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        names = read_map(int(out))
        remove_map(int(out))
        self.assertEqual(sum(n.startswith("py::f") for n in names), 20000)

    def test_stale_map_replaced(self):
        script = """
            import os, sys
            path = f"/tmp/perf-{os.getpid()}.map"
            with open(path, "w") as f:
                f.write("deadbeef 10 py::stale:old\\n")
            os.chmod(path, 0o644)
            sys.activate_stack_trampoline("perf")
            def g(): pass
            g()
            st = os.stat(path)
            assert oct(st.st_mode & 0o777) == "0o600", oct(st.st_mode)
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        names = read_map(int(out))
        remove_map(int(out))
        self.assertNotIn("py::stale:old", names)
        self.assertTrue(any(n.startswith("py::g:") for n in names))

    def refused(self, setup, reason):
        """setup plants something at our map path; activation must raise
        and leave it untouched."""
        script = f"""
            import os, sys
            path = plant_at(f"/tmp/perf-{{os.getpid()}}.map")
            {setup}
            try:
                sys.activate_stack_trampoline("perf")
            except OSError as exc:
                print(exc)
            else:
                raise AssertionError("activated")
            assert not sys.is_stack_trampoline_active()
            def h(): return 1
            assert h() == 1
            print(os.getpid())
        """
        out, _ = self.run_checked(PLANT_AT + textwrap.dedent(script))
        message, pid = out.strip().splitlines()
        self.assertIn(reason, message)
        return int(pid)

    def test_symlink_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "target")
            with open(target, "w") as f:
                f.write("precious\n")
            pid = self.refused(f"os.symlink({target!r}, path)",
                               "symbolic link")
            with open(target) as f:
                self.assertEqual(f.read(), "precious\n")
            os.unlink(map_path(pid))

    def test_fifo_and_directory_refused(self):
        pid = self.refused("os.mkfifo(path)", "not a regular file")
        os.unlink(map_path(pid))
        pid = self.refused("os.mkdir(path)", "Is a directory")
        os.rmdir(map_path(pid))

    @unittest.skipUnless(os.geteuid() == 0, "needs root to chown")
    def test_other_owner_refused(self):
        pid = self.refused("open(path, 'w').close(); os.chown(path, 65534, "
                           "65534)", "owned by another user")
        os.unlink(map_path(pid))

    def test_startup_failure_warns_and_runs(self):
        # Plant a symlink at the pid the interpreter will have (exec keeps
        # the pid), then start it with -X perf.
        script = """
            import os, sys
            path = plant_at(f"/tmp/perf-{os.getpid()}.map")
            os.symlink("/nonexistent", path)
            os.execv(sys.executable, [sys.executable, "-X", "perf", "-c",
                     "import sys; print('ran', sys.is_stack_trampoline_active())"])
        """
        code, out, err = run_python(
            script=PLANT_AT + textwrap.dedent(script))
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), "ran False")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("perf support disabled", err)
        self.assertIn("symbolic link", err)
        for name in os.listdir("/tmp"):
            path = os.path.join("/tmp", name)
            if name.startswith("perf-") and os.path.islink(path) and \
                    os.readlink(path) == "/nonexistent":
                os.unlink(path)

    def test_map_is_private_and_cloexec(self):
        script = """
            import os, stat, sys
            sys.activate_stack_trampoline("perf")
            path = f"/tmp/perf-{os.getpid()}.map"
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o600
            fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
            for fd in fds:
                try:
                    if os.readlink(f"/proc/self/fd/{fd}") == path:
                        assert not os.get_inheritable(fd)
                        break
                except OSError:
                    pass
            else:
                raise AssertionError("map not open")
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        remove_map(int(out))

    def test_fork_maps(self):
        script = """
            import os, sys
            sys.activate_stack_trampoline("perf")
            def before_fork(): return 1
            before_fork()
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                def only_in_child(): return 2
                only_in_child()
                os._exit(0 if wait_for_own_file("perf", b"before_fork")
                         else 1)
            assert os.waitpid(pid, 0)[1] == 0
            print(os.getpid(), pid)
        """
        out, _ = self.run_checked(WAIT_FOR_OWN_FILE
                                  + textwrap.dedent(script))
        parent, child = map(int, out.split())
        parent_names = read_map(parent)
        child_names = read_map(child)
        remove_map(parent)
        remove_map(child)
        self.assertTrue(any(n.startswith("py::before_fork:")
                            for n in child_names))
        self.assertTrue(any(n.startswith("py::only_in_child:")
                            for n in child_names))
        self.assertFalse(any(n.startswith("py::only_in_child:")
                             for n in parent_names))

    def test_grandchild_of_a_fresh_child(self):
        # A child that forks before it copied its parent's lines (a
        # daemon's double fork) copies them first: its child cannot.
        script = """
            import os
            def in_grandparent(): return 1
            in_grandparent()
            pid = os.fork()
            if pid == 0:
                def in_child(): return 2
                in_child()
                grandchild = os.fork()
                if grandchild == 0:
                    os._exit(0 if wait_for_own_file(
                        "perf", b"py::in_grandparent:") else 1)
                print(grandchild, flush=True)
                os._exit(os.waitpid(grandchild, 0)[1] >> 8)
            print(os.getpid(), pid, os.waitpid(pid, 0)[1])
        """
        out, _ = self.run_checked(WAIT_FOR_OWN_FILE
                                  + textwrap.dedent(script), "-X", "perf")
        grandchild, parent, child, status = map(int, out.split())
        for pid in (grandchild, parent, child):
            remove_map(pid)
        self.assertEqual(status, 0)

    def test_subinterpreter(self):
        script = """
            import _testcapi, os, sys
            code = '''if 1:
                import sys
                sys.activate_stack_trampoline("perf")
                def in_sub(): return 1
                assert in_sub() == 1
                assert sys.is_stack_trampoline_active()
                sys.deactivate_stack_trampoline()
            '''
            sys.activate_stack_trampoline("perf")
            assert _testcapi.run_in_subinterp(code) == 0
            assert sys.is_stack_trampoline_active()
            print(os.getpid())
        """
        out, _ = self.run_checked(script)
        names = read_map(int(out))
        remove_map(int(out))
        self.assertTrue(any(n.startswith("py::in_sub:") for n in names))

    def test_xoption_applies_to_subinterpreters(self):
        script = """
            import _testcapi, os
            code = '''if 1:
                import sys
                assert sys.is_stack_trampoline_active()
                def in_sub_x(): return 1
                in_sub_x()
            '''
            assert _testcapi.run_in_subinterp(code) == 0
            print(os.getpid())
        """
        out, _ = self.run_checked(script, "-X", "perf")
        names = read_map(int(out))
        remove_map(int(out))
        self.assertTrue(any(n.startswith("py::in_sub_x:") for n in names))

    def test_other_code_extra_users_untouched(self):
        # CPython calls every index's free function when a code object
        # with a co_extra block dies, also for empty slots.  Perf mode's
        # blocks must not make another user's free function run for code
        # objects it never touched (test_code's crashed at finalization).
        script = """
            import ctypes, gc
            calls = []
            freefunc = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
            free = freefunc(calls.append)
            request = ctypes.pythonapi._PyEval_RequestCodeExtraIndex
            request.argtypes = (freefunc,)
            request.restype = ctypes.c_ssize_t
            index = request(free)
            for i in range(100):
                exec(f"def fresh{i}(): return {i}\\nfresh{i}()", {})
            gc.collect()
            print(index, len(calls))
        """
        out, _ = self.run_checked(script, "-X", "perf")
        index, calls = map(int, out.split())
        self.assertGreater(index, 0)    # perf mode's index came first
        self.assertEqual(calls, 0)

    def test_custom_eval_frame_refused(self):
        script = """
            import _testinternalcapi, sys
            seen = []
            _testinternalcapi.set_eval_frame_record(seen)
            try:
                for change in (lambda: sys.activate_stack_trampoline("perf"),
                               sys.deactivate_stack_trampoline):
                    try:
                        change()
                    except RuntimeError as exc:
                        print(exc)
            finally:
                _testinternalcapi.set_eval_frame_default()
        """
        out, _ = self.run_checked(script)
        # CPython 3.13's text, for both: the other hook stays.
        self.assertEqual(out.splitlines(), [
            "Trampoline cannot be initialized as a custom eval frame is "
            "already present"] * 2)


class PerfJitTests(unittest.TestCase):
    """-X perf_jit: a jitdump that perf inject --jit turns into ELF files
    with unwinding tables, for perf's DWARF unwinder."""

    def run_checked(self, script, *args, env=None):
        code, out, err = run_python(*args, script=script, env=env)
        self.assertEqual(code, 0, err)
        return out

    def names(self, pid):
        names = [":".join(load["name"].split(":")[:3])
                 for load in read_jitdump(pid)[1]]
        remove_jit_files(pid)
        remove_map(pid)
        return names

    def map_names_and_loads(self, pid):
        """The names of pid's map and the code loads of its dump, both
        checked by their readers; the files are removed."""
        map_names = read_map(pid)
        _, loads = read_jitdump(pid)
        remove_map(pid)
        remove_jit_files(pid)
        return map_names, loads

    def test_chain_with_dwarf_unwinding(self):
        require_perf(self)
        stacks, _ = perf_stacks(SEED, "-X", "perf_jit", dwarf=True,
                                inject=True)
        chains = [py_frames(s) for s in stacks]
        wanted = ["foo", "bar", "baz", "<module>"]
        assert_many_show(self, chains, wanted)
        # perf copies 8 KiB of stack per sample for DWARF unwinding, so
        # deep stacks end early; but a trampoline is always called from C.
        for stack in stacks:
            for caller, callee in zip(stack[1:], stack):
                if callee.startswith("py::"):
                    self.assertFalse(caller.startswith("py::"), stack)

    def test_dump_matches_the_live_trampolines(self):
        script = """
            import ctypes, os, sys
            def probe(): return 1
            probe()
            sys.deactivate_stack_trampoline()   # writes the map out
            with open(f"/tmp/perf-{os.getpid()}.map") as f:
                for line in f:
                    addr, size, name = line.split(" ", 2)
                    addr, size = int(addr, 16), int(size, 16)
                    print(addr, ctypes.string_at(addr, size).hex())
            print(os.getpid())
        """
        out = self.run_checked(script, "-X", "perf_jit")
        *lines, pid = out.split("\n")[:-1]
        live = dict(line.split() for line in lines)
        header, loads = read_jitdump(int(pid))
        names = self.names(int(pid))
        self.assertEqual(header["magic"], JITDUMP_MAGIC)
        self.assertEqual((header["version"], header["size"]), (1, 40))
        self.assertEqual(header["pid"], int(pid))
        self.assertIn(header["elf_mach"], (62, 183))  # x86_64, aarch64
        self.assertIn("py::probe", names)
        self.assertEqual(len(loads), len(live))
        self.assertEqual(len({load["index"] for load in loads}), len(loads))
        for load in loads:
            self.assertEqual(load["pid"], int(pid))
            self.assertEqual(load["code"].hex(), live[str(load["addr"])])
            # .eh_frame: a CIE (id 0) first.
            self.assertEqual(load["unwinding"][4:8], b"\0\0\0\0")

    def test_environment_variable_and_E(self):
        script = """
            import os, sys
            def f(): return 1
            f()
            # perf inject finds the dump by the process's mapping of it.
            with open("/proc/self/maps") as f:
                dump_mapped = f"/tmp/jit-{os.getpid()}.dump" in f.read()
            print(os.getpid(), sys.is_stack_trampoline_active(),
                  dump_mapped)
        """
        env = clean_env(PYTHON_PERF_JIT_SUPPORT="1")
        pid, active, dump = self.run_checked(script, env=env).split()
        self.assertEqual((active, dump), ("True", "True"))
        self.assertIn("py::f", self.names(int(pid)))
        pid, active, dump = self.run_checked(script, "-E", env=env).split()
        self.assertEqual((active, dump), ("False", "False"))
        remove_map(int(pid))

    def test_switching_backends(self):
        script = """
            import os, sys
            def before(): return 1
            def during(): return 2
            def after(): return 3
            sys.activate_stack_trampoline("perf")
            before()
            sys.activate_stack_trampoline("perf_jit")
            during()
            sys.activate_stack_trampoline("perf")
            after()
            print(os.getpid())
        """
        pid = int(self.run_checked(script))
        map_names = read_map(pid)
        names = self.names(pid)
        # A switch to perf_jit fills the dump from the map: "before" ran
        # earlier but is named; after the switch back it gets no more.
        self.assertIn("py::before", names)
        self.assertIn("py::during", names)
        self.assertNotIn("py::after", names)
        self.assertTrue(any(n.startswith("py::after:") for n in map_names))

    def test_cut_and_non_ascii_names_in_a_dump_filled_from_the_map(self):
        # The map's lines of ours become the dump's records as they are,
        # with a name cut to 4,000 bytes and "...", or with characters
        # outside ASCII.
        script = """
            import os, sys
            def long(): return 1
            long.__code__ = long.__code__.replace(co_qualname="L" * 5000)
            def caf\u00e9(): return 2
            sys.activate_stack_trampoline("perf")
            long(), caf\u00e9()
            sys.activate_stack_trampoline("perf_jit")
            print(os.getpid())
        """
        pid = int(self.run_checked(script))
        map_names, loads = self.map_names_and_loads(pid)
        cut = [name for name in map_names if name.startswith("py::LLL")]
        self.assertEqual(len(cut), 1)
        self.assertTrue(cut[0].endswith("..."))
        dump_names = [load["name"] for load in loads]
        self.assertIn(cut[0], dump_names)
        self.assertTrue(any(name.startswith("py::caf\u00e9:")
                            for name in dump_names))

    def test_each_trampoline_once_per_dump(self):
        # Switching back and forth adds to the dump only the trampolines
        # made while it was closed.
        script = """
            import os, sys
            for i in range(10):
                sys.activate_stack_trampoline("perf_jit" if i % 2 else "perf")
                exec(f"def made_{i}(): return {i}\\nmade_{i}()")
            sys.deactivate_stack_trampoline()
            print(os.getpid())
        """
        pid = int(self.run_checked(script))
        map_names, loads = self.map_names_and_loads(pid)
        addrs = [load["addr"] for load in loads]
        self.assertEqual(len(addrs), len(set(addrs)))
        ours = [n for n in map_names if n.startswith("py::")]
        self.assertEqual(len(addrs), len(ours))
        made = [load["name"] for load in loads if "made_" in load["name"]]
        self.assertEqual(len(made), 10)

    def test_fork_child_has_its_own_dump(self):
        script = """
            import os
            def parent_side(): return 1
            parent_side()
            pid = os.fork()
            if pid == 0:
                def child_side(): return 2
                child_side()
                os._exit(0 if wait_for_own_file("jit", b"py::parent_side")
                         else 1)
            assert os.waitpid(pid, 0)[1] == 0
            print(os.getpid(), pid)
        """
        parent, child = map(int, self.run_checked(
            WAIT_FOR_OWN_FILE + textwrap.dedent(script), "-X",
            "perf_jit").split())
        child_header, child_loads = read_jitdump(child)
        child_names = self.names(child)
        parent_names = self.names(parent)
        self.assertEqual(child_header["pid"], child)
        self.assertEqual({load["pid"] for load in child_loads}, {child})
        self.assertIn("py::parent_side", child_names)  # inherited
        self.assertIn("py::child_side", child_names)
        self.assertNotIn("py::child_side", parent_names)

    def test_grandchild_writes_nothing_into_its_parents_dump(self):
        # A child forks before it has its own copy of its parent's lines:
        # the copy is made and written before that fork, and its
        # grandchild has nothing of its parent's to write.
        script = """
            import os
            for i in range(100):
                exec(f"def f{i}(): return {i}\\nf{i}()")
            child = os.fork()
            if child == 0:
                def child_side(): return 1
                child_side()
                grandchild = os.fork()     # at once, before the adoption
                if grandchild == 0:
                    os._exit(0 if wait_for_own_file("jit", b"py::f99")
                             else 1)
                status = os.waitpid(grandchild, 0)[1]
                print(os.getpid(), grandchild, flush=True)
                os._exit(status)
            assert os.waitpid(child, 0)[1] == 0
            print(os.getpid())
        """
        out = self.run_checked(WAIT_FOR_OWN_FILE + textwrap.dedent(script),
                               "-X", "perf_jit")
        (child, grandchild), (parent,) = (map(int, line.split())
                                          for line in out.splitlines())
        for pid in (parent, child, grandchild):
            map_names, loads = self.map_names_and_loads(pid)
            addrs = [load["addr"] for load in loads]
            self.assertEqual(len(addrs), len(set(addrs)), pid)
            self.assertEqual(len(loads), len(map_names), pid)
            self.assertEqual({load["pid"] for load in loads}, {pid})

    def test_startup_failure_warns_and_runs(self):
        # As PerfMapTests' test: a symlink planted at the dump's path of
        # the pid that the exec'd interpreter keeps.
        script = """
            import os, sys
            path = plant_at(f"/tmp/jit-{os.getpid()}.dump")
            os.symlink("/nonexistent", path)
            print(os.getpid(), flush=True)
            os.execv(sys.executable, [sys.executable, "-X", "perf_jit", "-c",
                     "import sys; print('ran', sys.is_stack_trampoline_active())"])
        """
        code, out, err = run_python(
            script=PLANT_AT + textwrap.dedent(script))
        pid, ran = out.splitlines()
        os_helper.unlink(f"/tmp/jit-{pid}.dump")
        remove_map(pid)
        self.assertEqual(code, 0, err)
        self.assertEqual(ran, "ran False")
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("perf support disabled", err)
        self.assertIn("jitdump file", err)
        self.assertIn("symbolic link", err)

    def test_planted_symlink_refused(self):
        script = """
            import os, sys
            path = plant_at(f"/tmp/jit-{os.getpid()}.dump")
            os.symlink("/nonexistent", path)
            try:
                sys.activate_stack_trampoline("perf_jit")
            except OSError as exc:
                print(exc)
            finally:
                os.unlink(path)
            print(sys.is_stack_trampoline_active(), os.getpid())
        """
        message, result = self.run_checked(
            PLANT_AT + textwrap.dedent(script)).splitlines()
        active, pid = result.split()
        remove_map(int(pid))
        self.assertIn("jitdump file /tmp/jit-", message)
        self.assertIn("is a symbolic link", message)
        self.assertEqual(active, "False")


class DeferredLinesTests(unittest.TestCase):
    """Perf mode's lines are buffered and written by a helper thread soon
    after; fork, exit paths and deactivation write them out first."""

    def run_checked(self, script, *args):
        code, out, err = run_python(*args, script=script)
        self.assertEqual(code, 0, err)
        return out

    # 300 new functions, then a wait for their lines in the map of the
    # process, in the process itself: a loop that runs a Python frame
    # (no_idle) in every pass.
    WAIT_FOR_OWN_LINES = """
        import os, time
        src = "\\n".join(f"def idle{i}(): return {i}"
                          for i in range(300))
        exec(src)
        total = sum(globals()[f"idle{i}"]() for i in range(300))
        def not_idle(): return 0
        start = time.monotonic()
        path = f"/tmp/perf-{os.getpid()}.map"
        while time.monotonic() - start < 10:
            not_idle()
            with open(path) as f:
                if f.read().count(" py::idle") == 300:
                    break
            time.sleep(0.0005)
        print(os.getpid(), time.monotonic() - start,
              len(os.listdir("/proc/self/task")))
    """

    def test_short_process_writes_its_lines_itself(self):
        # A process in its first 100 ms of perf mode has no helper thread
        # (a thread costs a short process more than all the rest of perf
        # mode): the hook writes the lines 10 ms after the first of them,
        # while the process runs Python code.
        out = self.run_checked(self.WAIT_FOR_OWN_LINES, "-X", "perf")
        pid, waited, threads = out.split()
        names = read_map(int(pid))
        remove_map(int(pid))
        self.assertEqual(sum(n.startswith("py::idle") for n in names), 300)
        self.assertLess(float(waited), 2.0)
        self.assertEqual(threads, "1")

    def test_lines_reach_the_map_while_idle(self):
        # A process older than that, which makes new code and then waits
        # in C (a service between requests): the helper writes the lines.
        script = """
            import os, sys, time
            time.sleep(0.2)
            src = "\\n".join(f"def idle{i}(): return {i}"
                              for i in range(300))
            exec(src)
            total = sum(globals()[f"idle{i}"]() for i in range(300))
            print(os.getpid(), flush=True)
            sys.stdin.read()
        """
        proc = subprocess.Popen(
            [sys.executable, "-X", "perf", "-c", textwrap.dedent(script)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=clean_env())
        try:
            pid = int(proc.stdout.readline())
            start = time.monotonic()
            while time.monotonic() - start < 10:
                names = read_map(pid)
                if sum(n.startswith("py::idle") for n in names) == 300:
                    break
                time.sleep(0.001)
            waited = time.monotonic() - start
        finally:
            proc.communicate("")
            remove_map(pid)
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(sum(n.startswith("py::idle") for n in names), 300)
        self.assertLess(waited, 2.0)

    def test_short_process_writes_at_its_next_call(self):
        # Due lines go out at the first Python call after the 10 ms, in a
        # service that calls Python only now and then.  The wait for them
        # below calls no Python function.
        script = """
            import os, time
            time.sleep(0.02)    # start-up's lines are due when f0 is made
            exec("\\n".join(f"def f{i}(): return {i}" for i in range(300)))
            total = sum(globals()[f"f{i}"]() for i in range(300))
            def handler(): return 0
            time.sleep(0.02)
            handler()
            path = f"/tmp/perf-{os.getpid()}.map"
            start = time.monotonic()
            data = b""
            while data.count(b" py::f") < 300 and time.monotonic() - start < 5:
                fd = os.open(path, os.O_RDONLY)
                data = os.read(fd, 1 << 20)
                os.close(fd)
                time.sleep(0.001)
            print(os.getpid(), data.count(b" py::f"))
        """
        pid, count = self.run_checked(script, "-X", "perf").split()
        remove_map(int(pid))
        self.assertEqual(count, "300")

    def test_short_process_switching_to_perf_jit(self):
        # Turned on, the dump gets records of the trampolines made before,
        # while the process runs only code that has trampolines already.
        script = WAIT_FOR_OWN_FILE + textwrap.dedent("""
            import os, sys
            def f(): return 1
            f()
            wait_for_own_file("perf", b" py::f:")
            sys.activate_stack_trampoline("perf_jit")
            print(os.getpid(), wait_for_own_file("jit", b"py::f:"))
        """)
        pid, found = self.run_checked(script, "-X", "perf").split()
        remove_map(int(pid))
        os_helper.unlink(f"/tmp/jit-{pid}.dump")
        self.assertEqual(found, "True")

    def test_sub_interpreter_lines_while_main_is_off(self):
        # A sub-interpreter in perf mode ends; the main interpreter, not in
        # perf mode, runs on: its frames do not go through the hook.
        sub = ("import sys\n"
               "sys.activate_stack_trampoline('perf')\n"
               "def in_sub(): return 1\n"
               "in_sub()\n")
        script = WAIT_FOR_OWN_FILE + textwrap.dedent(f"""
            import os, _testcapi
            _testcapi.run_in_subinterp({sub!r})
            print(os.getpid(), wait_for_own_file("perf", b" py::in_sub:"))
        """)
        pid, found = self.run_checked(script).split()
        remove_map(int(pid))
        self.assertEqual(found, "True")

    def assert_named_before_leaving(self, leave):
        """A function run just before leave (a statement that ends the
        process image) is in the map: its buffered line was written."""
        script = f"""
            import os, sys
            def right_before_leaving(): return 1
            right_before_leaving()
            print(os.getpid(), flush=True)
            {leave}
        """
        out = self.run_checked(script, "-X", "perf")
        names = read_map(int(out))
        remove_map(int(out))
        self.assertTrue(any(n.startswith("py::right_before_leaving:")
                            for n in names))

    def test_os_exit_writes_pending_lines(self):
        self.assert_named_before_leaving("os._exit(0)")

    def test_exec_writes_pending_lines(self):
        self.assert_named_before_leaving(
            'os.execv(sys.executable, [sys.executable, "-c", "pass"])')

    def test_children_running_no_python_leave_no_map(self):
        # A child that exits or execs at once copies none of its parent's
        # lines.  One that runs no Python frame (a fork that only calls
        # os._exit()) leaves no file at all; subprocess's child with a
        # preexec_fn runs threading's fork handler, a new trampoline,
        # and its map has just that.
        script = """
            import os
            def warm(): return 1
            warm()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            import subprocess
            proc = subprocess.Popen(["/bin/true"], preexec_fn=os.setsid)
            proc.wait()
            print(os.getpid(), pid, proc.pid)
        """
        start = time.time()
        parent, child, spawned = map(int, self.run_checked(
            script, "-X", "perf").split())
        remove_map(parent)
        self.assertFalse(written_since(map_path(child), start))
        if written_since(map_path(spawned), start):
            names = read_map(spawned)
            remove_map(spawned)
            self.assertFalse([n for n in names if "warm" in n], names)

    def test_child_running_only_inherited_code_has_a_map(self):
        # A pre-fork server's worker may run only code its parent already
        # ran: its map must still name those trampolines, for a perf
        # attached to the worker (perf record -p) to resolve them.  It
        # gets them 10 ms after its first Python frame.
        script = """
            import os
            def handler(): return 1
            handler()
            pid = os.fork()
            if pid == 0:
                handler()
                os._exit(0 if wait_for_own_file("perf", b" py::handler:")
                         else 1)
            _, status = os.waitpid(pid, 0)
            print(os.getpid(), pid, status)
        """
        parent, child, status = map(int, self.run_checked(
            WAIT_FOR_OWN_FILE + textwrap.dedent(script), "-X",
            "perf").split())
        try:
            self.assertEqual(status, 0)
            self.assertTrue(any(n.startswith("py::handler:")
                                for n in read_map(child)))
        finally:
            remove_map(parent)
            remove_map(child)

    def test_forked_children_exiting_at_once(self):
        # Like multiprocessing's fork workers: each child makes a
        # trampoline and leaves with os._exit() or sys.exit() at once.
        script = """
            import os, sys
            def parent_side(): return 0
            parent_side()
            children = []
            for way in ("os._exit", "sys.exit"):
                pid = os.fork()
                if pid == 0:
                    def child_side(): return 1
                    child_side()
                    os._exit(0) if way == "os._exit" else sys.exit(0)
                children.append(pid)
            for pid in children:
                os.waitpid(pid, 0)
            print(os.getpid(), *children)
        """
        out = self.run_checked(script, "-X", "perf")
        parent, *children = map(int, out.split())
        try:
            parent_names = read_map(parent)
            self.assertTrue(any(n.startswith("py::parent_side:")
                                for n in parent_names))
            self.assertFalse(any(n.startswith("py::child_side:")
                                 for n in parent_names))
            for child in children:
                self.assertTrue(any(n.startswith("py::child_side:")
                                    for n in read_map(child)), child)
        finally:
            for pid in (parent, *children):
                remove_map(pid)

    def test_helper_thread_takes_no_signals(self):
        # glibc keeps two signals of its own unblockable; the rest, and
        # certainly those that programs handle, must be blocked.
        script = """
            import os, signal
            handled = [signal.SIGINT, signal.SIGTERM, signal.SIGCHLD,
                       signal.SIGALRM, signal.SIGUSR1, signal.SIGHUP]
            import time
            time.sleep(0.2)     # the helper starts with the next lines
            def f(): return 1
            for _ in range(100):
                f()
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip() != "perf-map-flush":
                        continue
                with open(f"/proc/self/task/{tid}/status") as f:
                    status = dict(line.split(":\\t", 1) for line in f)
                blocked = int(status["SigBlk"], 16)
                print(all(blocked >> (sig - 1) & 1 for sig in handled))
            print(os.getpid())
        """
        out = self.run_checked(script, "-X", "perf")
        blocked, pid = out.split()
        remove_map(int(pid))
        self.assertEqual(blocked, "True")



# What the cycle GC sees of a generator or coroutine while it runs, right
# after a Python call made with other values on its stack and after the
# stack shrank again.  Stock 3.11 hides a running frame's stack from the
# GC (stacktop -1); seeing the depth saved at the call means walking slots
# already popped (and possibly freed).  The values kept in `keep` stay
# alive, so a wrong answer shows as Marker objects instead of a crash.
GC_VIEW_SHAPES = """
import gc

class Marker:
    pass

keep = [Marker() for _ in range(8)]

def callee(*args, **kwargs):
    return 0

def names(referents):
    return sorted(type(r).__name__ for r in referents)

# Each shape makes a call with eight Markers below it on the stack, then
# asks the GC directly (a C call: a Python call in between would store a
# new depth) and yields what the GC saw.
def list_display():
    a, b, c, d, e, f, g, h = keep
    [a, b, c, d, e, f, g, h, callee()]
    yield names(gc.get_referents(running))

def c_call_arguments():
    a, b, c, d, e, f, g, h = keep
    max(id(a), id(b), id(c), id(d), id(e), id(f), id(g), callee(h))
    yield names(gc.get_referents(running))

def in_a_loop():
    a, b, c, d, e, f, g, h = keep
    for i in range(3):
        (a, b, c, d, e, f, g, h, callee(i))
    yield names(gc.get_referents(running))

def comprehension():
    a, b, c, d, e, f, g, h = keep
    (a, b, c, d, e, f, g, [(h, callee(x)) for x in range(3)])
    yield names(gc.get_referents(running))

def keyword_call():
    a, b, c, d, e, f, g, h = keep
    dict(a=a, b=b, c=c, d=d, e=e, f=f, g=g, h=callee(x=h))
    yield names(gc.get_referents(running))

def method_call():
    a, b, c, d, e, f, g, h = keep
    (a, b, c, d, e, f, g, keep.copy().count(callee(h)))
    yield names(gc.get_referents(running))

async def inner():
    a, b, c, d, e, f, g, h = keep
    return (a, b, c, d, e, f, g, callee(h))[7]

async def await_chain():
    a, b, c, d, e, f, g, h = keep
    (a, b, c, d, e, f, g, await inner(), callee())
    return names(gc.get_referents(running))

results = []
for make in (list_display, c_call_arguments, in_a_loop, comprehension,
             keyword_call, method_call):
    running = make()
    results.append((make.__name__, next(running)))
running = await_chain()
try:
    running.send(None)
except StopIteration as stop:
    results.append(("await_chain", stop.value))
print(results)
"""

ASYNCIO_PROGRAM = """
import asyncio
class Msg:
    def __init__(self, i): self.i = i
def parse(i): return i
async def handler(n):
    total = 0
    for i in range(n):
        batch = [Msg(i), Msg(i), Msg(i), Msg(i), Msg(i), Msg(i), parse(i)]
        del batch
        blob = list(map(bytes, range(64)))
        rows = list(zip(range(100)))
        total += len(blob)
        await asyncio.sleep(0)
    return total
async def main():
    r = await asyncio.gather(*(handler(300) for _ in range(20)))
    print("ok", sum(r))
asyncio.run(main())
"""

GENERATOR_PROGRAM = """
class Msg:
    def __init__(self, i): self.i = i
def parse(i): return i
def gen(n):
    for i in range(n):
        batch = [Msg(i), Msg(i), Msg(i), Msg(i), Msg(i), Msg(i), parse(i)]
        del batch
        blob = list(map(bytes, range(64)))
        rows = list(zip(range(100)))
        yield len(blob) + len(rows)
print("ok", sum(gen(6000)))
"""


class MemorySafetyTests(unittest.TestCase):
    """Perf mode keeps the interpreter's invariants: what the GC sees of a
    running frame, and the programs that crashed when it did not."""

    def run_both(self, script, *args):
        results = []
        for mode in ((), ("-X", "perf"), ("-X", "perf_jit")):
            code, out, err = run_python(*mode, *args, script=script)
            self.assertEqual(code, 0, f"{mode}: {err[-2000:]}")
            results.append(out)
        return results

    def test_gc_sees_no_popped_slots(self):
        stock, perf, perf_jit = self.run_both(GC_VIEW_SHAPES)
        self.assertNotIn("Marker", stock)
        self.assertEqual(perf, stock)
        self.assertEqual(perf_jit, stock)

    def test_asyncio_program_under_gc(self):
        for out in self.run_both(ASYNCIO_PROGRAM):
            self.assertEqual(out.strip(), "ok 384000")

    def test_generator_freeing_and_allocating(self):
        for out in self.run_both(GENERATOR_PROGRAM):
            self.assertEqual(out.strip(), "ok 984000")

    def test_small_thread_stacks(self):
        # 32 KiB thread stacks (threading.stack_size's minimum): forking
        # there, filling a jitdump there and the perf-map C API must not
        # need more stack than the thread has.
        script = """
            import ctypes, os, sys, threading
            threading.stack_size(32768)
            def f(): return 1
            def in_thread():
                f()
                pid = os.fork()
                if pid == 0:
                    f()         # the child's first frame copies the map
                    os._exit(0)
                statuses.append(os.waitpid(pid, 0)[1])
                sys.activate_stack_trampoline("perf_jit")
                f()
                sys.activate_stack_trampoline("perf")
                write = ctypes.pythonapi.PyUnstable_WritePerfMapEntry
                write.argtypes = (ctypes.c_void_p, ctypes.c_uint,
                                  ctypes.c_char_p)
                statuses.append(write(0x1000, 16, b"small_stack_entry"))
            statuses = []
            t = threading.Thread(target=in_thread)
            t.start()
            t.join()
            print(os.getpid(), *statuses)
        """
        code, out, err = run_python("-X", "perf", script=script)
        self.assertEqual(code, 0, err)
        pid, *statuses = out.split()
        remove_map(pid)
        remove_jit_files(pid)
        self.assertEqual(statuses, ["0", "0"])

    def test_another_tools_code_extra_never_called(self):
        # A tool (a debugger, say) takes co_extra index 0 in the main
        # interpreter and stores its data on some of the deep-frozen code
        # objects that every interpreter shares; perf mode gets index 1
        # there, and index 0 in a sub-interpreter, which runs that code.
        # The tool's data must be neither called nor overwritten.
        script = """
            import ctypes, importlib._bootstrap as bootstrap, inspect, sys
            import _testcapi
            freefunc = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
            # A C free function: code objects perf mode gives a co_extra
            # block call it (with NULL) as they die, to the very end.
            # Shared code objects never die, and never free the tag.
            ignore = ctypes.cast(ctypes.CDLL(None).free, freefunc)
            api = ctypes.pythonapi
            api._PyEval_RequestCodeExtraIndex.argtypes = (freefunc,)
            api._PyEval_RequestCodeExtraIndex.restype = ctypes.c_ssize_t
            api._PyCode_SetExtra.argtypes = (
                ctypes.py_object, ctypes.c_ssize_t, ctypes.c_void_p)
            api._PyCode_GetExtra.argtypes = (
                ctypes.py_object, ctypes.c_ssize_t,
                ctypes.POINTER(ctypes.c_void_p))
            index = api._PyEval_RequestCodeExtraIndex(ignore)
            shared = [f.__code__ for f in vars(bootstrap).values()
                      if inspect.isfunction(f)]
            assert all(sys.getrefcount(c) > 10**8 for c in shared)
            tagged, untouched = shared[::2], shared[1::2]
            for code in tagged:
                api._PyCode_SetExtra(code, index, 0x1000)
            sys.activate_stack_trampoline("perf")
            sub = "\\n".join(["import sys",
                              "sys.activate_stack_trampoline('perf')",
                              "import json, decimal"])
            assert _testcapi.run_in_subinterp(sub) == 0
            def slot(code):
                data = ctypes.c_void_p()
                api._PyCode_GetExtra(code, index, ctypes.byref(data))
                return data.value
            print([slot(c) for c in tagged] == [0x1000] * len(tagged),
                  [slot(c) for c in untouched] == [None] * len(untouched))
        """
        code, out, err = run_python(script=script)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split(), ["True", "True"])

    def test_python_on_a_fiber_stack(self):
        # makecontext()/swapcontext(), as uWSGI's uGreen and C coroutine
        # libraries run Python: the guard does not know that stack and
        # must not judge it.
        script = """
            import ctypes, sys
            libc = ctypes.CDLL(None)
            UCONTEXT = 4096         # more than sizeof(ucontext_t)
            main_ctx = ctypes.create_string_buffer(UCONTEXT)
            fiber_ctx = ctypes.create_string_buffer(UCONTEXT)
            stack = ctypes.create_string_buffer(1024 * 1024)
            def depth(n):
                return 0 if n == 0 else 1 + depth(n - 1)
            results = []
            @ctypes.CFUNCTYPE(None)
            def on_fiber():
                try:
                    results.append(depth(50))
                except RecursionError as exc:
                    results.append(repr(exc))
            assert libc.getcontext(fiber_ctx) == 0
            # x86_64 and aarch64 glibc: uc_link at 8, uc_stack at 16
            # (ss_sp, ss_flags, ss_size).
            ctypes.c_void_p.from_buffer(fiber_ctx, 8).value = \\
                ctypes.addressof(main_ctx)
            ctypes.c_void_p.from_buffer(fiber_ctx, 16).value = \\
                ctypes.addressof(stack)
            ctypes.c_size_t.from_buffer(fiber_ctx, 32).value = len(stack)
            libc.makecontext(fiber_ctx, on_fiber, 0)
            assert libc.swapcontext(main_ctx, fiber_ctx) == 0
            print(results)
        """
        for mode in ((), ("-X", "perf")):
            code, out, err = run_python(*mode, script=script)
            self.assertEqual(code, 0, err)
            self.assertEqual(out.strip(), "[50]", mode)

    def test_fork_from_a_thread_then_recurse(self):
        # The child of a fork() made by a non-main thread has that thread
        # as its only one (its id is the child's pid) on a thread stack:
        # deep recursion there must end in RecursionError.
        script = """
            import os, sys, threading
            threading.stack_size(512 * 1024)
            def depth(n):
                return 0 if n == 0 else 1 + depth(n - 1)
            def forker():
                pid = os.fork()
                if pid == 0:
                    sys.activate_stack_trampoline("perf")
                    sys.setrecursionlimit(1_000_000)
                    try:
                        depth(1_000_000)
                    except RecursionError:
                        os._exit(7)
                    os._exit(1)
                status.append(os.waitstatus_to_exitcode(
                    os.waitpid(pid, 0)[1]))
            status = []
            t = threading.Thread(target=forker)
            t.start()
            t.join()
            print(*status)
        """
        code, out, err = run_python(script=script)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), "7")


if __name__ == "__main__":
    unittest.main()
