"""The ABI rule: a patched 3.11 is a drop-in 3.11."""

import os
import sysconfig
import tempfile
import unittest

from support import (PATCHED, STOCK, ROOT, clean_env, include_flags,
                     python, run)

ABI = os.path.join(ROOT, "tests", "abi")


class LayoutTests(unittest.TestCase):

    def layout(self, tree):
        with tempfile.TemporaryDirectory() as tmp:
            exe = os.path.join(tmp, "layout")
            run(["gcc", "-o", exe, os.path.join(ABI, "layout.c"),
                 *include_flags(tree, internal=True)])
            return run([exe]).stdout

    def test_struct_layouts_unchanged(self):
        stock = self.layout(STOCK)
        patched = self.layout(PATCHED)
        self.assertIn("sizeof(PyConfig)", stock)
        self.assertEqual(stock, patched)


class StockBuiltCodeTests(unittest.TestCase):

    def test_extension_built_against_stock_headers(self):
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        with tempfile.TemporaryDirectory() as tmp:
            run(["gcc", "-shared", "-fPIC", "-O2",
                 "-o", os.path.join(tmp, "abi_ext" + suffix),
                 os.path.join(ABI, "ext.c"), *include_flags(STOCK)])
            script = (
                "import sys; sys.path.insert(0, %r)\n"
                "import abi_ext\n"
                "def f(x): return x * 2\n"
                "assert abi_ext.call_plus_one(f, 20) == 41\n"
                "assert abi_ext.tag_code(f.__code__)\n"
                "assert f(3) == 6\n"
                "print(sys.is_stack_trampoline_active())\n" % tmp)
            for args, active in ((["-X", "perf"], "True"), ([], "False")):
                out = run([python(PATCHED), *args, "-c", script]).stdout
                self.assertEqual(out.strip(), active)

    def test_embedding_program_built_against_stock_headers(self):
        var = sysconfig.get_config_var
        obj = os.path.join(PATCHED["obj"], "abi_embed.o")
        # Next to the build's python, so it finds the build's stdlib.
        exe = os.path.join(PATCHED["obj"], "abi_embed")
        try:
            run(["gcc", "-c", "-o", obj, os.path.join(ABI, "embed.c"),
                 *include_flags(STOCK)])
            run(["gcc", "-o", exe, obj,
                 os.path.join(PATCHED["obj"], var("LIBRARY")),
                 *var("LINKFORSHARED").split(), *var("LIBS").split(),
                 *var("SYSLIBS").split(), *var("MODLIBS").split()])
            out = run([exe], env=clean_env(PYTHONPERFSUPPORT="1")).stdout
        finally:
            for path in (obj, exe):
                if os.path.exists(path):
                    os.unlink(path)
        self.assertEqual(out.splitlines(), ["cycle 610 True"] * 3)


if __name__ == "__main__":
    unittest.main()
