"""Perf mode under stress: threads while it is toggled, multiprocessing
under a real perf record, a million code objects, signals with tracing
and profiling, fork from a thread, exec.  Each test is bounded well under
a minute on the 2-core CI machine."""

import glob
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import unittest

from support import PATCHED, clean_env, python, read_map_entries, sanitized
from test.test_perf_profiler import require_perf



def run_script(script, *args, env=None, timeout=120):
    proc = subprocess.run([python(PATCHED), *args, "-c",
                           textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env())
    return proc


def map_names(pid):
    """The names in pid's map, which is removed."""
    return [entry.name for entry in read_map_entries(pid, remove=True)]


class StressTests(unittest.TestCase):

    def checked(self, script, *args, env=None):
        proc = run_script(script, *args, env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stderr, "")
        return proc.stdout

    def test_toggling_while_eight_threads_run(self):
        out = self.checked("""
            import os, sys, threading, time
            stop = threading.Event()
            def fib(n):
                return n if n < 2 else fib(n - 1) + fib(n - 2)
            def work(k):
                rounds = 0
                while not stop.is_set():
                    ns = {}
                    exec(f"def fresh_{k}_{rounds}(x): return fib(x)", 
                         {"fib": fib}, ns)
                    assert ns[f"fresh_{k}_{rounds}"](12) == 144
                    rounds += 1
                results[k] = rounds
            results = [0] * 8
            threads = [threading.Thread(target=work, args=(k,))
                       for k in range(8)]
            for t in threads:
                t.start()
            for _ in range(1000):
                sys.activate_stack_trampoline("perf")
                time.sleep(0.0005)      # the threads run in perf mode
                sys.deactivate_stack_trampoline()
            stop.set()
            for t in threads:
                t.join()
            print(os.getpid(), min(results), sum(results))
        """)
        pid, fewest, total = map(int, out.split())
        entries = read_map_entries(pid, remove=True)
        self.assertGreater(fewest, 0)
        names = [entry.name for entry in entries]
        self.assertIn("py::fib:<string>", names)
        # Every thread made trampolines while perf mode was on, and each
        # code object got one: no address is named twice.
        for k in range(8):
            with self.subTest(thread=k):
                self.assertTrue(any(name.startswith(f"py::fresh_{k}_")
                                    for name in names))
        fresh = [name for name in names if name.startswith("py::fresh_")]
        self.assertEqual(len(fresh), len(set(fresh)))
        self.assertLessEqual(len(fresh), total)
        self.assertEqual(len({entry.addr for entry in entries}),
                         len(entries))
        self.assertEqual(len({entry.size for entry in entries}), 1)

    def test_multiprocessing_workers_resolve_in_their_own_maps(self):
        require_perf(self)
        script = """
            import multiprocessing, os, sys
            def worker_task(n):
                total = 0
                for i in range(n):
                    total += i % 7
                return os.getpid(), total
            if __name__ == "__main__":
                multiprocessing.set_start_method(sys.argv[1])
                with multiprocessing.Pool(2) as pool:
                    results = pool.map(worker_task, [1_500_000] * 4)
                print(" ".join(str(pid) for pid in {p for p, _ in results}))
        """
        for method in ("fork", "forkserver", "spawn"):
            with self.subTest(method=method):
                self.check_pool(script, method)

    def check_pool(self, script, method):
        maps_before = set(glob.glob("/tmp/perf-*.map"))
        try:
            self.check_pool_maps(script, method)
        finally:
            # The pool's helpers (fork server, resource tracker) run with
            # perf support too and leave their maps.
            for path in set(glob.glob("/tmp/perf-*.map")) - maps_before:
                os.unlink(path)

    def check_pool_maps(self, script, method):
        with tempfile.TemporaryDirectory() as tmp:
            script_file = os.path.join(tmp, "pool.py")
            with open(script_file, "w") as f:
                f.write(textwrap.dedent(script))
            data = os.path.join(tmp, "perf.data")
            rec = subprocess.run(
                ["perf", "record", "-F", "999", "-g", "-o", data, "--",
                 python(PATCHED), script_file, method],
                capture_output=True, text=True, timeout=120,
                env=clean_env(PYTHONPERFSUPPORT="1"))
            self.assertEqual(rec.returncode, 0, rec.stderr)
            workers = {int(pid) for pid in rec.stdout.split()}
            rep = subprocess.run(["perf", "script", "-F", "pid,ip,sym",
                                  "-i", data], capture_output=True,
                                 text=True, errors="replace")
        resolved = {}
        for block in rep.stdout.split("\n\n"):
            lines = block.strip().splitlines()
            if lines and lines[0].strip().isdigit():
                pid = int(lines[0])
                if any("py::worker_task:" in line for line in lines[1:]):
                    resolved[pid] = resolved.get(pid, 0) + 1
        for pid in workers:
            self.assertGreater(resolved.get(pid, 0), 10,
                               f"{method} worker {pid}: {resolved}")
            self.assertTrue(any("py::worker_task:" in name
                                for name in map_names(pid)))

    def test_hostile_names_under_perf(self):
        # A qualname with a newline, run from a file whose name is not
        # UTF-8: perf script must show one clean symbol for it.
        require_perf(self)
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(os.fsencode(tmp), b"bad\xff\xfe.py")
            with open(script, "w") as f:
                f.write(textwrap.dedent("""
                    def spin(n):
                        total = 0
                        for i in range(n):
                            total += i
                        return total
                    spin.__code__ = spin.__code__.replace(
                        co_qualname="new\\nline")
                    spin(3_000_000)
                    import os; print(os.getpid())
                """))
            data = os.path.join(tmp, "perf.data")
            rec = subprocess.run(
                [b"perf", b"record", b"-F", b"999", b"-g", b"-o",
                 os.fsencode(data), b"--", os.fsencode(python(PATCHED)),
                 b"-X", b"perf", script],
                capture_output=True, env=clean_env(), timeout=60)
            self.assertEqual(rec.returncode, 0, rec.stderr)
            rep = subprocess.run(["perf", "script", "-F", "ip,sym", "-i",
                                  data], capture_output=True)
            map_names(int(rec.stdout.split()[-1]))
        symbols = [line.split(None, 1)[1] for line in
                   rep.stdout.decode("utf-8").splitlines()
                   if len(line.split(None, 1)) == 2]
        expected = "py::new\\x0aline:" + tmp + "/bad\\xff\\xfe.py"
        self.assertGreater(symbols.count(expected), 10)

    def test_a_million_code_objects(self):
        # Fresh code objects, each run once and dropped: per code object
        # the arena grows by one trampoline and the map by one line, in
        # time that does not grow with their number.
        out = self.checked("""
            import os, time, types
            template = compile("def f(): return 1", "<gen>", "exec")
            template = template.co_consts[0]
            def exec_range(start, stop):
                g = {}
                t0 = time.perf_counter()
                for i in range(start, stop):
                    name = f"gen{i}"
                    code = template.replace(co_name=name, co_qualname=name)
                    assert types.FunctionType(code, g)() == 1
                return time.perf_counter() - t0
            def exec_arena_bytes():
                total = 0
                with open("/proc/self/maps") as f:
                    for line in f:
                        fields = line.split()
                        if fields[1] == "r-xp" and len(fields) == 5:
                            lo, hi = (int(x, 16) for x in fields[0].split("-"))
                            total += hi - lo
                return total
            def rss():
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            return int(line.split()[1]) * 1024
            path = f"/tmp/perf-{os.getpid()}.map"
            exec_range(0, 1000)             # warm up
            base_arena, base_rss = exec_arena_bytes(), rss()
            done = 1000
            for stop in (10_000, 100_000, 1_000_000):
                seconds = exec_range(done, stop)
                print("step", stop, (seconds / (stop - done)) * 1e9)
                done = stop
            import sys
            sys.deactivate_stack_trampoline()   # writes pending lines
            print("arena", (exec_arena_bytes() - base_arena) / 999_000)
            print("rss", (rss() - base_rss) / 999_000)
            print("map", os.path.getsize(path), os.getpid())
        """, "-X", "perf")
        steps = {int(m[1]): float(m[2])
                 for m in re.finditer(r"step (\d+) (\S+)", out)}
        arena = float(re.search(r"arena (\S+)", out)[1])
        rss = float(re.search(r"rss (\S+)", out)[1])
        map_size, pid = map(int, re.search(r"map (\d+) (\d+)", out).groups())
        lines = map_names(pid)
        print(f"\n  ns per code object: {steps}; arena bytes per code "
              f"object {arena:.1f}; RSS bytes per code object {rss:.1f}; "
              f"map {map_size} bytes, {len(lines)} lines",
              file=sys.stderr)
        self.assertGreaterEqual(len(lines), 1_000_000)
        # One trampoline (16 or 32 bytes) and change per code object.
        self.assertLess(arena, 40)
        if not sanitized(PATCHED):
            # AddressSanitizer keeps freed memory in quarantine.
            self.assertLess(rss, 200)
        # Flat: the last 900,000 cost per object what the 9,000 did.
        self.assertLess(steps[1_000_000], 3 * steps[10_000])

    def test_signals_tracing_and_profiling_together(self):
        out = self.checked("""
            import signal, sys
            handled = 0
            def on_alarm(signum, frame):
                global handled
                handled += 1
                return sum(range(10))
            signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
            def fib(n):
                return n if n < 2 else fib(n - 1) + fib(n - 2)
            events = []
            def tracer(frame, event, arg):
                events.append(event)
                return tracer
            results = [fib(18)]
            sys.settrace(tracer)
            results.append(fib(14))
            sys.settrace(None)
            sys.setprofile(lambda frame, event, arg: events.append(event))
            results.append(fib(14))
            sys.setprofile(None)
            while handled < 20:
                results.append(fib(15))
            signal.setitimer(signal.ITIMER_REAL, 0)
            print(results[:3], handled >= 20, len(events) > 1000)
            import os; print(os.getpid())
        """, "-X", "perf")
        result, pid = out.splitlines()
        self.assertEqual(result, "[2584, 377, 377] True True")
        self.assertTrue(any(name.startswith("py::on_alarm:")
                            for name in map_names(int(pid))))

    def test_fork_from_a_thread(self):
        out = self.checked("""
            import os, sys, threading
            def in_child(): return 5
            def forker():
                pid = os.fork()
                if pid == 0:
                    in_child()
                    os._exit(0)
                _, status = os.waitpid(pid, 0)
                children.append((pid, status))
            children = []
            t = threading.Thread(target=forker)
            t.start(); t.join()
            (child, status), = children
            print(os.getpid(), child, status)
        """, "-X", "perf")
        parent, child, status = map(int, out.split())
        self.assertEqual(status, 0)
        self.assertIn("py::in_child:<string>", map_names(child))
        # The parent names what it ran, and not the child's function: the
        # child wrote only to its own map.
        parent_names = map_names(parent)
        self.assertIn("py::forker:<string>", parent_names)
        self.assertNotIn("py::in_child:<string>", parent_names)

    def test_exec_leaves_no_map_descriptor(self):
        out = self.checked("""
            import os
            def before_exec(): return 1
            before_exec()
            print(os.getpid(), flush=True)
            os.execv("/bin/sh", ["sh", "-c",
                     "for fd in /proc/$$/fd/*; do readlink $fd; done; true"])
        """, "-X", "perf")
        pid, *targets = out.split()
        self.assertFalse([t for t in targets if "perf-" in t], targets)
        # os.execv() wrote the buffered line first.
        self.assertIn("py::before_exec:<string>", map_names(int(pid)))


if __name__ == "__main__":
    unittest.main()
