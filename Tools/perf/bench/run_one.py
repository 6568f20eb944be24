"""Time one workload's run() in this process; print the seconds.

Usage: python run_one.py WORKLOAD"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "workloads"))
workload = __import__(sys.argv[1])
start = time.perf_counter()
workload.run()
print(time.perf_counter() - start)
