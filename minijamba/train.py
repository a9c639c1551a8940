"""Train a small Jamba (or Mamba, or Transformer) on TinyStories: `python -m minijamba.train` (what `make train` runs).

    python -m minijamba.train                                   # jamba, preset cpu20: a 20-minute budget on 2 cores
    python -m minijamba.train --model transformer --lr 3e-3     # any TrainConfig field is a --flag
    python -m minijamba.train --out_dir runs/jamba --resume     # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m minijamba.train              # DistributedDataParallel, one process per device

The loop, in order: a batch of random windows (data.get_batch, one seeded generator), forward, cross-entropy + the
MoE load-balancing loss times router_aux_loss_coef, backward, clip the gradient norm, AdamW step with warmup then
cosine decay (optim.py). Every eval_every steps: validation loss (nats/token) and bits/byte on a fixed set of
validation windows, a row in <out_dir>/log.jsonl, and a checkpoint. At the end, three stories.

train() runs these stages in order, each a function below that is handed the state it needs:
    start_or_resume       the process (rank, device under torchrun), the config (a resumed run's own), every check
    load_data             the tokenizer (trained on the training text, or the checkpoint's) and the token streams
    model_and_optimizer   the LM (fresh, or the checkpoint's), AdamW, the batch generator, the step and the clock
    open_log              log.jsonl cut back to the step the run starts from, and run.json
    train_loop            train_step until max_steps or the clock's budget, evaluate_and_save every eval_every
    final_report          the final evaluation on more windows, the summary line, the stories

The log (read_log reads it back), one JSON object a line: every log_every steps {step, loss (mean cross-entropy of
those steps), lr (the last step's), elapsed_s}; every eval_every steps {step, tokens, elapsed_s, val_loss, val_bpb};
once at the end {step, final_val_loss, final_val_bpb, final_eval_tokens}.

Models (train_config.PRESETS gives each its shape, by name in models.PRESETS, and its own learning rate):
    jamba        JambaLM: Mamba layers, one attention layer in attn_layer_period, MoE every other layer
    mamba        MambaLM: Mamba blocks only (no MLPs)
    transformer  JambaLM with every layer attention (the "all-attention" layout): the same code path, no Mamba

Checkpoints (<out_dir>/ckpt-<step>/, named by <out_dir>/latest): config.json + model.safetensors (the HF layout,
`save_pretrained`), tokenizer.json, train_config.json, and train_state.pt (optimizer, step, the batch generator's
state) read back with torch.load(weights_only=True). Each file is written by checkpoint.atomic_write (a temp file,
then a rename), and `latest` is switched only once a checkpoint folder is complete, so a crash at any moment leaves
the last good one. sample.py reads them back (load_run). On CPU, `--resume` continues bit for bit: the losses equal
those of an uninterrupted run.

A run folder belongs to one run: a new run refuses a folder that holds one (log.jsonl, run.json, latest or a
ckpt-* folder) unless --resume continues it or --overwrite replaces it (deleting its files and the checkpoint
folders train.py wrote, those holding a train_state.pt); out_dir may not be the current directory. One process
writes a folder at a time: <out_dir>/.lock holds the writer's pid and host; a second run refuses, naming them; a lock
whose pid is dead on this host is stale: it is replaced and said so. Old checkpoints are deleted only if this run
wrote them (or resumed from them). A checkpoint is written only when every parameter and the validation loss are
finite, and after its validation row, so the log never lacks the row of the checkpoint `latest` names.

Resume: the flags in RESUME_FIXED (the data, the model, its shape, the batches) must keep the run's values: given
with others, the run refuses. Any other field given is applied and printed, and a changed learning-rate schedule is
stated (e.g. --max_steps 40 after 20 steps: the cosine is now over 40 steps). "Given" means a flag on the command
line (main passes them); train(cfg) called directly takes every field of cfg as given. A finished run (max_steps
or max_minutes reached, final row written) resumes to nothing but a line saying so.

Interrupts: SIGINT (Ctrl-C) or SIGTERM finishes the current step, evaluates and saves a checkpoint, and stops with
one line saying how to resume; the exit code is 130 (SIGINT) or 143 (SIGTERM). A second signal stops at once
(the last complete checkpoint stays). Every other failure is one `error: ...` line and exit code 1.

Distributed (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK): every rank draws the same global batch from the same
generator and trains on its own rows; DistributedDataParallel averages the gradients, so the update is the one a
single process makes on the whole batch. gloo on CPU, nccl on CUDA; rank 0 alone logs, samples and saves.

Glossary: context — T, tokens per window;  batch_size — B, windows per step (the global batch under DDP);
bits/byte — total validation nats / ln 2 / bytes of validation text (see data.py).
"""

