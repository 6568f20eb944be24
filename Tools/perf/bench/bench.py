"""Perf mode's cost: `-X perf` against off on one build, side by side.

Three kinds of workload:

* micro-benchmarks (calls, methods, ...) and real code from Debian's
  packages (docutils, pygments, sympy, networkx, difflib), timed after
  their imports inside the process;
* start-up: whole interpreters timed from outside, `python -c pass` one at
  a time, and a CI-like loop of 100 short interpreters with
  PYTHONPERFSUPPORT=1 (PYTHON_PERF_JIT_SUPPORT=1) set for the whole loop.

For each workload, off and on runs alternate in pairs, and the table shows
the median wall times of each mode, the median of the pairs' ratios and a
95% bootstrap interval for that median.  Wall time on this kind of shared
machine swings by 10-20% over seconds, so the runs of a pair are kept
close: most workloads run in many processes (half of them started with
-X perf, half without, each with its own random memory layout), each
timing a few pairs of runs with perf mode toggled in between by
sys.activate_stack_trampoline(); a workload that can only run once per
process (imports) alternates fresh processes instead, for more pairs:
they are short, and the pairs of fresh processes vary more.

Callgrind also counts instructions, which do not move: on vs off for
every workload (user-space work only; the perf map's write() calls are
kernel time) -- whole processes, except for real code: its second run,
after its imports and a first run, as its wall times -- and the patched build with
perf support off against the stock build (the cost of merely carrying
the patch).

With --anchor PYTHON (CPython 3.13, `make anchor`), every workload is
measured on that interpreter too, right after ours, with its own perf
support, and the summary puts both side by side.  Writes the numbers as
JSON as well.

Usage: python bench.py --python build/python [--stock build/stock/python]
                       [--anchor build/anchor/python]
                       [--backend perf|perf_jit] [--rounds 60]
                       [--processes 20] [--process-rounds 300]
                       [--startup-rounds 400] [--loop-rounds 20]
                       [--json FILE] [WORKLOAD ...]"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_ONE = os.path.join(HERE, "run_one.py")
MICRO = ["calls", "methods", "generators", "loops", "codeobjects",
         "imports"]
REAL_CODE = ["docutils_html", "pygments_highlight", "sympy_integrate",
             "networkx_graph", "difflib_diff"]
# Whole interpreters: the command line, and how many run in a row for one
# timing.
STARTUP = {
    "startup": (["-c", "pass"], 1),
    "ci_loop": (["-c", "import json, argparse"], 100),
}
WORKLOADS = MICRO + REAL_CODE + list(STARTUP)
CALLGRIND_WORKLOADS = ["calls", "methods"]
# The most each ratio may be: instructions, wall time.  Micro-benchmarks:
# issue 5; real code and start-up: issue 20.
TARGETS = {
    "calls": (1.15, 1.15), "methods": (1.10, 1.10),
    "generators": (1.10, 1.10), "loops": (1.02, 1.02),
    "codeobjects": (1.05, 1.05), "imports": (1.02, 1.02),
    **{name: (1.01, 1.02) for name in REAL_CODE},
    "startup": (None, 1.02), "ci_loop": (None, 1.02),
}
ENVIRONMENT_SWITCH = {"perf": "PYTHONPERFSUPPORT",
                      "perf_jit": "PYTHON_PERF_JIT_SUPPORT"}


def clean_env():
    """The caller's environment without PYTHON* settings, and a fixed hash
    seed: string hashes decide dict layouts, a source of run-to-run noise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHASHSEED"] = "0"
    return env


def remove_perf_files(pid):
    """A perf mode run leaves its map (and jitdump) behind, as it should;
    keep /tmp tidy.  What is not a file of ours at those paths (a
    directory, another user's file, left by someone else for a pid that
    ours reused) stays."""
    for path in (f"/tmp/perf-{pid}.map", f"/tmp/jit-{pid}.dump"):
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass


