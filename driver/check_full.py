"""`make check-full`: CPython's whole regression suite, three ways.

Runs `python -m test -j2` (every resource but the network, audio, GUI,
large-file and CPU-hungry ones, like upstream's `make test` without the
network) with the stock build, the patched build, and the patched build
with PYTHONPERFSUPPORT=1, then prints passed/failed/skipped counts per
configuration and every test module and test case whose outcome differs
from stock.  Logs, JUnit files and results.json go to build/check-full/.
Exits 1 when any outcome differs.

Usage: python driver/check_full.py [--only CONFIG ...] [TEST ...]

The default is the whole suite in all three configurations; --only runs
the named configurations again and takes the others from the last
results.json (for example after a change that cannot affect stock)."""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "check-full")
RESOURCES = "all,-network,-urlfetch,-audio,-gui,-largefile,-cpu"
# test_socket's VSOCK tests wait in accept() until regrtest's timeout on
# a virtual machine that has a vsock device but no peer (as CI's does),
# with or without the patch.
IGNORE = ["*VSOCK*"]
CONFIGS = [
    ("stock", os.path.join(ROOT, "build", "stock", "obj", "python"), {}),
    ("patched", os.path.join(ROOT, "build", "obj", "python"), {}),
    ("patched+perf", os.path.join(ROOT, "build", "obj", "python"),
     {"PYTHONPERFSUPPORT": "1"}),
]
# Regrtest's summary headings, and the outcome they give a test module.
SECTIONS = [
    (re.compile(r"\d+ tests? failed( again)?:"), "failed"),
    (re.compile(r"\d+ tests? altered the execution environment:"),
     "env changed"),
    (re.compile(r"\d+ tests? skipped:"), "skipped"),
    (re.compile(r"\d+ tests? run no tests:"), "no tests"),
    (re.compile(r"\d+ tests? omitted:"), "omitted"),
]
WORSE_FIRST = ["failed", "omitted", "env changed", "skipped", "no tests"]


def clean_env(extra):
    # The caller's PYTHON* settings change what the tests expect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(extra)
    return env


def module_outcomes(log_text, selected):
    """{test module: outcome} from regrtest's final summary."""
    outcomes = {name: "passed" for name in selected}
    summary = log_text[log_text.rfind("== Tests result:"):]
    section = None
    for line in summary.splitlines():
        if not line.strip():
            section = None
            continue
        heading = [o for pattern, o in SECTIONS if pattern.fullmatch(line)]
        if heading:
            section = heading[0]
        elif section and line.startswith("    "):
            for name in line.split():
                old = outcomes.get(name, "passed")
                if old == "passed" or \
                        WORSE_FIRST.index(section) < WORSE_FIRST.index(old):
                    outcomes[name] = section
    return outcomes


def case_outcomes(junit_path):
    """{test case id: "passed" | "failed" | "skipped"} from a JUnit file."""
    outcomes = {}
    if not os.path.exists(junit_path):
        return outcomes
    for case in ET.parse(junit_path).iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            outcome = "failed"
        elif "skipped" in kinds:
            outcome = "skipped"
        else:
            outcome = "passed"
        outcomes[case.get("name")] = outcome
    return outcomes


def run_config(name, python, extra_env, tests):
    log = os.path.join(OUT, f"{name}.log")
    junit = os.path.join(OUT, f"{name}.junit.xml")
    cmd = [python, "-m", "test", "-j2", "-u", RESOURCES, "--timeout", "900",
           "--junit-xml", junit, *(f"--ignore={p}" for p in IGNORE), *tests]
    env = clean_env(extra_env)
    shown = " ".join(f"{k}={v}" for k, v in extra_env.items())
    print(f"[check-full] {name}: {shown} {' '.join(cmd[1:])} "
          f"(log: {os.path.relpath(log, ROOT)})", flush=True)
    selected = subprocess.run([python, "-m", "test", "--list-tests", *tests],
                              capture_output=True, text=True, env=env,
                              check=True).stdout.split()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as cwd, open(log, "w") as out:
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                       cwd=cwd)
    minutes = (time.monotonic() - started) / 60
    with open(log, errors="replace") as f:
        modules = module_outcomes(f.read(), selected)
    cases = case_outcomes(junit)
    print(f"[check-full] {name}: {minutes:.1f} min", flush=True)
    return {"minutes": round(minutes, 1), "modules": modules, "cases": cases}


def count(outcomes, outcome):
    return sum(1 for o in outcomes.values() if o == outcome)


def differences(stock, other):
    """[(name, stock outcome, other outcome)] for names in both runs."""
    return sorted((name, outcome, other[name])
                  for name, outcome in stock.items()
                  if name in other and other[name] != outcome)


def report(results):
    names = [name for name, _, _ in CONFIGS]
    print()
    print(f"{'':28}" + "".join(f"{n:>16}" for n in names))
    rows = [("test cases passed", "cases", "passed"),
            ("test cases failed", "cases", "failed"),
            ("test cases skipped", "cases", "skipped"),
            ("modules passed", "modules", "passed"),
            ("modules failed", "modules", "failed"),
            ("modules env changed", "modules", "env changed"),
            ("modules skipped", "modules", "skipped")]
    for label, level, outcome in rows:
        print(f"{label:28}" + "".join(
            f"{count(results[n][level], outcome):>16}" for n in names))
    print(f"{'wall time (min)':28}" + "".join(
        f"{results[n]['minutes']:>16}" for n in names))
    different = 0
    for name in names[1:]:
        for level in ("modules", "cases"):
            diff = differences(results["stock"][level], results[name][level])
            different += len(diff)
            print(f"\n{level} whose outcome differs, stock vs {name}: "
                  f"{len(diff) or 'none'}")
            for test, before, after in diff:
                print(f"    {test}: {before} -> {after}")
    return different


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append",
                        choices=[name for name, _, _ in CONFIGS])
    parser.add_argument("tests", nargs="*")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    results_file = os.path.join(OUT, "results.json")
    results = {}
    if args.only:
        with open(results_file) as f:
            results = json.load(f)
    maps_before = set(glob.glob("/tmp/perf-*.map"))
    try:
        for name, python, extra_env in CONFIGS:
            if not args.only or name in args.only:
                results[name] = run_config(name, python, extra_env,
                                           args.tests)
                # Kept after each configuration: a later one may be
                # interrupted, and --only reuses what is there.
                with open(results_file, "w") as f:
                    json.dump(results, f, indent=1, sort_keys=True)
    finally:
        # Every process started with PYTHONPERFSUPPORT=1 left its map.
        for path in set(glob.glob("/tmp/perf-*.map")) - maps_before:
            try:
                os.unlink(path)
            except OSError:
                pass
    return 1 if report(results) else 0


if __name__ == "__main__":
    sys.exit(main())
