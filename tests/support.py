"""Paths and helpers shared by the driver's tests."""

import os
import subprocess

# The stdlib test's helpers, so that every test cleans the environment and
# reads maps the same way.
from test.test_perf_profiler import (  # noqa: F401
    clean_env, read_map_entries, written_since)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
PATCHED = {"src": os.path.join(BUILD, "src"), "obj": os.path.join(BUILD, "obj")}
STOCK = {"src": os.path.join(BUILD, "stock", "src"),
         "obj": os.path.join(BUILD, "stock", "obj")}
CACHE = os.environ.get("CPERF_CACHE",
                       os.path.expanduser("~/.cache/cpython-perf"))
PRISTINE_TARBALL = os.path.join(CACHE, "python3.11_3.11.2.orig.tar.gz")
# The programs that read pystacks' outputs (driver/cperf.sh viewers):
# npm packages under VIEWERS/npm, Go's pprof as VIEWERS/pprof.
VIEWERS = os.path.join(CACHE, "viewers")


def run(cmd, check=True, **kwargs):
    """Run cmd; return the CompletedProcess with text output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def include_flags(tree, internal=False):
    flags = ["-I" + os.path.join(tree["src"], "Include"), "-I" + tree["obj"]]
    if internal:
        flags.append("-I" + os.path.join(tree["src"], "Include", "internal"))
    return flags


def driver(*args, env=None):
    """Run driver/cperf.sh with args."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return run(["bash", os.path.join(ROOT, "driver", "cperf.sh"), *args],
               check=False, env=full_env)


def sanitized(tree):
    """Is tree's build an AddressSanitizer build (make asan)?"""
    with open(os.path.join(tree["obj"], "Makefile")) as f:
        return "--with-address-sanitizer" in f.read()


def python(tree):
    return os.path.join(tree["obj"], "python")