def run_one(python, args, workload, *options):
    # Address-space randomisation stays on: a fixed layout can be a slow
    # one for one mode only, while random layouts average out over runs.
    proc = subprocess.Popen([python, *args, RUN_ONE, workload, *options],
                            stdout=subprocess.PIPE, text=True, env=clean_env())
    out, _ = proc.communicate()
    remove_perf_files(proc.pid)
    if proc.returncode != 0:
        raise RuntimeError(f"{workload} failed under {python} {args}")
    return json.loads(out)


def runs_once_per_process(workload):
    sys.path.insert(0, os.path.join(HERE, "workloads"))
    try:
        return getattr(__import__(workload), "ONCE_PER_PROCESS", False)
    finally:
        del sys.path[0]


def perf_env(backend, on):
    """The environment of a whole-interpreter run, with perf support
    turned on by the variable that CI systems would set for every
    interpreter they run (ci_loop)."""
    env = clean_env()
    if on:
        env[ENVIRONMENT_SWITCH[backend]] = "1"
    return env


# Every way of measuring returns groups of (off, on) pairs: the pairs of
# one process, or one pair of fresh processes (or loops of them).

def alternating_pairs(rounds, time_mode):
    """rounds groups of one (off, on) pair, time_mode(on) timing one run
    of a mode: fresh processes, or loops of them."""
    groups = []
    for i in range(rounds):
        times = {}
        # Swap the order every round so neither mode always runs first.
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            times[on] = time_mode(on)
        groups.append([(times[False], times[True])])
    return groups


def fresh_process_pairs(python, workload, rounds, perf_args, *options):
    run_one(python, [], workload)  # warm caches (.pyc files, disk)
    return alternating_pairs(rounds, lambda on: run_one(
        python, perf_args if on else [], workload, *options)["once"])


def toggled_pairs(python, workload, rounds, processes, backend):
    groups = []
    processes = min(processes, rounds)
    for p in range(processes):
        pairs = rounds // processes + (p < rounds % processes)
        started_on = ["-X", backend] if p % 2 else []
        times = run_one(python, started_on, workload, "--pairs", str(pairs),
                        "--backend", backend)
        groups.append(list(zip(times["off"], times["on"])))
    return groups


def can_toggle(python, backend):
    """Can the interpreter turn the backend on at run time?  (CPython
    3.13's sys.activate_stack_trampoline() knows "perf" only.)"""
    proc = subprocess.Popen(
        [python, "-c", f"import sys; sys.activate_stack_trampoline("
         f"{backend!r})"], stderr=subprocess.DEVNULL, env=clean_env())
    proc.wait()
    remove_perf_files(proc.pid)
    return proc.returncode == 0


