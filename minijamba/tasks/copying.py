"""Table 1 of the Mamba paper in its own setting: selective copying with 16 data tokens, its four rows, seeds.

Table 1 (Gu & Dao 2023, §4.1.1; setup in Appendix E.1): L 4096, vocabulary 16 (noise and marker included, so 14
data symbols: chance 1/14 = 7.1%), 16 data tokens, 2 layers, d_model 64, N 16; answer accuracy (%):

    S4 (no gate) 18.3    S6 (no gate) 97.0    Mamba block + S4 56.4    Mamba block + S6 99.8

CopyingConfig keeps everything but the length and the training budget: L is the longest at which the four rows
train in the few minutes each a 2-core CPU allows, and the steps are thousands, not the paper's 400K. Every row
and seed sees the same batches in the same order from the same init seed; the score is the answer accuracy on a
test set no run trains or selects on. The README's measured section has the table this writes.
"""

import math
import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from minijamba.checks import positive_int
from minijamba.tasks.data import selective_copying
from minijamba.tasks.model import TaskModel
from minijamba.tasks.runs import format_table, map_jobs, open_run
from minijamba.tasks.training import answer_accuracy, train_task

TEST_SEED = 1_000_000  # the test set's generators: far from every training and eval seed


@dataclass(frozen=True)
class Row:
    """One row of Table 1: a TaskModel architecture (block, selective), the paper's accuracy in %, and the peak
    learning rate this package trains it with (short trials of the S6 rows: the plain block learned fastest at 3e-3,
    the Mamba block at 1e-2; each LTI row takes its block's)."""

    name: str
    block: str
    selective: bool
    paper: float
    lr: float


ROWS = {
    "s4-plain": Row("S4 (no gate)", "plain", False, 18.3, 3e-3),
    "s6-plain": Row("S6 (no gate)", "plain", True, 97.0, 3e-3),
    "s4-mamba": Row("Mamba block + S4", "mamba", False, 56.4, 1e-2),
    "s6-mamba": Row("Mamba block + S6", "mamba", True, 99.8, 1e-2),
}


@dataclass
class CopyingConfig:
    """Table 1's task and models on a 2-core CPU (the paper's values in the comments)."""

    seq_len: int = 128  # paper 4096: here 112 noise/data slots, then 16 answer slots
    n_data: int = 16  # paper 16
    vocab: int = 16  # paper 16: noise, 14 data symbols, marker
    d_model: int = 64  # paper 64
    n_layers: int = 2  # paper 2
    d_state: int = 16  # paper 16
    batch: int = 32
    steps: int = 700  # paper 400K: what fits 12 runs in 20 minutes on 2 cores
    lr: float | None = None  # None: each row's own (Row.lr)
    warmup: int = 100
    eval_every: int = 100
    test_batches: int = 16  # the test set: test_batches x batch sequences, n_data answers each
    scan_impl: str = "auto"  # the fused CPU kernel (lesson 07): this training is scan-bound

    def __post_init__(self):
        for name in ("seq_len", "n_data", "vocab", "d_model", "n_layers", "d_state", "batch", "steps", "eval_every"):
            positive_int(name, getattr(self, name))
        positive_int("test_batches", self.test_batches)

    def make_batch(self, generator):
        return selective_copying(self.batch, self.seq_len, self.n_data, self.vocab, generator)

    def model(self, row):
        return TaskModel(
            self.vocab,
            self.d_model,
            self.n_layers,
            self.d_state,
            row.selective,
            scan_impl=self.scan_impl,
            block=row.block,
        )


def position_law(seq_len, n_data):
    """P(the k-th data token sits at slot p), (n_data, slots) float64, slots = seq_len - n_data.

    The generator puts the n_data tokens at a uniformly random set of distinct slots, so the k-th lies at p when
    k - 1 of the others are among the p slots before it and n_data - k among the slots after:
    C(p, k-1) · C(slots-1-p, n_data-k) / C(slots, n_data).
    """
    slots = seq_len - n_data
    law = [
        [math.comb(p, k - 1) * math.comb(slots - 1 - p, n_data - k) / math.comb(slots, n_data) for p in range(slots)]
        for k in range(1, n_data + 1)
    ]
    return torch.tensor(law, dtype=torch.float64)


def position_bet_accuracy(seq_len, n_data, vocab):
    """The answer accuracy of a model that bets on positions alone: at answer k, the symbol at the k-th data
    token's most likely slot (right when the token is there, else right by chance, 1 / (vocab - 2))."""
    chance = 1 / (vocab - 2)
    modal = position_law(seq_len, n_data).max(dim=1).values  # (n_data,)
    return (modal * (1 - chance) + chance).mean().item()


