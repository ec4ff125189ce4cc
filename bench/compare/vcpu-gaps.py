#!/usr/bin/env python3
"""Shows whether the host takes CPUs away from this machine.

Runs N busy processes for S seconds; each reads the monotonic clock in a loop
and reports every gap longer than 2 ms between two reads (time it did not
run). On the 2-vCPU VM of docs/benchmarks.md, one busy process sees no gaps
and two see 4-5 ms gaps about once a second: the host preempts a vCPU when
both are busy, and /proc/stat shows no steal time for it.

usage: bench/compare/vcpu-gaps.py [processes=2] [seconds=5]
"""
import multiprocessing
import sys
import time


def spin(seconds, out):
    end = time.monotonic() + seconds
    last = time.monotonic()
    gaps = []
    while last < end:
        t = time.monotonic()
        if t - last > 0.002:
            gaps.append(round((t - last) * 1000, 1))
        last = t
    out.put(gaps)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 5
    q = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=spin, args=(secs, q)) for _ in range(n)]
    for p in procs:
        p.start()
    for i in range(n):
        gaps = q.get()
        print(f"process {i}: {len(gaps)} gaps over 2 ms in {secs:g} s, ms: {gaps[:20]}")
    for p in procs:
        p.join()
