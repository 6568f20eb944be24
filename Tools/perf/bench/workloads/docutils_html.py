# docutils renders a reStructuredText document (this project's README)
# to HTML.
import os

from debian import use

docutils = use("docutils")
import docutils.core  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "..", "..", "..", "..", "README.rst")
with open(README, encoding="utf-8") as f:
    SOURCE = f.read()
SETTINGS = {"report_level": 5, "halt_level": 5, "_disable_config": True}


def run():
    docutils.core.publish_string(SOURCE, writer_name="html",
                                 settings_overrides=SETTINGS)
