"""fork() + os._exit() in the child, with a 100,000-line perf map.

    build/stock/python Tools/perf/bench/fork_cost.py [ROUNDS] [threading]
    build/python -X perf Tools/perf/bench/fork_cost.py [ROUNDS] [threading]

Runs 100,000 fresh functions (in perf mode: 100,000 map lines), then
forks ROUNDS times (default 40), each child leaving at once with
os._exit(0), and prints the median time of one fork + wait.  With
"threading", the threading module is imported first: its fork handler
runs Python code in every child, as in most real programs."""

import os
import sys
import time

FUNCTIONS = 100_000


def run_fresh_functions():
    namespace = {}
    exec("\n".join(f"def f{i}(): return {i}" for i in range(FUNCTIONS)),
         namespace)
    for i in range(FUNCTIONS):
        namespace[f"f{i}"]()


def fork_and_wait():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    if "threading" in sys.argv[2:]:
        import threading  # noqa: F401 (its fork handler is the point)
    run_fresh_functions()
    for _ in range(5):
        fork_and_wait()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fork_and_wait()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"median fork + os._exit + wait: {times[len(times) // 2] * 1e3:.2f}"
          f" ms ({rounds} rounds)")


if __name__ == "__main__":
    main()
