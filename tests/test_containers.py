"""perf and a patched interpreter in a container, profiled from the host.

The container: new pid and mount namespaces with a tmpfs of its own on
/tmp (unshare --pid --mount --fork --mount-proc), so the process writes
/tmp/perf-1.map where the host cannot see it by that name; or only a
mount namespace with its own /tmp, as a systemd service with
PrivateTmp=yes.  perf record -g -p HOSTPID from outside.  While the
process runs, perf reads the map inside the container; once it is gone,
only a copy made by `Tools/perf/perf_files.py export` names its
functions.  Needs root (namespaces, mounts, perf of any process)."""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

from support import BUILD, PATCHED, ROOT, clean_env, python
from test.test_perf_profiler import (
    SEED, assert_many_show, inject_jit, parse_perf_script, py_frames,
    read_jitdump, remove_jit_files, remove_map, require_perf)

PERF_FILES = os.path.join(ROOT, "Tools", "perf", "perf_files.py")
REPORT_EXCERPT = os.path.join(ROOT, "driver", "report_excerpt.py")
# The seed example (baz calls bar calls foo), going on for argv[1] seconds
# so that perf can attach to it.
LOOP = SEED + """
import sys, time
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    baz(300_000)
"""
# The container's first process: its own /tmp, then the command.
PRIVATE_TMP = 'mount -t tmpfs -o mode=1777 tmpfs /tmp && exec "$@"'


