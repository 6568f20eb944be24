"""Tests of the driver (driver/cperf.sh): real patch, real make."""

import ast
import os
import re
import tarfile
import tempfile
import time
import unittest

from support import PATCHED, PRISTINE_TARBALL, ROOT, driver, run


def series():
    with open(os.path.join(ROOT, "patches", "series")) as f:
        return [line.strip() for line in f
                if line.strip() and not line.startswith("#")]


def unpack_pristine(dest):
    with tarfile.open(PRISTINE_TARBALL) as tar:
        tar.extractall(dest)
    return os.path.join(dest, "Python-3.11.2")


def write_patchlevel(tree, major, minor, micro):
    os.makedirs(os.path.join(tree, "Include"), exist_ok=True)
    with open(os.path.join(tree, "Include", "patchlevel.h"), "w") as f:
        f.write(f"#define PY_MAJOR_VERSION\t{major}\n"
                f"#define PY_MINOR_VERSION\t{minor}\n"
                f"#define PY_MICRO_VERSION\t{micro}\n")


class SeriesTests(unittest.TestCase):

    def test_series_applies_to_3_11_2_without_fuzz(self):
        with tempfile.TemporaryDirectory() as tmp:
            tree = unpack_pristine(tmp)
            for name in series():
                with self.subTest(patch=name):
                    with open(os.path.join(ROOT, "patches", name)) as p:
                        proc = run(["patch", "-p1", "-F0", "-d", tree],
                                   stdin=p)
                    self.assertNotRegex(proc.stdout, r"fuzz|offset")

    def test_patches_have_dep3_headers(self):
        for name in series():
            with open(os.path.join(ROOT, "patches", name)) as f:
                header = f.read().split("\n---\n", 1)[0]
            with self.subTest(patch=name):
                self.assertRegex(header, r"(?m)^Description: \S")
                self.assertRegex(header, r"(?m)^Author: \S")
                self.assertRegex(header, r"(?m)^Origin: vendor$")
                self.assertRegex(header, r"(?m)^Bug: https://github\.com/"
                                 r"python/cpython/issues/96143$")
                self.assertRegex(header, r"(?m)^Forwarded: not-needed$")
                self.assertRegex(header,
                                 r"(?m)^Last-Update: \d{4}-\d\d-\d\d$")
                # Only where 3.12 has the same change.
                applied = re.findall(r"(?m)^Applied-Upstream: (.*)$", header)
                self.assertIn(applied, ([], ["3.12"]))

    def test_series_is_in_numbered_order(self):
        names = series()
        self.assertEqual(names, sorted(names))
        self.assertEqual(len({name[:4] for name in names}), len(names))

    def test_dist_patch_applies_to_pristine_tree(self):
        proc = driver("dist")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        dist = os.path.join(ROOT, "dist", "python3.11-perf.patch")
        with tempfile.TemporaryDirectory() as tmp:
            tree = unpack_pristine(tmp)
            with open(dist) as p:
                out = run(["patch", "-p1", "-F0", "-d", tree], stdin=p).stdout
            self.assertNotRegex(out, r"fuzz|offset")
            touched = re.findall(r"^patching file (.+)$", out, re.M)
            self.assertIn("Python/perf_trampoline.c", touched)
            self.assertIn("Python/sysmodule.c", touched)
            # The result is exactly the tree the build uses.
            for path in touched:
                with self.subTest(path=path):
                    with open(os.path.join(tree, path), "rb") as a, \
                            open(os.path.join(PATCHED["src"], path),
                                 "rb") as b:
                        self.assertEqual(a.read(), b.read())

    def test_dist_patch_names_need_no_quoting(self):
        # dpkg-source refuses a patch whose file names diff had to quote
        # (names with spaces, such as Misc/NEWS.d/next/C API/...).
        proc = driver("dist")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(os.path.join(ROOT, "dist", "python3.11-perf.patch")) as f:
            headers = re.findall(r"^(?:---|\+\+\+) .*$", f.read(), re.M)
        self.assertGreater(len(headers), 40)
        self.assertEqual([h for h in headers if '"' in h], [])


