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


if __name__ == "__main__":
    unittest.main()
