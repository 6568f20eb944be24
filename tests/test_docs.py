"""The documentation builds, and our pages without a single warning."""

import os
import re
import tempfile
import unittest

from support import PATCHED, run

# Our new pages, and the words that mark our additions to upstream pages.
OUR_PAGES = ("howto/perf_profiling.rst", "c-api/perfmaps.rst")
OUR_WORDS = re.compile(
    r"perf_profiling|perfmaps|stack_trampoline|PYTHONPERFSUPPORT|-X perf"
    r"|PerfMap|PerfTrampoline")


class DocsTests(unittest.TestCase):

    def test_docs_build_and_our_pages_are_clean(self):
        doc = os.path.join(PATCHED["src"], "Doc")
        for page in OUR_PAGES:
            self.assertTrue(os.path.exists(os.path.join(doc, page)), page)
        with tempfile.TemporaryDirectory() as out:
            log = os.path.join(out, "warnings.txt")
            # -n: every cross-reference must resolve.  Upstream's pages
            # have thousands of such warnings with -n, so only ours count.
            run(["/usr/bin/python3", "-m", "sphinx", "-b", "dummy", "-q",
                 "-n", "-j", "2", "-D", "html_theme=classic", "-w", log,
                 doc, os.path.join(out, "build")])
            with open(log) as f:
                warnings = f.read().splitlines()
        ours = [w for w in warnings
                if any(page in w for page in OUR_PAGES) or OUR_WORDS.search(w)]
        self.assertEqual(ours, [])
        # A page missing from every toctree is a warning of its own.
        self.assertFalse([w for w in warnings
                          if "isn't included in any toctree" in w])

    def test_internals_page_is_clean(self):
        # Misc/perf-internals.rst is read as it is, not built by Sphinx.
        page = os.path.join(PATCHED["src"], "Misc", "perf-internals.rst")
        run(["/usr/bin/python3", "-c", """if 1:
            import sys, docutils.core
            with open(sys.argv[1]) as f:
                docutils.core.publish_string(
                    f.read(), writer_name="null",
                    settings_overrides={"halt_level": 2})
            """, page])


if __name__ == "__main__":
    unittest.main()