import argparse
import json
import math
import os
import pickle
import platform
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from .checkpoint import atomic_write
from .download import DEFAULT_DIR, check_downloaded
from .models import build_model, count_parameters, load_pretrained
from .optim import adamw, warmup_cosine
from .sample import checkpoint_dir, sample_stories
from .train_config import TrainConfig, model_config, resolve_device

__all__ = [
    "TrainConfig",
    "LOGS_DIR",
    "TrainingDiverged",
    "TrainingInterrupted",
    "compute_loss",
    "lr_at",
    "progress_line",
    "train",
    "read_log",
    "main",
]

TOKENIZER_CHARS = 50_000_000  # --data full: the BPE learns its merges from this much of the training text
# The README's measured runs: each one's log.jsonl, committed as lessons/logs/08_<run>.jsonl (found from the package,
# so lesson 08 reads them from whatever folder it runs in)
LOGS_DIR = Path(__file__).resolve().parents[1] / "lessons" / "logs"
# What --resume may not change: the data, the model and its shape, the batches. Every other field may change.
RESUME_FIXED = ("model", "preset", "vocab_size", "context", "batch_size", "seed", "data", "data_dir", "max_stories")
# This session's own settings: never read back from the run's train_config.json
SESSION_FIELDS = ("out_dir", "resume", "overwrite", "device", "compile", "threads")
SCHEDULE_FIELDS = ("lr", "max_steps", "max_minutes", "warmup_steps", "min_lr_ratio")
RUN_FILES = ("log.jsonl", "run.json", "latest")  # with the ckpt-* folders: what makes a folder a run's
LOCK_FILE = ".lock"
STATE_KEYS = ("step", "elapsed", "optimizer", "generator")


