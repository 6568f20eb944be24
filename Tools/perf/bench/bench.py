"""Perf mode's cost: `-X perf` against off on one build, side by side.

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
kernel time), and the patched build with perf support off against the
stock build (the cost of merely carrying the patch).  Writes the numbers
as JSON as well.

Usage: python bench.py --python build/python [--stock build/stock/python]
                       [--backend perf|perf_jit] [--rounds 60]
                       [--processes 20] [--process-rounds 300]
                       [--json FILE] [WORKLOAD ...]"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_ONE = os.path.join(HERE, "run_one.py")
WORKLOADS = ["calls", "methods", "generators", "loops", "codeobjects",
             "imports"]
CALLGRIND_WORKLOADS = ["calls", "methods"]


def clean_env():
    """The caller's environment without PYTHON* settings, and a fixed hash
    seed: string hashes decide dict layouts, a source of run-to-run noise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONHASHSEED"] = "0"
    return env


def remove_perf_files(pid):
    """A perf mode run leaves its map (and jitdump) behind, as it should;
    keep /tmp tidy."""
    for path in (f"/tmp/perf-{pid}.map", f"/tmp/jit-{pid}.dump"):
        try:
            os.unlink(path)
        except FileNotFoundError:
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


# Both ways of measuring return groups of (off, on) pairs: the pairs of one
# process, or one pair of fresh processes.

def fresh_process_pairs(python, workload, rounds, perf_args):
    run_one(python, [], workload)  # warm caches (.pyc files, disk)
    groups = []
    for i in range(rounds):
        times = {}
        # Swap the order every round so neither mode always runs first.
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
            args = perf_args if mode == "on" else []
            times[mode] = run_one(python, args, workload)["once"]
        groups.append([(times["off"], times["on"])])
    return groups


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


def measure_ratios(python, workloads, rounds, processes, process_rounds,
                   backend):
    results = {}
    for workload in workloads:
        if runs_once_per_process(workload):
            groups = fresh_process_pairs(python, workload, process_rounds,
                                         ["-X", backend])
        else:
            groups = toggled_pairs(python, workload, rounds, processes,
                                   backend)
        ratio, low, high = ratio_with_interval(groups)
        off = [off for group in groups for off, _ in group]
        on = [on for group in groups for _, on in group]
        results[workload] = {
            "off_s": statistics.median(off),
            "on_s": statistics.median(on),
            "ratio": ratio,
            "ratio_95": [low, high],
            "pairs": groups,
        }
        print(f"  {workload:12} off {statistics.median(off):8.4f}s  "
              f"on {statistics.median(on):8.4f}s  ratio {ratio:.3f}  "
              f"(95%: {low:.3f}-{high:.3f})", flush=True)
    return results


def instructions(python, workload, args=()):
    """Instructions of one process that runs the workload once."""
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         python, *args, RUN_ONE, workload],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env())
    _, stderr = proc.communicate()
    remove_perf_files(proc.pid)
    match = re.search(r"Collected : (\d+)", stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"callgrind failed on {workload}:\n{stderr}")
    return int(match.group(1))


def measure_perf_instructions(python, workloads, perf_args):
    results = {}
    for workload in workloads:
        off = instructions(python, workload)
        on = instructions(python, workload, perf_args)
        results[workload] = {"off": off, "on": on, "ratio": on / off}
        print(f"  {workload:12} off {off:>14,}  on {on:>14,}  "
              f"ratio {on / off:.3f}", flush=True)
    return results


def measure_stock_instructions(python, stock, workloads):
    results = {}
    for workload in workloads:
        patched = instructions(python, workload)
        base = instructions(stock, workload)
        results[workload] = {"patched_off": patched, "stock": base,
                             "ratio": patched / base}
        print(f"  {workload:12} stock {base:>14,}  patched(off) "
              f"{patched:>14,}  {100 * (patched / base - 1):+.3f}%",
              flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", required=True)
    parser.add_argument("--stock")
    parser.add_argument("--backend", choices=["perf", "perf_jit"],
                        default="perf")
    parser.add_argument("--rounds", type=int, default=60,
                        help="off/on pairs per workload")
    parser.add_argument("--processes", type=int, default=20,
                        help="processes the pairs are spread over")
    parser.add_argument("--process-rounds", type=int, default=300,
                        help="off/on pairs of fresh processes for a "
                             "workload that runs once per process")
    parser.add_argument("--json")
    parser.add_argument("--no-callgrind", dest="callgrind",
                        action="store_false",
                        help="wall times only (callgrind takes minutes)")
    parser.add_argument("workloads", nargs="*", default=WORKLOADS)
    args = parser.parse_args()

    perf_args = ["-X", args.backend]
    report = {"python": args.python, "rounds": args.rounds,
              "processes": args.processes,
              "process_rounds": args.process_rounds,
              "backend": args.backend}
    print(f"-X {args.backend} vs off, {args.python}: medians of "
          f"{args.rounds} off/on pairs in {args.processes} processes "
          f"(imports: {args.process_rounds} pairs of fresh processes)")
    report["ratios"] = measure_ratios(args.python, args.workloads,
                                      args.rounds, args.processes,
                                      args.process_rounds, args.backend)
    if args.callgrind:
        print(f"instructions (callgrind), -X {args.backend} vs off:")
        report["perf_instructions"] = measure_perf_instructions(
            args.python, args.workloads, perf_args)
    if args.stock and args.callgrind:
        print("instructions (callgrind), perf support off vs stock:")
        report["stock_instructions"] = measure_stock_instructions(
            args.python, args.stock,
            [w for w in CALLGRIND_WORKLOADS if w in args.workloads])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)),
                    exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