class SourceTests(unittest.TestCase):

    def test_tampered_tarball_refused_and_deleted(self):
        with tempfile.TemporaryDirectory() as cache:
            bad = os.path.join(cache, os.path.basename(PRISTINE_TARBALL))
            with open(PRISTINE_TARBALL, "rb") as src, open(bad, "wb") as dst:
                data = bytearray(src.read())
                data[1000] ^= 0xFF
                dst.write(data)
            proc = driver("fetch", env={"CPERF_CACHE": cache})
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("checksum mismatch", proc.stderr)
            self.assertIn("deleted", proc.stderr)
            self.assertFalse(os.path.exists(bad))

    def test_wrong_version_tree_refused(self):
        for version in ((3, 12, 0), (3, 10, 9)):
            with self.subTest(version=version), \
                    tempfile.TemporaryDirectory() as tree:
                write_patchlevel(tree, *version)
                proc = driver("fetch", env={"CPYTHON_SRC": tree})
                self.assertNotEqual(proc.returncode, 0)
                dotted = ".".join(map(str, version))
                self.assertIn(f"is CPython {dotted}; this patch is for "
                              "3.11.x only", proc.stderr)

    def test_wrong_version_tarball_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            tree = os.path.join(tmp, "Python-3.12.1")
            write_patchlevel(tree, 3, 12, 1)
            tarball = os.path.join(tmp, "Python-3.12.1.tgz")
            with tarfile.open(tarball, "w:gz") as tar:
                tar.add(tree, arcname="Python-3.12.1")
            proc = driver("fetch", env={"CPYTHON_SRC": tarball})
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("is CPython 3.12.1", proc.stderr)

    def test_not_a_source_tree_refused(self):
        with tempfile.TemporaryDirectory() as tree:
            proc = driver("fetch", env={"CPYTHON_SRC": tree})
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn("not a CPython source tree", proc.stderr)

    def test_3_11_tree_accepted(self):
        with tempfile.TemporaryDirectory() as tree:
            write_patchlevel(tree, 3, 11, 9)
            proc = driver("fetch", env={"CPYTHON_SRC": tree})
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("(3.11.9)", proc.stdout)


class IncrementalBuildTests(unittest.TestCase):

    # Upstream's Makefile rebuilds these whenever any core object changes
    # (_freeze_module links them all, so the frozen modules are made anew).
    UPSTREAM_REBUILDS = {"Modules/getbuildinfo.o", "Python/frozen.o",
                         "Programs/_bootstrap_python.o",
                         "Python/deepfreeze/deepfreeze.o"}

    def compiled_sources(self):
        with open(os.path.join(ROOT, "build", "logs", "build.log")) as f:
            log = f.read()
        return re.findall(r" -c .* -o (\S+\.o) ", log) + \
            re.findall(r" -o (\S+\.o) \S+\.[cS]$", log, re.M)

    def build(self):
        proc = driver("build")
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_restage_patches_the_tree_once_and_keeps_mtimes(self):
        src = PATCHED["src"]
        untouched = os.path.join(src, "Objects", "object.c")
        before = os.stat(untouched).st_mtime_ns
        os.unlink(os.path.join(src, ".cperf-stamp"))
        proc = driver("prepare")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("unpacking", proc.stdout)
        with open(os.path.join(src, "Python", "sysmodule.c")) as f:
            self.assertEqual(f.read().count(
                "PyModule_AddFunctions(sysmod, _PyPerfTrampoline_SysMethods)"),
                1)
        self.assertEqual(os.stat(untouched).st_mtime_ns, before)

    def test_editing_a_new_file_rebuilds_only_it(self):
        path = os.path.join(ROOT, "Python", "perf_trampoline.c")
        with open(path) as f:
            original = f.read()
        self.build()
        try:
            with open(path, "a") as f:
                f.write("/* incremental build test */\n")
            start = time.monotonic()
            self.build()
            elapsed = time.monotonic() - start
        finally:
            with open(path, "w") as f:
                f.write(original)
        compiled = self.compiled_sources()
        self.build()
        self.assertIn("Python/perf_trampoline.o", compiled)
        self.assertEqual(set(compiled) - self.UPSTREAM_REBUILDS,
                         {"Python/perf_trampoline.o"})
        self.assertLess(elapsed, 60)


class DemoTests(unittest.TestCase):

    def test_demo_profiles_the_tests_seed(self):
        # The demo's example is a file of the driver's, not an import from
        # a test module; it must stay the program the tests profile.
        from test.test_perf_profiler import SEED
        with open(os.path.join(ROOT, "driver", "seed.py")) as f:
            demo = f.read()
        self.assertEqual(ast.dump(ast.parse(demo)), ast.dump(ast.parse(SEED)))


if __name__ == "__main__":
    unittest.main()
