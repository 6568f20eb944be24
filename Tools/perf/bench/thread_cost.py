"""What one more thread costs a single-threaded program, without perf mode.

    build/stock/python Tools/perf/bench/thread_cost.py none|thread WORKLOAD

Imports WORKLOAD from Tools/perf/bench/workloads, runs it once untimed
and once timed, and prints the seconds of the timed run.  With "thread",
one empty thread is started and joined first: glibc's malloc and free
keep a cheaper path only while a process has never had a second thread,
and perf mode's flusher thread ends that.  Count instructions of the two
with callgrind to see glibc's share of perf mode's cost."""

import importlib
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "workloads"))


def main():
    mode, name = sys.argv[1:3]
    if mode == "thread":
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
    elif mode != "none":
        sys.exit(f"usage: {sys.argv[0]} none|thread WORKLOAD")
    workload = importlib.import_module(name)
    workload.run()
    start = time.perf_counter()
    workload.run()
    print(time.perf_counter() - start)


if __name__ == "__main__":
    main()
