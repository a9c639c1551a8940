"""What the command-line experiments share: a JSONL log written row by row, the saved models, the printed table.

A log row is one JSON object per line: {"experiment", "model", "seed", "kind", ...}. kind "train" rows are the
history of train_task (step, loss, accuracy on the fixed eval set, seconds); kind "test" rows are the final scores
on a separate test set (copying.py: at the training length; induction.py: one row per test length). A log is
rewritten from scratch by each full run, and each row is flushed as it is made, so a stopped run keeps its rows.
"""

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from minijamba.checkpoint import atomic_write
from minijamba.checks import positive_int

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "lessons" / "logs"  # the committed logs of the full runs (lesson 09 plots them)
MODELS = ROOT / "lessons" / "models"  # the committed models of the full runs


class Log:
    """A JSONL file opened for one run: `write(**row)` appends a row and flushes it. path None: rows are kept only."""

    def __init__(self, path, experiment):
        self.path, self.experiment, self.rows = None if path is None else Path(path), experiment, []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: tmp.write_text(""))  # a new run replaces the old log whole

    def write(self, **row):
        row = {"experiment": self.experiment, **row}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def open_run(log_path, experiment, config, chosen, known, what, workers):
    """Check an experiment's arguments, open its log and write the config row first; returns the Log.

    chosen: the rows or models asked for, each one of `known` (named `what` in the error); workers >= 1.
    """
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise ValueError(f"{what} must be a non-empty list of {list(known)}, got {list(chosen)}")
    positive_int("workers", workers)
    log = Log(log_path, experiment)
    log.write(kind="config", **asdict(config))
    return log


def read_log(path):
    """The rows of a JSONL log, as a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def format_table(header, rows):
    """A Markdown table (the README's format) from a header tuple and rows of strings."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def say(line):
    """Print a progress line at once (a worker process's stdout is the terminal's too)."""
    print(line, flush=True)


def _one_thread():
    torch.set_num_threads(1)


def map_jobs(function, jobs, workers=1):
    """[function(*job) for job in jobs], in order, yielded as each finishes in that order.

    workers > 1: in that many fresh ("spawn") processes of one torch thread each. These models are too small for a
    second thread to help (tasks/__init__.py), so two 1-thread runs side by side finish nearly twice as fast as two
    2-thread runs in a row. `function` must be importable (a module's top-level function or a partial of one).
    """
    if workers == 1:
        for job in jobs:
            yield function(*job)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch has started its thread pool can deadlock
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        yield from pool.map(function, *zip(*jobs, strict=True))