def time_interpreters(python, args, env, count, devnull):
    """Seconds to run `count` interpreters one after the other, as a shell
    or CI runner does: spawn, wait, next."""
    pids = []
    start = time.perf_counter()
    for _ in range(count):
        pid = os.posix_spawn(python, [python, *args], env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
        os.waitpid(pid, 0)
        pids.append(pid)
    elapsed = time.perf_counter() - start
    for pid in pids:
        remove_perf_files(pid)
    return elapsed


def interpreter_pairs(python, workload, rounds, backend):
    """Pairs of whole-interpreter timings: off, and on by -X (startup) or
    by the environment (ci_loop)."""
    args, count = STARTUP[workload]
    off_env = perf_env(backend, False)
    if workload == "startup":
        on_args, on_env = ["-X", backend, *args], off_env
    else:
        on_args, on_env = args, perf_env(backend, True)
    modes = {False: (args, off_env), True: (on_args, on_env)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        time_interpreters(python, args, off_env, count, devnull)  # warm up
        return alternating_pairs(rounds, lambda on: time_interpreters(
            python, *modes[on], count, devnull))
    finally:
        os.close(devnull)


def ratio_with_interval(groups, resamples=2000):
    """The median of all pairs' on/off ratios, and a 95% bootstrap interval
    for it: how far it could move on a rerun.  Groups are resampled whole,
    because one process's memory layout can favour one mode in all of its
    pairs.  Seeded, so the same runs always give the same interval."""
    ratios = [[on / off for off, on in group] for group in groups]
    rng = random.Random(0)
    medians = sorted(
        statistics.median(r for group in rng.choices(ratios, k=len(ratios))
                          for r in group)
        for _ in range(resamples))
    return (statistics.median(r for group in ratios for r in group),
            medians[int(0.025 * resamples)],
            medians[int(0.975 * resamples) - 1])


def measure_ratio(python, workload, args):
    """One interpreter's wall-time pairs for a workload, summarized."""
    if workload in STARTUP:
        rounds = (args.startup_rounds if workload == "startup"
                  else args.loop_rounds)
        groups = interpreter_pairs(python, workload, rounds, args.backend)
    elif runs_once_per_process(workload):
        groups = fresh_process_pairs(python, workload, args.process_rounds,
                                     ["-X", args.backend])
    elif not can_toggle(python, args.backend):
        groups = fresh_process_pairs(python, workload, args.rounds,
                                     ["-X", args.backend], "--warm")
    else:
        groups = toggled_pairs(python, workload, args.rounds,
                               args.processes, args.backend)
    ratio, low, high = ratio_with_interval(groups)
    off = [off for group in groups for off, _ in group]
    on = [on for group in groups for _, on in group]
    return {
        "off_s": statistics.median(off),
        "on_s": statistics.median(on),
        "ratio": ratio,
        "ratio_95": [low, high],
        "pairs": groups,
    }


def print_ratio(workload, label, result):
    low, high = result["ratio_95"]
    print(f"  {workload:18} {label:5} off {result['off_s']:8.4f}s  "
          f"on {result['on_s']:8.4f}s  ratio {result['ratio']:.3f}  "
          f"(95%: {low:.3f}-{high:.3f})", flush=True)


def instructions(python, command, env=None):
    """Instructions of one process running python with command."""
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         python, *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env or clean_env())
    _, stderr = proc.communicate()
    remove_perf_files(proc.pid)
    match = re.search(r"Collected : (\d+)", stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"callgrind failed on {command}:\n{stderr}")
    return int(match.group(1))


def workload_instructions(python, workload, backend, on):
    """Instructions of a workload in one mode: a whole process; for real
    code, those of its second run (a process that imports it and runs it
    once, less one that stops there)."""
    if workload in STARTUP:
        args, _ = STARTUP[workload]
        if workload == "startup":
            return instructions(python, (["-X", backend] if on else [])
                                + args)
        return instructions(python, args, perf_env(backend, on))
    perf_args = ["-X", backend] if on else []
    if workload not in REAL_CODE:
        return instructions(python, [*perf_args, RUN_ONE, workload])
    # One run after an untimed one, as the wall times: the steady state
    # of a program that keeps running its code.
    command = [*perf_args, RUN_ONE, workload, "--warm"]
    return (instructions(python, command)
            - instructions(python, [*command, "--import-only"]))


def measure_instructions(python, workload, backend):
    off = workload_instructions(python, workload, backend, False)
    on = workload_instructions(python, workload, backend, True)
    return {"off": off, "on": on, "ratio": on / off}


def print_instructions(workload, label, result):
    print(f"  {workload:18} {label:5} off {result['off']:>14,}  "
          f"on {result['on']:>14,}  ratio {result['ratio']:.3f}",
          flush=True)


def measure_stock_instructions(python, stock, workloads):
    results = {}
    for workload in workloads:
        patched = instructions(python, [RUN_ONE, workload])
        base = instructions(stock, [RUN_ONE, workload])
        results[workload] = {"patched_off": patched, "stock": base,
                             "ratio": patched / base}
        print(f"  {workload:18} stock {base:>14,}  patched(off) "
              f"{patched:>14,}  {100 * (patched / base - 1):+.3f}%",
              flush=True)
    return results


def interpreters(args):
    """(label, python) of every interpreter measured, ours first."""
    found = [("ours", args.python)]
    if args.anchor:
        found.append(("3.13", args.anchor))
    return found


def summary(report, args):
    """The ratios of every interpreter side by side, with the targets that
    ours must meet."""
    labels = [label for label, _ in interpreters(args)]
    print(f"summary, -X {args.backend} / off (time ratio, instructions "
          f"ratio; target: most allowed):")
    print(f"  {'workload':18} " + "".join(f"{label:>17}" for label in labels)
          + f"{'target':>14}  met")
    for workload in args.workloads:
        cells, met = [], True
        limit_instr, limit_time = TARGETS[workload]
        for label in labels:
            time_ratio = report[label]["ratios"][workload]["ratio"]
            instr = report[label].get("perf_instructions", {}).get(workload)
            instr_ratio = instr["ratio"] if instr else None
            cells.append(f"{time_ratio:8.3f} "
                         + (f"{instr_ratio:7.3f}" if instr_ratio else
                            f"{'-':>7}"))
            if label == "ours":
                met = time_ratio <= limit_time and (
                    instr_ratio is None or limit_instr is None
                    or instr_ratio <= limit_instr)
        target = (f"{limit_time:.2f} "
                  + (f"{limit_instr:.2f}" if limit_instr else "   -"))
        print(f"  {workload:18} " + "".join(f"{c:>17}" for c in cells)
              + f"{target:>14}  {'yes' if met else 'NO'}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True)
    parser.add_argument("--stock")
    parser.add_argument("--anchor",
                        help="CPython 3.13 (make anchor), measured alike")
    parser.add_argument("--backend", choices=["perf", "perf_jit"],
                        default="perf")
    parser.add_argument("--rounds", type=int, default=60,
                        help="off/on pairs per workload")
    parser.add_argument("--processes", type=int, default=20,
                        help="processes the pairs are spread over")
    parser.add_argument("--process-rounds", type=int, default=300,
                        help="off/on pairs of fresh processes for a "
                             "workload that runs once per process")
    parser.add_argument("--startup-rounds", type=int, default=400,
                        help="off/on pairs of `python -c pass`")
    parser.add_argument("--loop-rounds", type=int, default=20,
                        help="off/on pairs of loops of 100 interpreters")
    parser.add_argument("--json")
    parser.add_argument("--no-callgrind", dest="callgrind",
                        action="store_false",
                        help="wall times only (callgrind takes minutes)")
    parser.add_argument("workloads", nargs="*", default=WORKLOADS)
    args = parser.parse_args()
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")

    report = {"python": args.python, "anchor": args.anchor,
              "rounds": args.rounds, "processes": args.processes,
              "process_rounds": args.process_rounds,
              "startup_rounds": args.startup_rounds,
              "loop_rounds": args.loop_rounds, "backend": args.backend}
    for label, _ in interpreters(args):
        report[label] = {"ratios": {}, "perf_instructions": {}}
    print(f"-X {args.backend} vs off, {args.python}"
          + (f" and {args.anchor}" if args.anchor else "")
          + f": medians of {args.rounds} off/on pairs in {args.processes} "
          f"processes (imports: {args.process_rounds} pairs of fresh "
          f"processes; startup: {args.startup_rounds} pairs; ci_loop: "
          f"{args.loop_rounds} pairs of 100 interpreters)")
    for workload in args.workloads:
        for label, python in interpreters(args):
            result = measure_ratio(python, workload, args)
            report[label]["ratios"][workload] = result
            print_ratio(workload, label, result)
    if args.callgrind:
        print(f"instructions (callgrind), -X {args.backend} vs off "
              f"(real code: its second run):")
        for workload in args.workloads:
            for label, python in interpreters(args):
                result = measure_instructions(python, workload,
                                              args.backend)
                report[label]["perf_instructions"][workload] = result
                print_instructions(workload, label, result)
    if args.stock and args.callgrind:
        print("instructions (callgrind), perf support off vs stock:")
        report["stock_instructions"] = measure_stock_instructions(
            args.python, args.stock,
            [w for w in CALLGRIND_WORKLOADS if w in args.workloads])
    summary(report, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)),
                    exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
