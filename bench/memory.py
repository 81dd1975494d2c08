"""Resident memory of this process, for the benchmarks that report what work costs in it."""

from __future__ import annotations

import os
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_during(work):
    """`work()`'s result, its seconds, and the most resident memory rose above where it
    stood before (sampled every 5 ms, and once more at the end)."""
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        result = work()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, seconds, max(peak[0], rss_bytes()) - before
