# docutils renders a reStructuredText document to HTML: docutils' own FAQ
# as Debian ships it, a fixed input.  (Until 2026-12-04 it rendered this
# project's README, whose every edit changed the work measured.)
import gzip
import sys

from debian import use

docutils = use("docutils")
import docutils.core  # noqa: E402

FAQ = "/usr/share/doc/python3-docutils/FAQ.txt.gz"
try:
    with gzip.open(FAQ, "rt", encoding="utf-8") as f:
        SOURCE = f.read()
except FileNotFoundError:
    sys.exit(f"{FAQ} is missing (a system that leaves out /usr/share/doc): "
             f"the docutils workload renders it")
SETTINGS = {"report_level": 5, "halt_level": 5, "_disable_config": True}


def run():
    docutils.core.publish_string(SOURCE, writer_name="html",
                                 settings_overrides=SETTINGS)
