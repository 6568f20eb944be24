"""The documentation builds, the perf pages included, without a warning."""

import os
import tempfile
import unittest

from support import PATCHED, run


class DocsTests(unittest.TestCase):

    def test_docs_build_without_warnings(self):
        doc = os.path.join(PATCHED["src"], "Doc")
        self.assertTrue(os.path.exists(
            os.path.join(doc, "c-api", "perfmaps.rst")))
        with tempfile.TemporaryDirectory() as out:
            # -W: a page missing from every toctree, a bad reference or
            # bad markup fails the build.
            run(["/usr/bin/python3", "-m", "sphinx", "-b", "dummy", "-q",
                 "-W", "-j", "2", "-D", "html_theme=classic", doc, out])


if __name__ == "__main__":
    unittest.main()
