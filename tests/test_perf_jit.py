"""-X perf_jit on a build without frame pointers (make FRAME_POINTERS=no,
build/obj-nofp), where perf's DWARF unwinder needs the jitdump's unwinding
tables to step through the trampolines."""

import os
import subprocess
import unittest

from support import BUILD, clean_env
from test.test_perf_profiler import (SEED, perf_stacks, py_frames,
                                     require_perf)

NOFP_PYTHON = os.path.join(BUILD, "obj-nofp", "python")


class NoFramePointerTests(unittest.TestCase):

    def setUp(self):
        require_perf(self)

    def chains(self, *args, inject):
        stacks, _ = perf_stacks(SEED, *args, dwarf=True, inject=inject,
                                python=NOFP_PYTHON, env=clean_env())
        return [py_frames(stack) for stack in stacks]

    def test_built_without_frame_pointers(self):
        code = "import sysconfig; print(sysconfig.get_config_var('CFLAGS'))"
        flags = subprocess.run([NOFP_PYTHON, "-c", code], capture_output=True,
                               text=True, env=clean_env()).stdout
        self.assertIn("-fomit-frame-pointer", flags)

    def test_chain_after_perf_inject(self):
        chains = self.chains("-X", "perf_jit", inject=True)
        wanted = ["foo", "bar", "baz", "<module>"]
        hits = [c for c in chains if c[:4] == wanted]
        self.assertGreater(len(hits), len(chains) // 4, chains[:5])

    def test_without_unwinding_tables_the_chain_breaks(self):
        # The control: the perf map names the trampolines, but DWARF
        # unwinding cannot step through them, so no sample shows foo's
        # callers.  This is what perf_jit is for.
        chains = self.chains("-X", "perf", inject=False)
        self.assertTrue(any(c[:1] == ["foo"] for c in chains), chains[:5])
        self.assertFalse(any(c[:2] == ["foo", "bar"] for c in chains))


if __name__ == "__main__":
    unittest.main()
