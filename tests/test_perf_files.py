"""Tools/perf/perf_files.py list and clean: the files of processes that are
gone go, nothing else does (live pids, files in use, other owners'
files, symbolic links and what they point to, newer files than asked)."""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from support import PATCHED, ROOT, clean_env, python, written_since
from test.test_perf_profiler import SEED, inject_jit, require_perf

TOOLS = os.path.join(ROOT, "Tools", "perf")
PERF_FILES = os.path.join(TOOLS, "perf_files.py")
sys.path.insert(0, TOOLS)
import perf_files  # noqa: E402  (the module, for the race tests)


def run_tool(*args):
    return subprocess.run([sys.executable, PERF_FILES, *args],
                          capture_output=True, text=True)


def dead_pid():
    """The pid of a process that has exited and been reaped (pids are
    handed out in turn, so it stays free for the test)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True)
    return int(proc.stdout)


def files_of(pid):
    return [f"perf-{pid}.map", f"jit-{pid}.dump", f"jitted-{pid}-0.so",
            f"jitted-{pid}-17.so"]


class PlantedFilesTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.dead = dead_pid()

    def plant(self, *names, age=0.0, content=b"x\n"):
        for name in names:
            path = os.path.join(self.dir, name)
            with open(path, "wb") as f:
                f.write(content)
            then = time.time() - age
            os.utime(path, (then, then))

    def left(self):
        return sorted(os.listdir(self.dir))

    def clean(self, *args):
        return run_tool("clean", "--dir", self.dir, *args)

    def test_files_of_dead_processes_go(self):
        live = os.getpid()
        others = ["perf-0.map", f"perf-{self.dead}.map.bak", "notes.txt",
                  "perf-x.map", f"jitted-{self.dead}.so"]
        self.plant(*files_of(self.dead), *files_of(live), *others)
        proc = self.clean()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.left(), sorted(files_of(live) + others))
        self.assertIn("removed 4 files (8 bytes) of 1 processes; kept 4",
                      proc.stdout)
        for name in files_of(self.dead):
            self.assertIn(f"removed {os.path.join(self.dir, name)} ",
                          proc.stdout)

    def test_dry_run_removes_nothing(self):
        self.plant(*files_of(self.dead), *files_of(os.getpid()))
        before = self.left()
        proc = self.clean("--dry-run")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.left(), before)
        lines = proc.stdout.splitlines()
        self.assertEqual(
            sorted(line.split()[2] for line in lines[:-1]),
            sorted(os.path.join(self.dir, n) for n in files_of(self.dead)))
        self.assertEqual(lines[-1], "would remove 4 files (8 bytes) of 1 "
                                    "processes; kept 4")

    def test_list_says_why(self):
        self.plant(f"perf-{self.dead}.map", f"perf-{os.getpid()}.map")
        proc = run_tool("list", "--dir", self.dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"perf-{self.dead}.map (2 bytes, 0 s old)  "
                      f"removable: process {self.dead} is gone", proc.stdout)
        self.assertIn(f"kept: process {os.getpid()} is running", proc.stdout)
        self.assertEqual(len(self.left()), 2)

    def test_symbolic_links_are_neither_followed_nor_removed(self):
        elsewhere = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, elsewhere)
        # A file that would itself qualify, reached through links that
        # would qualify by name.
        victim = os.path.join(elsewhere, f"perf-{self.dead}.map")
        with open(victim, "w") as f:
            f.write("victim\n")
        os.symlink(victim, os.path.join(self.dir, f"perf-{self.dead}.map"))
        os.symlink(victim, os.path.join(self.dir, f"jit-{self.dead}.dump"))
        os.symlink("/nonexistent", os.path.join(self.dir,
                                                f"jitted-{self.dead}-1.so"))
        os.symlink(elsewhere, os.path.join(self.dir,
                                           f"jitted-{self.dead}-2.so"))
        proc = self.clean()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("removed 0 files (0 bytes) of 0 processes; kept 4",
                      proc.stdout)
        self.assertEqual(len(self.left()), 4)
        self.assertTrue(all(os.path.islink(os.path.join(self.dir, name))
                            for name in self.left()))
        with open(victim) as f:
            self.assertEqual(f.read(), "victim\n")
        listing = run_tool("list", "--dir", self.dir).stdout
        self.assertEqual(listing.count("kept: symbolic link"), 4)
        # Nor is the directory followed when it is a link itself.
        link = os.path.join(self.dir, "linked-dir")
        os.symlink(elsewhere, link)
        proc = run_tool("clean", "--dir", link)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"{link} is a symbolic link (not followed)",
                      proc.stderr)
        self.assertTrue(os.path.exists(victim))

    @unittest.skipUnless(os.geteuid() == 0, "needs root to chown")
    def test_other_owners_files_stay(self):
        nobody = pwd.getpwnam("nobody").pw_uid
        self.plant(*files_of(self.dead))
        theirs = os.path.join(self.dir, f"perf-{self.dead}.map")
        os.chown(theirs, nobody, -1)
        proc = self.clean()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.left(), [f"perf-{self.dead}.map"])
        listing = run_tool("list", "--dir", self.dir).stdout
        self.assertIn(f"kept: owned by uid {nobody}", listing)

    def test_only_regular_files(self):
        os.mkdir(os.path.join(self.dir, f"perf-{self.dead}.map"))
        os.mkfifo(os.path.join(self.dir, f"jit-{self.dead}.dump"))
        proc = self.clean()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(self.left()), 2)
        listing = run_tool("list", "--dir", self.dir).stdout
        self.assertEqual(listing.count("kept: not a regular file"), 2)

    def test_older_than(self):
        self.plant(f"perf-{self.dead}.map", age=2 * 3600)
        self.plant(f"jit-{self.dead}.dump", age=30 * 60)
        proc = self.clean("--older-than", "1h", "--dry-run")
        self.assertIn(f"would remove {self.dir}/perf-{self.dead}.map "
                      f"(2 bytes, 2 h old)", proc.stdout)
        self.assertIn("would remove 1 files", proc.stdout)
        self.assertEqual(len(self.left()), 2)
        self.assertEqual(self.clean("--older-than", "3600").returncode, 0)
        self.assertEqual(self.left(), [f"jit-{self.dead}.dump"])
        listing = run_tool("list", "--dir", self.dir, "--older-than", "1h")
        self.assertIn("kept: modified 30 min ago", listing.stdout)
        self.assertEqual(self.clean("--older-than", "20m").returncode, 0)
        self.assertEqual(self.left(), [])

    def test_bad_arguments(self):
        proc = self.clean("--older-than", "1x")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("invalid age '1x'", proc.stderr)
        proc = run_tool("clean", "--dir", os.path.join(self.dir, "none"))
        self.assertEqual(proc.returncode, 1)
        self.assertIn("cannot open directory", proc.stderr)

    def test_files_in_use_stay(self):
        # A process in another pid namespace that shares the directory
        # writes under a pid that means nothing here: it keeps its map open
        # and its jitdump mapped.
        self.plant(f"perf-{self.dead}.map", f"jit-{self.dead}.dump")
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import mmap, sys\n"
             f"m = open({self.dir!r} + '/perf-{self.dead}.map')\n"
             f"d = open({self.dir!r} + '/jit-{self.dead}.dump')\n"
             "mapped = mmap.mmap(d.fileno(), 0, prot=mmap.PROT_READ)\n"
             "d.close()\n"
             "print('ready', flush=True)\n"
             "sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline(), "ready\n")
        proc = self.clean()
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(self.left()), 2)
        listing = run_tool("list", "--dir", self.dir).stdout
        self.assertEqual(listing.count(f"kept: in use by process "
                                       f"{holder.pid}"), 2, listing)
        holder.stdin.close()
        holder.wait()
        self.assertEqual(self.clean().returncode, 0)
        self.assertEqual(self.left(), [])

    def test_race_with_removal(self):
        # Between the listing and the removal a file vanishes, another is
        # replaced by a symbolic link: neither is an error, the link stays.
        self.plant(f"perf-{self.dead}.map", f"jit-{self.dead}.dump")
        dir_fd = perf_files.open_dir(self.dir)
        self.addCleanup(os.close, dir_fd)
        entries = perf_files.scan(dir_fd)
        perf_files.judge(entries, None, time.time())
        self.assertEqual([e.reason for e in entries], [None, None])
        os.unlink(os.path.join(self.dir, f"jit-{self.dead}.dump"))
        path = os.path.join(self.dir, f"perf-{self.dead}.map")
        os.unlink(path)
        os.symlink("/etc/passwd", path)
        self.assertEqual(perf_files.remove(dir_fd, entries[0]), "gone")
        self.assertEqual(perf_files.remove(dir_fd, entries[1]),
                         "changed since it was examined")
        self.assertTrue(os.path.islink(path))

    def test_failed_removal_is_an_error(self):
        self.plant(f"perf-{self.dead}.map", f"jit-{self.dead}.dump")
        stuck = os.path.join(self.dir, f"perf-{self.dead}.map")
        failures = 1
        if os.geteuid() == 0:
            # Root may unlink anything but an immutable file.
            if shutil.which("chattr") is None or \
                    subprocess.run(["chattr", "+i", stuck]).returncode != 0:
                self.skipTest("chattr +i does not work here")
            self.addCleanup(subprocess.run, ["chattr", "-i", stuck])
        else:
            # Neither file can go from a directory we may not write.
            os.chmod(self.dir, 0o500)
            self.addCleanup(os.chmod, self.dir, 0o700)
            failures = 2
        proc = self.clean()
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"perf_files.py: cannot remove {stuck}: ",
                      proc.stderr)
        self.assertIn(f"; {failures} failed", proc.stdout)


class RealFilesTests(unittest.TestCase):
    """Files that the patched interpreter and perf inject really make, moved
    from /tmp (other processes' files stay there untouched) to a directory
    of our own on the same filesystem."""

    def setUp(self):
        require_perf(self)
        self.dir = tempfile.mkdtemp(dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir)

    def move_files_of(self, pid, started):
        """Move to self.dir the files of pid written since started (older
        ones are leftovers of earlier processes with that pid)."""
        names = [name for name in os.listdir("/tmp")
                 if perf_files.kind_of(name) and
                 perf_files.kind_of(name)[1] == pid and
                 written_since(os.path.join("/tmp", name), started)]
        for name in names:
            os.rename(os.path.join("/tmp", name), os.path.join(self.dir, name))
        return sorted(names)

    def start_live_process(self):
        live = subprocess.Popen(
            [python(PATCHED), "-X", "perf", "-c",
             "import os, sys\n"
             "def waiting(): return sys.stdin.read()\n"
             "print(os.getpid(), flush=True)\n"
             "waiting()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=clean_env())
        pid = int(live.stdout.readline())
        self.addCleanup(live.stdout.close)
        self.addCleanup(live.wait)
        self.addCleanup(live.stdin.close)
        return live, pid

    def record_dead_process(self):
        """perf record -k 1 of -X perf_jit, then perf inject --jit: the
        map, the dump and one jitted-PID-N.so per trampoline."""
        script = os.path.join(self.dir, "seed.py")
        with open(script, "w") as f:
            f.write(SEED + "import os\nprint(os.getpid())\n")
        data = os.path.join(self.dir, "perf.data")
        rec = subprocess.run(
            ["perf", "record", "-q", "-F", "499", "-g", "-k", "1", "-o", data,
             "--", python(PATCHED), "-X", "perf_jit", script],
            capture_output=True, text=True, env=clean_env())
        self.assertEqual(rec.returncode, 0, rec.stderr)
        inject_jit(data)
        for name in ("seed.py", "perf.data", "perf.data.jit"):
            os.unlink(os.path.join(self.dir, name))
        return int(rec.stdout)

    def test_real_files(self):
        started = time.time()
        live, live_pid = self.start_live_process()
        dead_pid = self.record_dead_process()
        dead_files = self.move_files_of(dead_pid, started)
        live_files = self.move_files_of(live_pid, started)
        self.assertIn(f"perf-{dead_pid}.map", dead_files)
        self.assertIn(f"jit-{dead_pid}.dump", dead_files)
        jitted = [n for n in dead_files if n.startswith("jitted-")]
        self.assertGreater(len(jitted), 10)
        self.assertEqual(live_files, [f"perf-{live_pid}.map"])

        proc = run_tool("clean", "--dir", self.dir, "--dry-run")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"would remove {len(dead_files)} files", proc.stdout)
        self.assertNotIn(str(live_pid), proc.stdout)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         sorted(dead_files + live_files))

        proc = run_tool("clean", "--dir", self.dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(os.listdir(self.dir), live_files)

        live.stdin.close()
        live.wait()
        proc = run_tool("clean", "--dir", self.dir)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"removed {self.dir}/perf-{live_pid}.map", proc.stdout)
        self.assertEqual(os.listdir(self.dir), [])

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("unshare"),
                         "needs root and unshare for a private /tmp")
    def test_default_directory_is_tmp(self):
        # In a mount namespace of its own with a tmpfs on /tmp, so that the
        # real /tmp's files (other processes') are out of reach.
        script = (
            'mount -t tmpfs tmpfs /tmp && '
            '"$1" -X perf -c "def f(): pass\nf()" && '
            '"$2" "$3" clean && ls -A /tmp')
        proc = subprocess.run(
            ["unshare", "--mount", "sh", "-c", script, "sh", python(PATCHED),
             sys.executable, PERF_FILES],
            capture_output=True, text=True, env=clean_env())
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # The file went, and nothing else was there (ls -A prints nothing).
        self.assertRegex(proc.stdout,
                         r"\Aremoved /tmp/perf-\d+\.map \(.*\)\n"
                         r"removed 1 files \(.*\) of 1 processes; kept 0\n\Z")


if __name__ == "__main__":
    unittest.main()