def position_vote_accuracy(seq_len, n_data, vocab, n_sequences=4000, seed=0):
    """The answer accuracy of a linear vote by position, the most an LTI readout of one-hot tokens can express:
    at answer k, each data symbol scores the sum of position_law[k] over the slots it occupies, and the highest
    score answers. Noise casts no vote (it is never an answer). Measured on n_sequences generated sequences."""
    inputs, targets = selective_copying(n_sequences, seq_len, n_data, vocab, seed)
    slots = seq_len - n_data
    votes = F.one_hot(inputs[:, :slots], vocab).to(torch.float64)  # (n_sequences, slots, vocab)
    votes[..., 0] = 0.0  # the noise symbol
    scores = torch.einsum("ks,bsv->bkv", position_law(seq_len, n_data), votes)  # (n_sequences, n_data, vocab)
    return (scores.argmax(-1) == targets[:, slots:]).double().mean().item()


def held_out_accuracy(model, config):
    """Answer accuracy on the test set: the same test_batches batches for every row, seed and run."""
    model.eval()
    batches = (config.make_batch(torch.Generator().manual_seed(TEST_SEED + i)) for i in range(config.test_batches))
    # every batch holds batch x n_data answers, so the mean of the batches' accuracies is the test set's
    return sum(answer_accuracy(model, inputs, targets) for inputs, targets in batches) / config.test_batches


def train_row(config, key, seed, save_dir=None, report=None):
    """Train one row of Table 1 from one seed: (its train_task history, its test accuracy, seconds).

    save_dir: the trained model is saved to save_dir/<row>-seed<seed> (TaskModel.save_pretrained), or None.
    report: called with a line of text after each eval, or None.
    """
    torch.manual_seed(seed)
    model = config.model(ROWS[key])

    def on_eval(entry):
        if report is not None:
            report(
                f"{key} seed {seed}: step {entry['step']:5d}  loss {entry['loss']:.3f}  "
                f"accuracy {entry['accuracy']:.3f}  {entry['seconds']:.0f} s"
            )

    start = time.perf_counter()
    history = train_task(
        model,
        config.make_batch,
        config.steps,
        lr=ROWS[key].lr if config.lr is None else config.lr,
        warmup=config.warmup,
        eval_every=config.eval_every,
        seed=seed,
        on_eval=on_eval,
    )
    accuracy = held_out_accuracy(model, config)
    if save_dir is not None:
        model.save_pretrained(f"{save_dir}/{key}-seed{seed}")
    return history, accuracy, time.perf_counter() - start


def copying_experiment(
    config=None, rows=tuple(ROWS), seeds=(0, 1, 2), log_path=None, save_dir=None, report=None, workers=1
):
    """Train every row of Table 1 once per seed; returns {row key: [test accuracy per seed]}.

    log_path: a JSONL log (runs.py) of every eval and the test scores, or None; a run's rows are written when it
    ends. save_dir, report: as in train_row. workers: runs side by side (runs.map_jobs), each on one thread.
    """
    config = config or CopyingConfig()
    log = open_run(log_path, "selective-copying", config, rows, ROWS, "rows", workers)
    jobs = [(key, seed) for key in rows for seed in seeds]
    run = partial(train_row, config, save_dir=save_dir, report=report)
    results = {}
    for (key, seed), (history, accuracy, seconds) in zip(jobs, map_jobs(run, jobs, workers), strict=True):
        for entry in history:
            log.write(kind="train", model=key, seed=seed, **entry)
        log.write(kind="test", model=key, seed=seed, accuracy=accuracy, seconds=seconds)
        results.setdefault(key, []).append(accuracy)
    return results


def results_from_log(rows):
    """{row key: [test accuracy per seed]} from a log's rows (runs.read_log), as copying_experiment returns it."""
    results = {}
    for row in rows:
        if row.get("kind") == "test":
            results.setdefault(row["model"], []).append(row["accuracy"])
    return results


def table(results):
    """Table 1 beside the paper's: one line per row, the mean, spread and each seed's accuracy in %."""
    lines = []
    for key, accuracies in results.items():
        pct = [100 * a for a in accuracies]
        spread = f" ± {statistics.stdev(pct):.1f}" if len(pct) > 1 else ""
        each = ", ".join(f"{p:.1f}" for p in pct)
        lines.append((ROWS[key].name, f"{ROWS[key].paper:.1f}", f"{statistics.mean(pct):.1f}{spread}", each))
    return format_table(("model", "paper (L 4096)", "here: mean ± sd", "each seed"), lines)
