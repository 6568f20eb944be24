# pygments highlights a large Python file (the standard library's
# typing.py) as HTML.
from debian import stdlib_source, use

pygments = use("pygments")
from pygments.formatters import HtmlFormatter  # noqa: E402
from pygments.lexers import PythonLexer  # noqa: E402

SOURCE = stdlib_source("typing")


def run():
    pygments.highlight(SOURCE, PythonLexer(), HtmlFormatter())
