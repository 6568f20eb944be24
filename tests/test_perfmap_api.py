"""The PyUnstable perf-map C API, through a test extension built against
the patched headers (tests/perfmap/perfmap_ext.c)."""

import os
import shutil
import sysconfig
import tempfile
import textwrap
import unittest

from support import (PATCHED, ROOT, clean_env, include_flags, python,
                     read_map_entries, run)
from test.test_perf_profiler import read_jitdump, remove_jit_files

API = ["PyUnstable_PerfMapState_Init", "PyUnstable_WritePerfMapEntry",
       "PyUnstable_PerfMapState_Fini", "PyUnstable_CopyPerfMapFile",
       "PyUnstable_PerfTrampoline_CompileCode",
       "PyUnstable_PerfTrampoline_SetPersistAfterFork"]
def read_map(pid):
    """{name: [(addr, size), ...]} of pid's map, which is removed."""
    entries = {}
    for entry in read_map_entries(pid, remove=True):
        entries.setdefault(entry.name, []).append((entry.addr, entry.size))
    return entries


class PerfMapAPITests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        run(["gcc", "-shared", "-fPIC", "-O2", "-pthread",
             "-o", os.path.join(cls.tmp, "perfmap_ext" + suffix),
             os.path.join(ROOT, "tests", "perfmap", "perfmap_ext.c"),
             *include_flags(PATCHED)])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def run_script(self, script, *args, timeout=None):
        code = (f"import sys; sys.path.insert(0, {self.tmp!r})\n"
                + textwrap.dedent(script))
        return run([python(PATCHED), *args, "-c", code],
                   env=clean_env(), timeout=timeout).stdout

    def dump_loads(self, pid):
        """The code loads of pid's dump (read_jitdump() checks its
        records); the dump and the map, which holds copied lines that
        read_map() would refuse, are removed."""
        try:
            return read_jitdump(pid)[1]
        finally:
            remove_jit_files(pid)
            os.unlink(f"/tmp/perf-{pid}.map")

    def test_symbols_exported(self):
        symbols = run(["nm", "-D", "--defined-only",
                       python(PATCHED)]).stdout.split()
        for name in API:
            self.assertIn(name, symbols)

    def test_eight_threads_without_gil_and_perf_mode(self):
        out = self.run_script("""
            import os, threading, perfmap_ext
            result = {}
            def write():
                result["failures"] = perfmap_ext.write_many(8, 100_000)
            t = threading.Thread(target=write)
            t.start()
            n = 0
            while t.is_alive() or n < 100:   # trampolines meanwhile
                exec(compile(f"def g{n}(): return {n}\\ng{n}()", "<g>",
                             "exec"))
                n += 1
            t.join()
            print(os.getpid(), result["failures"], n)
        """, "-X", "perf")
        pid, failures, made = map(int, out.split())
        self.assertEqual(failures, 0)
        entries = read_map(pid)
        ext = {name: places for name, places in entries.items()
               if name.startswith("ext::")}
        self.assertEqual(len(ext), 800_000)
        for t in range(8):
            for i in (0, 1, 54_321, 99_999):
                self.assertEqual(ext[f"ext::t{t}_{i}"],
                                 [(0x100000000 * (t + 1) + 16 * i, 16)])
        self.assertTrue(all(len(places) == 1 for places in ext.values()))
        for n in range(made):
            self.assertIn(f"py::g{n}:<g>", entries)

    def test_init_fini_cycles(self):
        out = self.run_script("""
            import os, perfmap_ext
            for cycle in range(3):
                assert perfmap_ext.init() == (0, 0)
                assert perfmap_ext.write(0x1000 + cycle, 8,
                                         b"ext::cycle%d" % cycle)[0] == 0
                perfmap_ext.fini()
            perfmap_ext.fini()   # twice is harmless
            print(os.getpid())
        """)
        entries = read_map(int(out))
        self.assertEqual(sorted(entries),
                         ["ext::cycle0", "ext::cycle1", "ext::cycle2"])

    def test_hostile_names(self):
        out = self.run_script("""
            import os, perfmap_ext
            for name in (b"new\\nline", b"bad\\xffutf8", b"ctl\\x01\\x7f",
                         b"x" * 100_000, "caf\\u00e9".encode()):
                assert perfmap_ext.write(0x2000, 4, name)[0] == 0
            print(os.getpid())
        """)
        names = list(read_map(int(out)))
        self.assertEqual(len(names), 5)
        self.assertIn(r"new\x0aline", names)
        self.assertIn(r"bad\xffutf8", names)
        self.assertIn(r"ctl\x01\x7f", names)
        self.assertIn("caf\u00e9", names)
        self.assertTrue(any(n.startswith("xxx") and n.endswith("...")
                            and len(n) < 5000 for n in names))

    def test_copy_after_fork(self):
        out = self.run_script("""
            import errno, os, perfmap_ext
            assert perfmap_ext.write(0x3000, 4, b"ext::parent")[0] == 0
            parent = f"/tmp/perf-{os.getpid()}.map"
            pid = os.fork()
            if pid == 0:
                ok = perfmap_ext.copy_file(parent) == (0, 0)
                ok &= perfmap_ext.write(0x4000, 4, b"ext::child")[0] == 0
                ok &= perfmap_ext.copy_file("/nonexistent") == (-1,
                                                              errno.ENOENT)
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            print(os.getpid(), pid, status)
        """)
        parent, child, status = map(int, out.split())
        self.assertEqual(status, 0)
        parent_entries = read_map(parent)
        child_entries = read_map(child)
        self.assertEqual(list(parent_entries), ["ext::parent"])
        self.assertIn("ext::parent", child_entries)
        self.assertIn("ext::child", child_entries)

    def test_copied_lines_naming_our_trampolines(self):
        # A copied file's lines get into the dump of a later perf_jit if
        # they name one of our trampolines as we do.  An empty line must
        # not make the next line's number this one's, and a name longer
        # than ours can be must not get in (it once overran the dump's
        # buffer and hung the process), nor one with control characters
        # (a NUL made a record the dump's readers reject).
        out = self.run_script("""
            import os, sys, perfmap_ext
            sys.activate_stack_trampoline("perf")
            def mine(): return 1
            mine()
            sys.deactivate_stack_trampoline()
            pid = os.getpid()
            with open(f"/tmp/perf-{pid}.map") as f:
                addr = next(line.split()[0] for line in f
                            if line.split()[2].startswith("py::mine:"))
            copied = f"/tmp/perfmap-copied-{pid}.txt"
            with open(copied, "w") as f:
                f.write(f"\\n{addr} 8 py::copied\\n")
                f.write(f" {addr} 8 py::blank_first\\n")
                f.write(f"{addr}  8 py::two_blanks\\n")
                for ctl in ("\\0", "\\t", "\\r", "\\x7f"):
                    f.write(f"{addr} 8 py::control{ctl}char\\n")
                for i in range(40):
                    f.write(f"{addr} 8 py::{'L' * 20_000}\\n")
                f.write(f"0x{addr} 0x8 py::hex_prefix\\n")
                f.write(f"{addr.upper()} 8 py::upper_case\\n")
                f.write(f"0{addr} 8 py::leading_zero\\n")
            with open(copied, "ab") as f:
                a = addr.encode()
                f.write(a + b" 8 py::invalid_utf8\\xff\\xfe\\n")
                f.write(a + b" 8 py::c1_control\\xc2\\x85\\n")
                f.write(a + b" 8 py::overlong\\xc1\\xbf\\n")
                f.write(a + b" 8 py::surrogate\\xed\\xa0\\x80\\n")
                f.write(a + b" 8 py::fine\\xc2\\xa0\\xe2\\x82\\xac\\n")
            assert perfmap_ext.copy_file(copied) == (0, 0)
            os.unlink(copied)
            sys.activate_stack_trampoline("perf_jit")
            def later(): return 2
            later()
            sys.deactivate_stack_trampoline()
            print(pid)
        """, timeout=60)
        loads = self.dump_loads(int(out))
        names = sorted(load["name"].split(":")[2] for load in loads)
        self.assertEqual(names, ["copied", "fine\u00a0\u20ac", "later",
                                 "mine"])
        addrs = {load["name"].split(":")[2]: load["addr"] for load in loads}
        self.assertEqual(addrs["copied"], addrs["mine"])

    def test_lines_copied_while_perf_jit_is_on(self):
        # They reach the open dump at once, as they would a later one.
        out = self.run_script("""
            import os, sys, perfmap_ext
            sys.activate_stack_trampoline("perf_jit")
            def mine(): return 1
            mine()
            pid = os.getpid()
            sys.deactivate_stack_trampoline()   # writes the map
            sys.activate_stack_trampoline("perf_jit")
            with open(f"/tmp/perf-{pid}.map") as f:
                addr = next(line.split()[0] for line in f
                            if line.split()[2].startswith("py::mine:"))
            copied = f"/tmp/perfmap-copied-{pid}.txt"
            with open(copied, "w") as f:
                f.write(f"{addr} 8 py::copied_while_on\\n")
            assert perfmap_ext.copy_file(copied) == (0, 0)
            os.unlink(copied)
            sys.deactivate_stack_trampoline()
            print(pid)
        """, timeout=60)
        loads = self.dump_loads(int(out))
        names = [load["name"] for load in loads]
        self.assertEqual(names.count("py::copied_while_on"), 1, names)

    def test_compile_code_before_first_run(self):
        for args in (("-X", "perf"), ()):
            with self.subTest(args=args):
                out = self.run_script("""
                    import os, perfmap_ext
                    ns = {}
                    exec(compile("def fresh(): return 7", "<fresh>", "exec"),
                         ns)
                    perfmap_ext.compile_code(ns["fresh"].__code__)
                    perfmap_ext.compile_code(ns["fresh"].__code__)  # once
                    assert ns["fresh"]() == 7
                    assert perfmap_ext.set_persist(True) == 0
                    print(os.getpid())
                """, *args)
                entries = read_map(int(out))
                self.assertEqual(len(entries["py::fresh:<fresh>"]), 1)


if __name__ == "__main__":
    unittest.main()
