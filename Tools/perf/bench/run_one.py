"""Time one workload's run() in this process; print the seconds.

The best of the workload's REPEAT runs (default 3) is printed: scheduling
noise only ever adds time.  Usage: python run_one.py WORKLOAD"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "workloads"))
workload = __import__(sys.argv[1])
best = float("inf")
for _ in range(getattr(workload, "REPEAT", 3)):
    start = time.perf_counter()
    workload.run()
    best = min(best, time.perf_counter() - start)
print(best)
