"""make check-browser: the speedscope profile that Tools/perf/pystacks.py
writes of the seed, opened the way a person opens it: speedscope 1.25
from npm, served on 127.0.0.1, in Debian's headless chromium (driven by
playwright-core, tests/viewers/speedscope_views.js), in the Time Order,
Left Heavy and Sandwich views.  Screenshots: build/browser/VIEW.png.
driver/cperf.sh check-browser installs what it needs and runs this."""

import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import unittest

from support import BUILD, ROOT, run
from test_pystacks import NPM, need_viewer, pystacks, record_seed

SPEEDSCOPE = os.path.join(NPM, "node_modules", "speedscope", "dist",
                          "release")
VIEWS = os.path.join(ROOT, "tests", "viewers", "speedscope_views.js")
SCREENSHOTS = os.path.join(BUILD, "browser")
# speedscope's tooltips and table cells: "79.08ms (89%)".
WEIGHT = re.compile(r"([\d.]+)(ns|µs|ms|s) \([<\d.]+%\)")
UNITS = {"ns": 1, "µs": 1e3, "ms": 1e6, "s": 1e9}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory):
    """An HTTP server of directory on 127.0.0.1, in a thread."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler,
                                            directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def weight(text):
    """Nanoseconds of speedscope's "79.08ms (89%)"; the match's end."""
    match = WEIGHT.match(text)
    return float(match.group(1)) * UNITS[match.group(2)], match.end()


def tooltip(text):
    """(name, file, weight in ns) of a tooltip: "79.08ms (89%) foo\nFILE:"
    (speedscope writes FILE:LINE; our frames have no line)."""
    first, _, file = text.partition("\n")
    nanoseconds, end = weight(first)
    return first[end:].strip(), file.rstrip(":") or None, nanoseconds


def names(stack):
    return [tooltip(text)[0] for text in stack]


class SpeedscopeInChromium(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        need_viewer(SPEEDSCOPE)
        cls.tmp = tempfile.mkdtemp()
        script = record_seed(cls.tmp)
        cls.seed = os.path.join(cls.tmp, "seed.py")
        site = os.path.join(cls.tmp, "site")
        os.mkdir(site)
        os.symlink(SPEEDSCOPE, os.path.join(site, "speedscope"))
        proc = pystacks("--speedscope", os.path.join(site, "seed.json"),
                        script)
        if proc.returncode != 0:
            raise AssertionError(proc.stderr)
        with open(os.path.join(site, "seed.json")) as f:
            cls.doc = json.load(f)
        cls.profile = cls.doc["profiles"][cls.doc["activeProfileIndex"]]
        os.makedirs(SCREENSHOTS, exist_ok=True)
        server = serve(site)
        try:
            url = (f"http://127.0.0.1:{server.server_port}/speedscope/"
                   "index.html#profileURL=/seed.json")
            cls.views = json.loads(run(["node", VIEWS, NPM, url,
                                        SCREENSHOTS]).stdout)
        finally:
            server.shutdown()
            server.server_close()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def frame(self, index):
        return self.doc["shared"]["frames"][index]

    def weight_under(self, name, file=None):
        """The summed weight of the samples whose root is that frame."""
        roots = (self.frame(sample[0]) for sample in self.profile["samples"])
        return sum(w for root, w in zip(roots, self.profile["weights"])
                   if (root["name"], root.get("file")) == (name, file))

    def assert_seed_chain(self, stack):
        self.assertEqual([tooltip(text)[:2] for text in stack],
                         [(name, self.seed)
                          for name in ("<module>", "baz", "bar", "foo")])

    def test_profile_opens_in_every_view(self):
        for view, shown in self.views.items():
            self.assertEqual(shown["title"],
                             f"{self.doc['name']} - speedscope", view)

    def test_time_order(self):
        shown = self.views["time-ordered"]
        # The run starts in the interpreter's start-up, C code only, and
        # ends as the last sample did; the middle is foo's loop.
        first, last = self.profile["samples"][0], self.profile["samples"][-1]
        self.assertEqual(names(shown["left"]),
                         [self.frame(i)["name"] for i in first])
        self.assertEqual(names(shown["left"])[0], "[native]")
        leaf = tooltip(shown["left"][1])
        self.assertEqual(leaf[1], self.frame(first[1])["file"])
        self.assert_seed_chain(shown["middle"])
        self.assertEqual(names(shown["right"]),
                         [self.frame(i)["name"] for i in last])

    def test_left_heavy(self):
        shown = self.views["left-heavy"]
        self.assert_seed_chain(shown["left"])
        module_weight = tooltip(shown["left"][0])[2]
        # Only the seed's own <module>: 79.08ms is rounded to 10 µs.
        self.assertAlmostEqual(module_weight,
                               self.weight_under("<module>", self.seed),
                               delta=5e3)

    def test_sandwich_keeps_frames_of_each_file(self):
        rows = self.views["sandwich"]["rows"][1:]   # below the header
        frames = self.doc["shared"]["frames"]
        self.assertEqual(len(rows), len(frames))
        shown = [re.fullmatch(r"(\S+ \(\S+\)) (\S+ \(\S+\)) (.+)", row)
                 for row in rows]
        self.assertEqual(sorted(match.group(3) for match in shown),
                         sorted(frame["name"] for frame in frames))
        native = [weight(match.group(1))[0] for match in shown
                  if match.group(3) == "[native]"]
        self.assertAlmostEqual(native[0], self.weight_under("[native]"),
                               delta=5e3)


if __name__ == "__main__":
    unittest.main()
