"""The trampoline held to one test on x86_64 and on aarch64 (qemu).

tests/cross/fpwalk.c embeds the interpreter, built natively (build/obj)
and cross-built for aarch64 by `make cross` (build/cross-aarch64/obj, with
PAC and BTI), and runs tests/cross/check_trampolines.py in perf mode: many
trampolines called through, their map lines, and the frame-pointer chain
walked from inside a call."""

import os
import tempfile
import unittest

from support import BUILD, PATCHED, ROOT, clean_env, include_flags, run

CROSS = {"src": PATCHED["src"],
         "obj": os.path.join(BUILD, "cross-aarch64", "obj")}
CROSS_SYSROOT = "/usr/aarch64-linux-gnu"
CHECKER = os.path.join(ROOT, "tests", "cross")
LIBS = ["-lm", "-lpthread", "-ldl", "-lutil"]
FP_FLAGS = ["-O2", "-fno-omit-frame-pointer"]
ARM_FLAGS = FP_FLAGS + ["-mbranch-protection=standard"]


def build_checker(cc, flags, tree, exe, link_flags=()):
    """Link fpwalk.c with tree's libpython; return the linker's stderr."""
    return run([cc, *flags, *include_flags(tree), "-o", exe,
                os.path.join(CHECKER, "fpwalk.c"),
                os.path.join(tree["obj"], "libpython3.11.a"),
                *LIBS, *link_flags]).stderr


class TrampolineCheckTests(unittest.TestCase):

    def check(self, cc, flags, tree, launcher=()):
        with tempfile.TemporaryDirectory() as tmp:
            exe = os.path.join(tmp, "fpwalk")
            build_checker(cc, flags, tree, exe)
            proc = run([*launcher, exe, os.path.join(tree["src"], "Lib"),
                        os.path.join(CHECKER, "check_trampolines.py")],
                       check=False, env=clean_env())
        report = proc.stdout + proc.stderr
        self.assertEqual(proc.returncode, 0, report)
        self.assertEqual(report.splitlines()[-1], "0 failed", report)
        return report

    def test_x86_64_native(self):
        report = self.check("gcc", FP_FLAGS, PATCHED)
        self.assertIn("machine x86_64", report)

    def test_aarch64_under_qemu(self):
        report = self.check("aarch64-linux-gnu-gcc", ARM_FLAGS, CROSS,
                            launcher=["qemu-aarch64", "-L", CROSS_SYSROOT])
        self.assertIn("machine aarch64", report)


class CrossBuildTests(unittest.TestCase):

    def test_cross_configure_enables_trampoline(self):
        with open(os.path.join(CROSS["obj"], "pyconfig.h")) as f:
            self.assertIn("#define PY_HAVE_PERF_TRAMPOLINE 1", f.read())
        nm = run(["aarch64-linux-gnu-nm", "--defined-only",
                  os.path.join(CROSS["obj"], "libpython3.11.a")]).stdout
        symbols = {line.split()[-1] for line in nm.splitlines()
                   if line.count(" ") == 2}
        self.assertLessEqual({"_Py_trampoline_func_start",
                              "_PyPerfTrampoline_InitFromConfig",
                              "PyUnstable_WritePerfMapEntry"}, symbols)

    def test_template_keeps_bti_and_pac(self):
        notes = run(["readelf", "-n", os.path.join(
            CROSS["obj"], "Python", "asm_trampoline.o")]).stdout
        self.assertIn("AArch64 feature: BTI, PAC", notes)
        # ld -z force-bti names every input without the BTI note: only the
        # toolchain's start files may be among them, nothing of ours.
        with tempfile.TemporaryDirectory() as tmp:
            warnings = build_checker(
                "aarch64-linux-gnu-gcc", ARM_FLAGS, CROSS,
                os.path.join(tmp, "fpwalk"), ["-Wl,-z,force-bti"])
        lacking = [line for line in warnings.splitlines()
                   if "force-bti" in line and ROOT in line]
        self.assertEqual(lacking, [])

    def test_template_keeps_ibt_and_shstk(self):
        with tempfile.TemporaryDirectory() as tmp:
            obj = os.path.join(tmp, "asm_trampoline.o")
            run(["gcc", "-fcf-protection=full", "-c", "-o", obj,
                 os.path.join(ROOT, "Python", "asm_trampoline.S")])
            notes = run(["readelf", "-n", obj]).stdout
            code = run(["objdump", "-d", obj]).stdout
        self.assertIn("x86 feature: IBT, SHSTK", notes)
        self.assertIn("endbr64", code)


if __name__ == "__main__":
    unittest.main()