def setUpModule():
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root: namespaces, a tmpfs mount and "
                                "perf record -p of another namespace")
    if shutil.which("unshare") is None:
        raise unittest.SkipTest("needs unshare (util-linux)")
    probe = subprocess.run(["unshare", "--pid", "--mount", "--fork",
                            "--mount-proc", "sh", "-c", PRIVATE_TMP, "sh",
                            "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise unittest.SkipTest(f"cannot make a container here: "
                                f"{probe.stderr.strip()}")


def run_tool(*args):
    return subprocess.run([sys.executable, PERF_FILES, *args],
                          capture_output=True, text=True)


def wait_for(predicate, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ppid ...": comm may hold anything.
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid):
    return [int(name) for name in os.listdir("/proc")
            if name.isdigit() and parent_of(name) == pid]


class Container:
    """command in new namespaces with a tmpfs of its own on /tmp: pid and
    mount namespaces, or with pidns=False a mount namespace only."""

    def __init__(self, test, *command, pidns=True):
        flags = ["--pid", "--fork", "--mount-proc"] if pidns else []
        self.proc = subprocess.Popen(
            ["unshare", "--mount", *flags, "sh", "-c", PRIVATE_TMP, "sh",
             *command],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=clean_env())
        test.addCleanup(self.stop)
        if pidns:
            # unshare forks; its child is pid 1 of the new namespace.
            wait_for(lambda: children_of(self.proc.pid), "the container")
            self.pid = children_of(self.proc.pid)[0]
        else:
            self.pid = self.proc.pid
        self.nspid = 1 if pidns else self.pid
        self.park_leftovers(test)

    def park_leftovers(self, test):
        """Set aside, until the test ends, the files that an earlier process
        with the container's host pid left in this /tmp: the tests check
        what export puts there."""
        for name in (f"perf-{self.pid}.map", f"jit-{self.pid}.dump"):
            path = os.path.join("/tmp", name)
            if os.path.lexists(path):
                parked = path + ".parked-by-test_containers"
                os.rename(path, parked)
                test.addCleanup(os.replace, parked, path)

    def tmp_path(self, name):
        """name in the container's /tmp, as the host reaches it."""
        return f"/proc/{self.pid}/root/tmp/{name}"

    def wait_for_file(self, name, text=None):
        def ready():
            try:
                with open(self.tmp_path(name), "rb") as f:
                    return text is None or text in f.read()
            except OSError:
                return False
        wait_for(ready, f"{name} in the container")

    def wait_for_map(self):
        self.wait_for_file(f"perf-{self.nspid}.map", b"py::foo:")

    def command(self):
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return None

    def running(self):
        return self.proc.poll() is None

    def wait(self):
        self.proc.wait(timeout=60)
        self.proc.stderr.close()

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc.stderr.close()


class ContainerTests(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        # Outside /tmp: the container has its own.
        cls.dir = tempfile.mkdtemp(dir=BUILD, prefix="containers-")
        cls.script = os.path.join(cls.dir, "seed_loop.py")
        with open(cls.script, "w") as f:
            f.write(LOOP)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir)

    def setUp(self):
        self.out = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.out)

    def start(self, seconds, backend="perf", pidns=True):
        container = Container(self, python(PATCHED), "-X", backend,
                              self.script, str(seconds), pidns=pidns)
        container.wait_for_map()
        return container

    def record(self, pid, seconds, dwarf=False):
        data = os.path.join(self.out, f"perf-{pid}.data")
        unwinding = ["-F", "499", "--call-graph", "dwarf", "-k", "1"] \
            if dwarf else ["-F", "999", "-g"]
        proc = subprocess.run(
            ["perf", "record", "-q", *unwinding, "-p", str(pid), "-o", data,
             "--", "sleep", str(seconds)], capture_output=True, text=True)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return data

    def report_chain(self, data):
        """The entry of perf report that shows baz -> bar -> foo (empty
        when none does) and the whole report."""
        report = subprocess.run(
            ["perf", "report", "--stdio", "-n", "-g", "caller",
             "--no-children", "-i", data],
            capture_output=True, text=True, errors="replace")
        self.assertEqual(report.returncode, 0, report.stderr)
        path = data + ".report"
        with open(path, "w") as f:
            f.write(report.stdout)
        excerpt = subprocess.run([sys.executable, REPORT_EXCERPT, path],
                                 capture_output=True, text=True)
        return excerpt.stdout, report.stdout

    def chains(self, data):
        script = subprocess.run(
            ["perf", "script", "-F", "comm,pid,ip,sym", "-i", data],
            capture_output=True, text=True, errors="replace")
        self.assertEqual(script.returncode, 0, script.stderr)
        return [py_frames(stack)
                for stack in parse_perf_script(script.stdout)]

    def test_report_while_running_and_after_export(self):
        require_perf(self)
        container = self.start(5)
        host_map = f"/tmp/perf-{container.pid}.map"
        self.addCleanup(remove_map, container.pid)
        # Copies the map, complete, once the process has exited.
        exporter = subprocess.Popen(
            [sys.executable, PERF_FILES, "export", "--wait",
             str(container.pid)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(exporter.wait)
        self.addCleanup(exporter.kill)

        data = self.record(container.pid, 2)
        self.assertTrue(container.running())
        # (a) While it runs perf reads /tmp/perf-1.map in the container:
        # there is no copy on the host yet.
        self.assertFalse(os.path.exists(host_map))
        excerpt, _ = self.report_chain(data)
        self.assertIn(f"py::baz:{self.script}", excerpt)

        # A copy now holds what the map holds now, in whole lines.
        proc = run_tool("export", str(container.pid))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertRegex(proc.stdout,
                         rf"process {container.pid} \(pid 1 in its "
                         rf"namespace\): perf-1.map -> {host_map} "
                         rf"\(created, \d+ bytes\)")
        st = os.stat(host_map)
        self.assertEqual((st.st_mode & 0o777, st.st_uid), (0o600, 0))
        with open(host_map, "rb") as f:
            early = f.read()
        with open(container.tmp_path("perf-1.map"), "rb") as f:
            self.assertTrue(f.read().startswith(early))
        self.assertTrue(early.endswith(b"\n"))

        # (b) After it exited: the copy names the functions.
        container.wait()
        out, err = exporter.communicate(timeout=60)
        self.assertEqual(exporter.returncode, 0, err)
        self.assertIn(f"perf-1.map -> {host_map} (replaced, ", out)
        with open(host_map, "rb") as f:
            self.assertTrue(f.read().startswith(early))
        excerpt, _ = self.report_chain(data)
        self.assertIn(f"py::baz:{self.script}", excerpt)

        # The control: without the copy, only addresses.
        os.rename(host_map, host_map + ".aside")
        try:
            excerpt, report = self.report_chain(data)
        finally:
            os.rename(host_map + ".aside", host_map)
        self.assertEqual(excerpt, "")
        self.assertNotIn("py::", report)

    def test_jitdump_in_a_pid_namespace(self):
        # perf inject reads the dump in the container while the process
        # runs; export leaves it, as perf 6.1 cannot use a copy after the
        # process has gone.  perf report still names the injected code
        # afterwards, from perf's build-id cache.
        require_perf(self)
        container = self.start(4, backend="perf_jit")
        self.addCleanup(remove_map, container.pid)
        data = self.record(container.pid, 1, dwarf=True)
        injected = inject_jit(data)
        assert_many_show(self, self.chains(injected), ["foo", "bar", "baz"])
        proc = run_tool("export", str(container.pid))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("jit-1.dump not copied: perf inject reads a "
                      "container's dump only while the process runs",
                      proc.stdout)
        self.assertFalse(os.path.exists(f"/tmp/jit-{container.pid}.dump"))
        container.wait()
        assert_many_show(self, self.chains(injected), ["foo", "bar", "baz"])

    def test_jitdump_with_only_a_private_tmp(self):
        # Same pid namespace (a systemd service with PrivateTmp=yes): the
        # exported dump is the one perf inject reads after the process has
        # exited, /tmp/jit-PID.dump.
        require_perf(self)
        container = self.start(3, backend="perf_jit", pidns=False)
        pid = container.pid
        self.addCleanup(remove_map, pid)
        self.addCleanup(remove_jit_files, pid)
        exporter = subprocess.Popen(
            [sys.executable, PERF_FILES, "export", "--wait", str(pid)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(exporter.wait)
        self.addCleanup(exporter.kill)
        data = self.record(pid, 1, dwarf=True)
        container.wait()
        out, err = exporter.communicate(timeout=60)
        self.assertEqual(exporter.returncode, 0, err)
        self.assertIn(f"process {pid}: perf-{pid}.map -> /tmp/perf-{pid}.map "
                      f"(created, ", out)
        self.assertIn(f"process {pid}: jit-{pid}.dump -> /tmp/jit-{pid}.dump "
                      f"(created, ", out)
        header, loads = read_jitdump(pid)
        self.assertEqual(header["pid"], pid)
        self.assertIn("py::foo:" + self.script,
                      [load["name"] for load in loads])
        assert_many_show(self, self.chains(inject_jit(data)),
                         ["foo", "bar", "baz"])

    def test_export_refuses_what_the_container_planted(self):
        # A hostile container controls its /tmp: nothing there is
        # followed, and only a regular file with one link, of the
        # process's owner, is copied.
        plants = {
            "ln -s /etc/shadow /tmp/perf-1.map":
                "perf-1.map is a symbolic link: not followed",
            "echo x > /tmp/x && ln /tmp/x /tmp/perf-1.map":
                "perf-1.map has other hard links",
            "mkfifo /tmp/perf-1.map": "perf-1.map is not a regular file",
            "echo x > /tmp/perf-1.map && chown nobody /tmp/perf-1.map":
                "perf-1.map belongs to uid "
                f"{pwd.getpwnam('nobody').pw_uid}, not to the process",
        }
        for plant, reason in plants.items():
            with self.subTest(plant=plant):
                container = Container(self, "sh", "-c",
                                      plant + " && exec sleep 60")
                wait_for(lambda: os.path.lexists(
                    container.tmp_path("perf-1.map")), "the planted file")
                proc = run_tool("export", "--dir", self.out,
                                str(container.pid))
                self.assertEqual(proc.returncode, 1)
                self.assertIn(f"perf_files.py: {reason}", proc.stderr)
                self.assertEqual(os.listdir(self.out), [])
                container.stop()

    def test_export_destination(self):
        container = self.start(60)
        pid = container.pid
        dest = os.path.join(self.out, f"perf-{pid}.map")

        def export(*args):
            return run_tool("export", "--dir", self.out, *args, str(pid))

        # A link planted at the destination is neither followed nor
        # replaced unless asked; then the link itself is replaced.
        victim = os.path.join(self.dir, "victim")
        with open(victim, "w") as f:
            f.write("victim\n")
        self.addCleanup(os.unlink, victim)
        os.symlink(victim, dest)
        proc = export()
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"perf-{pid}.map is a symbolic link (--force "
                      f"replaces it)", proc.stderr)
        self.assertTrue(os.path.islink(dest))
        proc = export("--force")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("(replaced, ", proc.stdout)
        self.assertFalse(os.path.islink(dest))
        with open(victim) as f:
            self.assertEqual(f.read(), "victim\n")

        # An earlier copy of the same map is replaced; anything else only
        # with --force, and another user's file never.
        proc = export()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("(replaced, ", proc.stdout)
        with open(dest, "w") as f:
            f.write("something else\n")
        proc = export()
        self.assertEqual(proc.returncode, 1)
        self.assertIn("exists and is not an earlier copy of this file "
                      "(--force replaces it)", proc.stderr)
        with open(dest) as f:
            self.assertEqual(f.read(), "something else\n")
        # Outside /tmp, even a file older than the process may be a map
        # kept on purpose.
        hour_ago = time.time() - 3600
        os.utime(dest, (hour_ago, hour_ago))
        self.assertEqual(export().returncode, 1)
        self.assertEqual(export("--force").returncode, 0)
        os.chown(dest, pwd.getpwnam("nobody").pw_uid, -1)
        proc = export("--force")
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"belongs to uid {pwd.getpwnam('nobody').pw_uid}",
                      proc.stderr)

        # Created owner-only whatever the umask; no temporary file left.
        os.unlink(dest)
        old_umask = os.umask(0)
        try:
            proc = export()
        finally:
            os.umask(old_umask)
        self.assertIn("(created, ", proc.stdout)
        self.assertEqual(os.stat(dest).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.out), [f"perf-{pid}.map"])
        with open(dest, "rb") as copy, \
                open(container.tmp_path("perf-1.map"), "rb") as source:
            self.assertTrue(source.read().startswith(copy.read()))

    def test_export_replaces_leftovers_in_tmp(self):
        # In /tmp, a file last written before the process started is a
        # leftover of an earlier process with its pid: replaced, unless a
        # process still has it open (one in another pid namespace that
        # shares /tmp writes under the pid it has there).
        container = self.start(60)
        pid = container.pid
        dest = f"/tmp/perf-{pid}.map"
        self.addCleanup(remove_map, pid)
        hour_ago = time.time() - 3600
        with open(dest, "w") as f:
            f.write("1000 10 py::leftover:old.py\n")
        os.utime(dest, (hour_ago, hour_ago))
        with open(dest):                 # as a process writing it would
            proc = run_tool("export", str(pid))
            self.assertEqual(proc.returncode, 1)
            self.assertIn("exists and is not an earlier copy", proc.stderr)
        proc = run_tool("export", str(pid))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"-> {dest} (replaced a leftover of an earlier "
                      f"process with this pid, ", proc.stdout)
        with open(dest, "rb") as copy, \
                open(container.tmp_path("perf-1.map"), "rb") as source:
            self.assertTrue(source.read().startswith(copy.read()))

    def test_export_nothing_to_do_and_errors(self):
        # A process in this machine's namespaces: its map is where perf
        # looks already.
        local = subprocess.Popen(
            [python(PATCHED), "-X", "perf", "-c",
             "import sys; print('ready', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=clean_env())
        self.addCleanup(remove_map, local.pid)
        self.addCleanup(local.stdout.close)
        self.addCleanup(local.wait)
        self.addCleanup(local.stdin.close)
        self.assertEqual(local.stdout.readline(), "ready\n")
        proc = run_tool("export", str(local.pid))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout, f"process {local.pid} writes its files "
                                      f"in /tmp itself: nothing to export\n")

        dead = subprocess.Popen(["true"])
        dead.wait()
        proc = run_tool("export", str(dead.pid))
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"process {dead.pid} does not exist", proc.stderr)

        container = Container(self, "sleep", "60")
        wait_for(lambda: container.command() == "sleep",
                 "sleep in the container")
        proc = run_tool("export", "--dir", self.out, str(container.pid))
        self.assertEqual(proc.returncode, 1)
        self.assertIn("has no perf-1.map in its /tmp (is perf mode on?)",
                      proc.stderr)


if __name__ == "__main__":
    unittest.main()
