"""How the benchmarks measure: wall-clock time (best of a few runs) and peak extra CPU memory.

Peak memory comes from the torch profiler's allocator events: every allocation and free records the running
total the CPU allocator holds, so the peak during a call minus the total before it is the extra memory the call
needed at its worst moment (inputs that existed before the call are not counted).

pos_int, threads_arg, pos_float, int_list: the argparse types of the benchmarks' flags.
"""

import argparse
import json
import math
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile


def best_time(fn, repeats=3, slow=1.0):
    """The fastest of a few timed runs of fn(), in seconds. The first run warms up (allocator, caches); when it
    alone takes more than `slow` seconds, one more run is enough to time it."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if i == 1 and times[0] > slow:
            break
    return min(times[1:])


def peak_extra_bytes(fn):
    """Peak bytes the CPU allocator held during fn() beyond what it held before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        os.remove(path)
    if not events:
        return 0
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def describe_machine():
    """One line naming the machine a table was measured on."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# argparse types for the benchmarks' flags: a bad value is argparse's one-line "error: argument --flag: ..."
# (exit status 2) before anything is built or timed, not a traceback from deep inside a run.
def _int_at_least(text, low, expected):
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def pos_int(text):
    """An int >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def threads_arg(text):
    """An int >= 0 (0: torch's default number of threads)."""
    return _int_at_least(text, 0, "0 (torch's default) or a positive integer")


def pos_float(text):
    """A finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(text):
    """A comma-separated list of positive ints, e.g. "128,256,512" -> [128, 256, 512]."""
    try:
        return [pos_int(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
