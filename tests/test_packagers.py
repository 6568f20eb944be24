"""The dist patch as packagers build it: a real build step each, no mocks.

Debian's debian/rules regenerates configure with autoconf alone (never
autoheader), on top of Debian's own patches; pyenv-style builds regenerate
nothing and run ./configure && make.  Either way perf support must be
built in.  (The second is exactly the driver's own build: the series
carries configure and pyconfig.h.in, nothing is regenerated, and
test_driver checks that the dist patch gives exactly that tree.)"""

import os
import tempfile
import unittest

from support import ROOT, driver, run

DIST = os.path.join(ROOT, "dist", "python3.11-perf.patch")


class DebianSourceTests(unittest.TestCase):

    def test_autoconf_only_as_debian_rules_does(self):
        proc = driver("dist")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            tree = os.path.join(tmp, "python3.11")
            proc = driver("debian-source", tree)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            with open(DIST) as p:
                out = run(["patch", "-p1", "-F0", "-d", tree], stdin=p).stdout
            self.assertNotRegex(out, r"fuzz|FAILED")
            run(["autoconf"], cwd=tree)
            build = os.path.join(tmp, "build")
            os.mkdir(build)
            run([os.path.join(tree, "configure"), "--with-ensurepip=no"],
                cwd=build)
            with open(os.path.join(build, "pyconfig.h")) as f:
                self.assertIn("#define PY_HAVE_PERF_TRAMPOLINE 1", f.read())
            with open(os.path.join(build, "Makefile")) as f:
                self.assertTrue("Python/asm_trampoline.o" in f.read(),
                                "the trampoline object is not built")


class DebTreeTests(unittest.TestCase):
    """The source tree that make deb hands to dpkg-buildpackage."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.tree = os.path.join(cls.tmp.name, "python3.11")
        proc = driver("deb-source", cls.tree)
        if proc.returncode != 0:
            cls.tmp.cleanup()
            raise AssertionError(proc.stderr)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def rules_variable(self, name):
        rule = f"print-{name}: ; @echo '$({name})'"
        return run(["make", "-s", "-f", "debian/rules", "--eval", rule,
                    f"print-{name}"], cwd=self.tree).stdout.strip()

    def test_our_patch_applies_last_without_fuzz(self):
        # dpkg-source applies with -F 0 and fails (run() raises) on fuzz.
        run(["dpkg-source", "--before-build", self.tree])
        with open(os.path.join(self.tree, ".pc", "applied-patches")) as f:
            self.assertEqual(f.read().split()[-1], "cpython-perf.patch")
        # A new file, so only our patch can have made it.
        self.assertTrue(os.path.isfile(
            os.path.join(self.tree, "Python", "perf_trampoline.c")))

    def test_every_flavour_has_frame_pointers(self):
        # The static, nopie, shared and debug builds take these flags.
        for name in ("OPT_CFLAGS", "OPT_PIE_CFLAGS", "DEBUG_CFLAGS"):
            with self.subTest(name=name):
                flags = self.rules_variable(name).split()
                self.assertIn("-fno-omit-frame-pointer", flags)
                self.assertIn("-mno-omit-leaf-frame-pointer", flags)

    def test_version_sorts_above_debians(self):
        changelog = os.path.join(self.tree, "debian", "changelog")
        ours, debians = [
            run(["dpkg-parsechangelog", "-l", changelog, "-S", "Version",
                 "-o", str(offset), "-c", "1"]).stdout.strip()
            for offset in (0, 1)]
        self.assertEqual(ours, debians + "+perf1")
        run(["dpkg", "--compare-versions", ours, "gt", debians])
        entry = run(["dpkg-parsechangelog", "-l", changelog, "-S",
                     "Changes"]).stdout
        self.assertIn("debian/patches/cpython-perf.patch", entry)


if __name__ == "__main__":
    unittest.main()