class TrainingDiverged(RuntimeError):
    """The loss, the validation loss or a parameter became inf or nan; the message names the step and the
    checkpoint that was kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM: the run stopped after a step and saved a checkpoint; the message says how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


def compute_loss(model, inputs, targets, aux_loss_coef=0.0):
    """(loss to minimise, cross-entropy in nats/token): the LM loss plus aux_loss_coef · the MoE aux loss."""
    out = model(inputs)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())  # logits (batch, context, vocab)
    return ce + aux_loss_coef * out.aux_loss, ce


def lr_at(cfg, step, elapsed):
    """The learning rate of `step` after `elapsed` seconds: optim.warmup_cosine over cfg's schedule fields, by steps
    or by the clock of max_minutes, whichever is further along."""
    budget = None if cfg.max_minutes is None else 60 * cfg.max_minutes
    return cfg.lr * warmup_cosine(step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio, elapsed, budget)


def progress_line(cfg, step, elapsed, steps_per_s):
    """(fraction of the run done, the progress bar's text) after `step` steps and `elapsed` seconds at steps_per_s.

    A run ends at max_steps or when the clock reaches max_minutes, whichever comes first, and the schedule follows
    the one further along (lr_at): so is the bar. With a budget it shows the minutes used and left and the steps the
    run will reach at the current speed, not a max_steps it may never get to."""
    if cfg.max_minutes is None:
        return step / cfg.max_steps, f"step {step}/{cfg.max_steps}"
    budget = 60 * cfg.max_minutes
    left = max(0.0, min(budget - elapsed, (cfg.max_steps - step) / steps_per_s if steps_per_s > 0 else budget))
    expected = min(cfg.max_steps, step + round(left * steps_per_s))
    fraction = max(step / cfg.max_steps, elapsed / budget)
    return min(1.0, fraction), f"{elapsed / 60:.1f} min, {left / 60:.1f} left, step {step} of ~{expected}"


def read_log(path):
    """The rows of a log.jsonl that train() wrote (a file path or a run folder), one dict per line, in order; a line
    that is not such a row is a ValueError naming the file and the line."""
    path = Path(path)
    path = path / "log.jsonl" if path.is_dir() else path
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path} line {number} is not a log row ({line[:40]!r}): delete that line, or the file")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The state the stages pass along
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Process:
    """Where this process trains: its rank among `world` processes (1 without torchrun), its device, its autocast."""

    rank: int
    world: int
    device: str
    autocast: object  # a context manager: bfloat16 autocast on CUDA, nothing on CPU
    lock: Path | None = None  # <out_dir>/.lock, held by rank 0 until train() returns or fails

    def say(self, *args):
        """print, on rank 0 only."""
        if self.rank == 0:
            print(*args)


@dataclass
class Progress:
    """How far the run is: optimizer steps taken and seconds of training (a resumed run continues both)."""

    step: int = 0
    elapsed: float = 0.0


@dataclass
class Resume:
    """The checkpoint a resumed run starts from, and its train_state.pt (read once, at the start)."""

    ckpt: Path
    state: dict


@dataclass
class Run:
    """What the loop and the evaluations read, set up once by the first stages."""

    cfg: TrainConfig
    proc: Process
    tokenizer: object
    train_stream: object  # 1-D token ids (NumPy)
    valid_stream: object
    model: torch.nn.Module  # the LM itself: evaluated, saved and sampled
    forward: torch.nn.Module  # what a training step calls: the LM, wrapped by DDP and torch.compile when asked
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the batches: the same on every rank
    val_windows: tuple  # (inputs, targets), each (eval_windows, context): the same ones at every evaluation
    token_bytes: torch.Tensor  # (vocab,): bytes of text per id, for bits/byte
    checkpoints: list = field(default_factory=list)  # this run's checkpoint folders: the only ones it deletes

    @property
    def out_dir(self):
        return Path(self.cfg.out_dir)

    @property
    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.context


# ----------------------------------------------------------------------------------------------------------
# Start or resume; data; model and optimizer
# ----------------------------------------------------------------------------------------------------------


def _distributed():
    """(rank, world size, device) under torchrun, (0, 1, None) otherwise; starts the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = None
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def _check_out_dir(cfg):
    """out_dir as a Path, refused when it is the current directory or a file."""
    out = Path(cfg.out_dir)
    if not str(cfg.out_dir).strip() or out.resolve() == Path.cwd().resolve():
        raise ValueError(f"--out_dir {cfg.out_dir!r} is the current directory: name a folder for the run, "
                         f"e.g. --out_dir runs/{cfg.model}")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out_dir {out} is a file, not a folder: name another --out_dir")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out_dir, --overwrite replaces it: pass one of them")
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _take_lock(out, say):
    """Create <out>/.lock (pid, host) or refuse, naming the run that holds it; replace a stale one, saying so."""
    path, host = out / LOCK_FILE, socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                pid, owner_host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ValueError(f"{path} exists but names no owner (a run starting right now, or a damaged lock): "
                                 "if no run uses this folder, delete the file") from None  # fmt: skip
            if owner_host != host or _alive(pid):
                raise ValueError(f"{out} is in use by another training run (pid {pid} on {owner_host}, see {path}): "
                                 "wait for it, stop it, or pick another --out_dir") from None  # fmt: skip
            say(f"{path}: replaced a stale lock of pid {pid} on {host} (no such process: a run that was killed)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host}, f)
        return path
    raise ValueError(f"{path}: another run took the lock while this one replaced a stale one: pick another --out_dir")


def _release_lock(path):
    """Remove the lock if this process still holds it."""
    try:
        if path is not None and json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass  # gone or replaced by hand: not ours to remove any more


def _run_files(out):
    """The names in `out` that make it a run's folder."""
    return [name for name in RUN_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("ckpt-*"))


def _clear_run(out, say):
    """--overwrite: delete the run in `out`: its files and the checkpoint folders train.py wrote (a train_state.pt)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for ckpt in out.glob("ckpt-*"):
        if (ckpt / "train_state.pt").is_file():
            shutil.rmtree(ckpt)
    say(f"--overwrite: removed the run that was in {out}")


def _load_state(ckpt):
    """train_state.pt as a dict (weights_only), or one ValueError naming the file."""
    path = ckpt / "train_state.pt"
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable training state ({first}): the checkpoint is damaged; "
                         "start the run again with --overwrite") from None  # fmt: skip
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        raise ValueError(f"{path}: not a training state (it needs {', '.join(STATE_KEYS)}): the checkpoint is damaged")
    return state


def _schedule(cfg):
    clock = f" or {cfg.max_minutes} min, whichever ends first" if cfg.max_minutes is not None else ""
    return (f"warmup {cfg.warmup_steps} steps, then a cosine from lr {cfg.lr:.3g} to {cfg.lr * cfg.min_lr_ratio:.3g} "
            f"over {cfg.max_steps} steps{clock}")  # fmt: skip


def _resumed_config(cfg, saved, given, state, say):
    """The run's saved config with what this session was given: RESUME_FIXED fields must match, others apply."""
    given = {f.name for f in fields(TrainConfig)} if given is None else set(given)
    clash = [f"--{k} {getattr(cfg, k)!r} (the run has {saved[k]!r})" for k in RESUME_FIXED
             if k in given and getattr(cfg, k) != saved[k]]  # fmt: skip
    if clash:
        raise ValueError(f"--resume: these cannot change in a run: {'; '.join(clash)}; drop them, or start a new "
                         "run in another --out_dir")  # fmt: skip
    changed = {k: getattr(cfg, k) for k in sorted(given - set(SESSION_FIELDS)) if getattr(cfg, k) != saved[k]}
    try:
        new = TrainConfig(**{**saved, **changed, **{k: getattr(cfg, k) for k in SESSION_FIELDS}})
        old = TrainConfig(**saved)
    except ValueError as e:
        raise ValueError(f"{cfg.out_dir}: {e}") from None
    for k, v in changed.items():
        say(f"resume: {k} {saved[k]!r} -> {v!r}")
    if changed.keys() & set(SCHEDULE_FIELDS):
        step, elapsed = state["step"], state["elapsed"]
        say(f"resume: the learning-rate schedule is now {_schedule(new)} (was {_schedule(old)}); the lr at step "
            f"{step} is now {lr_at(new, step, elapsed):.3g} (was {lr_at(old, step, elapsed):.3g})")  # fmt: skip
    return new


def start_or_resume(cfg, given=None):
    """(cfg, Resume or None, Process). A resumed run takes the config it began with, but for what `given` names
    (see _resumed_config). Every check that needs no data runs here, before any work; rank 0 takes the lock."""
    rank, world, ddp_device = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    say = print if rank == 0 else (lambda *args: None)
    out = _check_out_dir(cfg)
    device = ddp_device or resolve_device(cfg.device)  # a GPU this machine lacks fails here
    if cfg.resume:
        checkpoint_dir(out)  # a missing run fails here, before the folder is made
    else:
        model_config(cfg)  # a shape that does not divide fails here, before any data is read
    lock = None
    try:
        if rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = _take_lock(out, say)
            except OSError as e:
                raise ValueError(f"--out_dir {out}: cannot write there ({e.strerror or e}): name a folder you can "
                                 "write to") from None  # fmt: skip
        resume = None
        if cfg.resume:
            ckpt = checkpoint_dir(out)
            state = _load_state(ckpt)
            saved = asdict(TrainConfig.from_json(ckpt / "train_config.json"))  # one-line errors naming the file
            cfg = _resumed_config(cfg, saved, given, state, say)
            model_config(cfg)
            resume = Resume(ckpt, state)
        elif _run_files(out):
            if not cfg.overwrite:
                raise ValueError(f"{out} holds a run already ({', '.join(_run_files(out)[:4])}): pass --resume to "
                                 "continue it, --overwrite to replace it, or another --out_dir")  # fmt: skip
            if rank == 0:
                _clear_run(out, say)
    except BaseException:
        _release_lock(lock)
        raise
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in str(device) else nullcontext()
    return cfg, resume, Process(rank, world, device, autocast, lock)


def load_data(cfg, resume, say=print):
    """(tokenizer, train stream, valid stream): a resumed run keeps its tokenizer, a fresh one trains its own."""
    t0 = time.perf_counter()
    tokenizer = data.load_tokenizer(resume.ckpt) if resume is not None else None
    if cfg.data == "full":  # ~2 GB: the tokenizer learns from the first TOKENIZER_CHARS, streams are memory-mapped
        data_dir = Path(cfg.data_dir or DEFAULT_DIR)
        check_downloaded(data_dir)
        if tokenizer is None:
            head = data.read_text("train", data_dir, max_chars=TOKENIZER_CHARS)  # a bad file: one line naming it
            tokenizer = data.train_tokenizer(data.split_stories(head), cfg.vocab_size)
        train_stream, valid_stream = (data.encode_file(tokenizer, data_dir / f"{s}.txt") for s in data.SPLITS)
    else:
        train_stories = data.split_stories(data.read_text("train"))[: cfg.max_stories]
        valid_stories = data.split_stories(data.read_text("valid"))[: cfg.max_stories]
        if tokenizer is None:
            tokenizer = data.train_tokenizer(train_stories, cfg.vocab_size)
        train_stream = data.encode_stories(tokenizer, train_stories)
        valid_stream = data.encode_stories(tokenizer, valid_stories)
    say(f"data: {cfg.data}, {len(train_stream):,} training tokens, {len(valid_stream):,} validation tokens, "
        f"vocab {tokenizer.get_vocab_size()} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return tokenizer, train_stream, valid_stream


def model_and_optimizer(cfg, resume, proc):
    """(model, optimizer, batch generator, Progress): fresh and seeded, or as the checkpoint left them."""
    torch.manual_seed(cfg.seed)  # the init
    if resume is None:
        model = build_model(model_config(cfg))
    else:
        model = load_pretrained(resume.ckpt, scan_impl=cfg.scan_impl)
    model = model.to(proc.device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)  # the batches: the same on every rank
    progress = Progress()
    if resume is not None:
        optimizer.load_state_dict(resume.state["optimizer"])
        generator.set_state(resume.state["generator"])
        progress = Progress(resume.state["step"], resume.state["elapsed"])
        proc.say(f"resumed from {resume.ckpt} at step {progress.step}")
    return model, optimizer, generator, progress


def wrap_model(model, cfg, proc):
    """What a training step calls: the model under DistributedDataParallel (several processes), then torch.compile."""
    if proc.world > 1:
        moe = any(layer.is_moe for layer in model.layers)  # an expert may get no token in a step
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=moe)
    return torch.compile(model) if cfg.compile else model


def open_log(run, progress, resume):
    """Rank 0: log.jsonl keeps only the rows up to the step the run starts from (a crashed session's later rows go),
    and run.json records the config, the parameter counts and the machine. Every rank: the summary line."""
    cfg, proc = run.cfg, run.proc
    total, active = count_parameters(model_config(cfg))
    if proc.rank == 0:
        log_path = run.out_dir / "log.jsonl"
        rows = read_log(log_path) if resume is not None and log_path.exists() else []
        kept_rows = [json.dumps(r) + "\n" for r in rows if r["step"] <= progress.step]
        atomic_write(log_path, lambda tmp: tmp.write_text("".join(kept_rows)))
        machine = {
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(proc.device),
        }
        info = {**asdict(cfg), "params_total": total, "params_active": active, "world_size": proc.world, **machine}
        _write_json(run.out_dir / "run.json", info)
    proc.say(f"{cfg.model} ({cfg.preset}): {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
             f"{proc.world} process(es) on {proc.device}; batch {cfg.batch_size} x context {cfg.context}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def train_step(run, progress):
    """One optimizer step at progress.step; returns (the global batch's cross-entropy, the learning rate used)."""
    cfg, proc = run.cfg, run.proc
    lr = lr_at(cfg, progress.step, progress.elapsed)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inputs, targets = data.get_batch(run.train_stream, cfg.batch_size, cfg.context, run.generator)  # (batch, context)
    share = cfg.batch_size // proc.world
    rows = slice(proc.rank * share, (proc.rank + 1) * share)  # this process's share of the global batch
    inputs, targets = inputs[rows].to(proc.device), targets[rows].to(proc.device)  # (batch / world, context)
    with proc.autocast:
        loss, ce = compute_loss(run.forward, inputs, targets, run.model.aux_loss_coef)  # aux_loss_coef 0: MambaLM
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.forward.parameters(), cfg.grad_clip)
    ce = ce.detach()
    if proc.world > 1:
        dist.all_reduce(ce, op=dist.ReduceOp.AVG)  # the global batch's loss, the same on every rank
    ce = ce.item()
    if not math.isfinite(ce):  # stop before the step: the weights and the last checkpoint stay finite
        raise TrainingDiverged(
            f"loss is {ce} at step {progress.step + 1} (lr {lr:.3g}): training stopped; {_kept(run)}; "
            "try a lower --lr or more --warmup_steps"
        )
    run.optimizer.step()
    return ce, lr


def _kept(run):
    """Which checkpoint a stopped run leaves: `latest` names only complete, finite ones."""
    if (run.out_dir / "latest").exists():
        return f"the last good checkpoint, {checkpoint_dir(run.out_dir)}, is kept"
    return "no checkpoint was written yet"


def _finished(cfg, progress):
    return progress.step >= cfg.max_steps or (cfg.max_minutes is not None and progress.elapsed >= 60 * cfg.max_minutes)


def train_loop(run, progress, stop):
    """train_step until max_steps or the clock's budget, with a log row every log_every steps and evaluate_and_save
    every eval_every steps and after the last; returns the last evaluation's metrics. `stop`, a list, turns non-empty
    (the signal's number) when SIGINT or SIGTERM arrives: the step ends, is saved, and TrainingInterrupted is raised."""
    cfg = run.cfg
    clock_start = time.perf_counter() - progress.elapsed  # the clock continues a resumed run's
    session_start, session_step = time.perf_counter(), progress.step
    losses, metrics = [], {}
    bar = tqdm(total=1000, disable=run.proc.rank != 0, dynamic_ncols=True, desc=cfg.model,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| first step")  # fmt: skip
    run.forward.train()
    while not _finished(cfg, progress):
        ce, lr = train_step(run, progress)
        progress.step += 1
        progress.elapsed = time.perf_counter() - clock_start
        losses.append(ce)
        steps_per_s = (progress.step - session_step) / (time.perf_counter() - session_start)
        done, text = progress_line(cfg, progress.step, progress.elapsed, steps_per_s)
        text += f", loss {ce:.3f}, lr {lr:.2e}, {steps_per_s * run.tokens_per_step:,.0f} tok/s"
        # The bar shows the run's fraction done (in thousandths) and the text, literal braces escaped.
        bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| " + text.replace("{", "{{").replace("}", "}}")
        bar.update(round(1000 * done) - bar.n)
        if progress.step % cfg.log_every == 0:
            row = {"step": progress.step, "loss": sum(losses) / len(losses), "lr": lr, "elapsed_s": progress.elapsed}
            _log(run, row)
            losses = []
        if progress.step % cfg.eval_every == 0:
            metrics = evaluate_and_save(run, progress)
            bar.write(f"step {progress.step}: val loss {metrics['val_loss']:.4f} nats/token, "
                      f"{metrics['val_bpb']:.4f} bits/byte")  # fmt: skip
        if run.proc.world > 1:  # every rank stops after the same step, whichever the signal reached first
            signum = torch.tensor([stop[0] if stop else 0], device=run.proc.device)
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
            stop[:] = [int(signum.item())] if signum.item() else []
        if stop:
            bar.close()
            if progress.step % cfg.eval_every:
                evaluate_and_save(run, progress)
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(stop[0]).name} after step {progress.step}, saved as "
                f"{checkpoint_dir(run.out_dir)}; continue with: python -m minijamba.train --out_dir {run.out_dir} "
                "--resume",
                stop[0],
            )
    bar.close()
    if progress.step == session_step:  # a finished run resumed: its checkpoint and that one's row are there
        rows = [r for r in read_log(run.out_dir) if "val_loss" in r and r["step"] == progress.step]
        return {"val_loss": rows[-1]["val_loss"], "val_bpb": rows[-1]["val_bpb"]} if rows else {}
    if not metrics or progress.step % cfg.eval_every:  # the last step was not evaluated yet
        metrics = evaluate_and_save(run, progress)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Evaluation, checkpoints, the log
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, inputs, targets, token_bytes, batch_size, autocast, rank=0, world=1):
    """Validation loss (nats/token) and bits/byte over the windows (inputs, targets) (n, context), sharded by rank."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    mine = torch.arange(rank, len(inputs), world)
    for i in range(0, len(mine), batch_size):
        x, y = inputs[mine[i : i + batch_size]].to(device), targets[mine[i : i + batch_size]].to(device)
        with autocast:
            logits = model(x).logits  # (batch, context, vocab)
        sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").double()
        sums[1] += y.numel()
        sums[2] += token_bytes[y.cpu()].sum().item()
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    nats, tokens, n_bytes = sums.tolist()
    return {"val_loss": nats / tokens, "val_bpb": data.bits_per_byte(nats, n_bytes)}


def evaluate_and_save(run, progress):
    """Score the validation windows; if the loss and every parameter are finite, the log row, then a checkpoint
    (rank 0): a crash between the two leaves a row past `latest`, which a resumed run cuts. Returns {"val_loss",
    "val_bpb"}; a non-finite model is TrainingDiverged, with the last good checkpoint kept."""
    cfg, proc = run.cfg, run.proc
    metrics = evaluate(run.model, *run.val_windows, run.token_bytes, cfg.batch_size, proc.autocast, proc.rank,
                       proc.world)  # fmt: skip
    bad = [name for name, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    if bad or not math.isfinite(metrics["val_loss"]):
        what = f"{len(bad)} parameters (first {bad[0]}) are not finite" if bad else "the validation loss is not finite"
        raise TrainingDiverged(f"{what} at step {progress.step}: training stopped; {_kept(run)}; try a lower --lr "
                               "or more --warmup_steps")  # fmt: skip
    tokens = progress.step * run.tokens_per_step
    _log(run, {"step": progress.step, "tokens": tokens, "elapsed_s": progress.elapsed, **metrics})
    if proc.rank == 0:
        try:
            ckpt = save_run(run.out_dir, run.model, run.tokenizer, cfg, run.optimizer, run.generator, progress.step,
                            progress.elapsed, previous=run.checkpoints)  # fmt: skip
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"could not write a checkpoint into {run.out_dir} ({first}): free some disk space, "
                             f"then continue with --resume; {_kept(run)}") from None  # fmt: skip
        run.checkpoints[:] = [ckpt]
    if proc.world > 1:
        dist.barrier()  # no rank runs ahead of a checkpoint it could need
    return metrics


def _log(run, row):
    """Append one row to <out_dir>/log.jsonl (rank 0)."""
    if run.proc.rank == 0:
        with open(run.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def save_run(out_dir, model, tokenizer, cfg, optimizer, generator, step, elapsed, previous=()):
    """Write <out_dir>/ckpt-<step>/, then point <out_dir>/latest at it, then delete the `previous` checkpoint
    folders (this run's). A failed write removes the half-written folder; `latest` keeps naming the last one."""
    out_dir = Path(out_dir)
    ckpt = out_dir / f"ckpt-{step:07d}"
    fresh = not ckpt.exists()
    try:
        with warnings.catch_warnings():  # the transformer baseline's rope has no HF counterpart: known and wanted
            warnings.filterwarnings("ignore", message=".*no HF Jamba counterpart")
            model.save_pretrained(ckpt)
        data.save_tokenizer(tokenizer, ckpt)
        _write_json(ckpt / "train_config.json", asdict(cfg))
        state = {"step": step, "elapsed": elapsed, "optimizer": optimizer.state_dict(),
                 "generator": generator.get_state()}  # fmt: skip
        atomic_write(ckpt / "train_state.pt", lambda tmp: torch.save(state, tmp))
        atomic_write(out_dir / "latest", lambda tmp: tmp.write_text(ckpt.name + "\n"))
    except BaseException:
        if fresh:
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    for old in previous:
        if Path(old).name != ckpt.name:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# The final report, and train() itself
# ----------------------------------------------------------------------------------------------------------


def final_report(run, progress, metrics):
    """The final evaluation (final_eval_windows, after the clock stops), its log row, the summary line and the
    stories (rank 0); returns train()'s result. Under torchrun, the processes then tear the group down together."""
    cfg, proc = run.cfg, run.proc
    inputs, targets = data.eval_windows(run.valid_stream, cfg.final_eval_windows, cfg.context)
    final = evaluate(run.model, inputs, targets, run.token_bytes, cfg.batch_size, proc.autocast, proc.rank, proc.world)
    final = {
        "final_val_loss": final["val_loss"],
        "final_val_bpb": final["val_bpb"],
        "final_eval_tokens": targets.numel(),
    }
    _log(run, {"step": progress.step, **final})
    tokens = progress.step * run.tokens_per_step
    tokens_per_s = tokens / max(progress.elapsed, 1e-9)
    proc.say(f"done: {progress.step} steps, {tokens:,} tokens in {progress.elapsed / 60:.1f} min ({tokens_per_s:,.0f} "
             f"tokens/s); validation ({final['final_eval_tokens']:,} tokens): {final['final_val_loss']:.4f} "
             f"nats/token, {final['final_val_bpb']:.4f} bits/byte")  # fmt: skip
    result = {"step": progress.step, "elapsed_s": progress.elapsed, "tokens_per_s": tokens_per_s,
              "out_dir": str(run.out_dir), **metrics, **final}  # fmt: skip
    if proc.rank == 0:
        result["stories"] = sample_stories(run.model, run.tokenizer, n=cfg.n_samples, max_new_tokens=cfg.sample_tokens)
        for i, story in enumerate(result["stories"], 1):
            proc.say(f"\n--- story {i} ---\n{story}")
    if proc.world > 1:
        dist.barrier()  # the other ranks wait for rank 0's stories, so that all tear the group down together
        dist.destroy_process_group()
    return result


@contextmanager
def _stop_on_signals(stop):
    """While training: SIGINT and SIGTERM append their number to `stop` (the loop saves and ends after the current
    step); a second one interrupts at once. Signal handlers can be set in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(cfg, given=None):
    """Run the training cfg describes; returns {"step", "val_loss", "val_bpb", "final_val_bpb", ..., "out_dir"}
    and, on rank 0, "stories". given: the fields the user set (main passes the command line's flags; None: every
    field of cfg), which a resumed run compares with its own (see the module's docstring)."""
    cfg, resume, proc = start_or_resume(cfg, given)
    try:
        if resume is not None and _finished(cfg, Progress(resume.state["step"], resume.state["elapsed"])):
            step = resume.state["step"]
            final = [r for r in read_log(Path(cfg.out_dir)) if "final_val_loss" in r and r["step"] == step]
            if final:
                proc.say(f"{cfg.out_dir} finished already at step {step} (max_steps {cfg.max_steps}, max_minutes "
                         f"{cfg.max_minutes}): nothing to do; give a larger --max_steps to train on")  # fmt: skip
                return {"step": step, "elapsed_s": resume.state["elapsed"], "out_dir": cfg.out_dir, **final[-1]}
        tokenizer, train_stream, valid_stream = load_data(cfg, resume, proc.say)
        model, optimizer, generator, progress = model_and_optimizer(cfg, resume, proc)
        run = Run(
            cfg=cfg,
            proc=proc,
            tokenizer=tokenizer,
            train_stream=train_stream,
            valid_stream=valid_stream,
            model=model,
            forward=wrap_model(model, cfg, proc),
            optimizer=optimizer,
            generator=generator,
            val_windows=data.eval_windows(valid_stream, cfg.eval_windows, cfg.context),
            token_bytes=data.token_bytes(tokenizer),
            checkpoints=[] if resume is None else [resume.ckpt],
        )
        open_log(run, progress, resume)
        stop = []
        with _stop_on_signals(stop):
            metrics = train_loop(run, progress, stop)
        return final_report(run, progress, metrics)
    finally:
        _release_lock(proc.lock)


def parse_args(argv=None):
    """(TrainConfig, the names of the fields given) from the command line: --model and --preset pick the preset,
    every other field overrides it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in fields(TrainConfig):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:  # int, float, str, or one of them | None
            kind = next(t for t in (int, float, str) if t is f.type or t in getattr(f.type, "__args__", ()))
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    given = set(args)
    model, preset = args.pop("model", "jamba"), args.pop("preset", "cpu20")
    args.setdefault("out_dir", f"runs/{model}")
    return TrainConfig.from_preset(model, preset, **args), given


def main(argv=None):
    """The command line: 0 when the run ends, 130 / 143 after SIGINT / SIGTERM (saved), 1 on any error (one line)."""
    try:
        train(*parse_args(argv))
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint in --out_dir is kept (resume with --resume)", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
