"""Real code from Debian's packages: the pure-Python libraries of
python3-docutils, python3-pygments, python3-sympy and python3-networkx,
as Debian installs them for its python3.  They are version-independent
source, so the interpreter under test imports them from there."""

import os
import sys

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
PACKAGES = {"docutils": "python3-docutils", "pygments": "python3-pygments",
            "sympy": "python3-sympy", "networkx": "python3-networkx"}


def use(name):
    """Import a module of Debian's python3 packages by name."""
    if not os.path.isdir(os.path.join(DIST_PACKAGES, name)):
        sys.exit(f"{name} is missing: apt-get install {PACKAGES[name]}")
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)
    return __import__(name)


def stdlib_source(module):
    """The text of a module of the interpreter's own standard library: a
    large, real input that every interpreter has."""
    path = os.path.join(os.path.dirname(os.__file__), module + ".py")
    with open(path, encoding="utf-8") as f:
        return f.read()
