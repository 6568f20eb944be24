"""Time one workload in this process; print the seconds as JSON.

    python run_one.py WORKLOAD
        one run of the workload in the mode the process started in
        (``-X perf`` or not): prints {"once": seconds}.

    python run_one.py WORKLOAD --warm
        one untimed run first, then one timed run (for an interpreter that
        cannot toggle a backend at run time: CPython 3.13's perf_jit).

    python run_one.py WORKLOAD --import-only [--warm]
        imports the workload (and with --warm, runs it once) and times
        nothing: the part of a process that instruction counts of real
        code leave out.

    python run_one.py WORKLOAD --pairs N --backend perf|perf_jit
        N pairs of runs, perf mode off for one run of each pair and on for
        the other (sys.activate_stack_trampoline / deactivate), the order
        swapped from pair to pair: prints {"off": [...], "on": [...]},
        the two runs of a pair at the same index.

Runs of a pair are a fraction of a second apart, so the shared machine's
swings in speed, which last longer than that, hit both modes alike.  Each
mode runs once untimed first, so trampolines and specialised bytecode are
in place, and the cyclic garbage of the previous run is collected before
each timed run, outside the timing."""

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "workloads"))


def timed_run(workload):
    gc.collect()
    start = time.perf_counter()
    workload.run()
    return time.perf_counter() - start


def set_perf_mode(on, backend):
    if on:
        sys.activate_stack_trampoline(backend)
    else:
        sys.deactivate_stack_trampoline()


def timed_pairs(workload, pairs, backend):
    times = {False: [], True: []}
    for on in (True, False):
        set_perf_mode(on, backend)
        workload.run()
    for i in range(pairs):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            set_perf_mode(on, backend)
            times[on].append(timed_run(workload))
    return {"off": times[False], "on": times[True]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("--pairs", type=int)
    parser.add_argument("--backend", default="perf")
    parser.add_argument("--import-only", action="store_true")
    parser.add_argument("--warm", action="store_true")
    args = parser.parse_args()
    workload = __import__(args.workload)
    if args.warm:
        workload.run()
    if args.import_only:
        return
    if args.pairs is None:
        result = {"once": timed_run(workload)}
    else:
        result = timed_pairs(workload, args.pairs, args.backend)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
