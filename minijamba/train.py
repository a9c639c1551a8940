"""Train a small Jamba (or Mamba, or Transformer) on TinyStories: `python -m minijamba.train` (what `make train` runs).

    python -m minijamba.train                                   # jamba, preset cpu20: ~20 min on 2 CPU cores
    python -m minijamba.train --model transformer --lr 3e-3     # any TrainConfig field is a --flag
    python -m minijamba.train --out_dir runs/jamba --resume     # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m minijamba.train              # DistributedDataParallel, one process per device

The loop, in order: a batch of random windows (data.get_batch, one seeded generator), forward, cross-entropy + the
MoE load-balancing loss times router_aux_loss_coef, backward, clip the gradient norm, AdamW step with warmup then
cosine decay. Every eval_every steps: validation loss (nats/token) and bits/byte on a fixed set of validation
windows, a row in <out_dir>/log.jsonl, and a checkpoint. At the end, three stories.

The log (read_log reads it back), one JSON object a line: every log_every steps {step, loss (mean cross-entropy of
those steps), lr (the last step's), elapsed_s}; every eval_every steps {step, tokens, elapsed_s, val_loss, val_bpb};
once at the end {step, final_val_loss, final_val_bpb, final_eval_tokens}.

Models (one preset table, PRESETS, gives each model family its shape and its own learning rate):
    jamba        JambaLM: Mamba layers, one attention layer in attn_layer_period, MoE every other layer
    mamba        MambaLM: Mamba blocks only (no MLPs)
    transformer  JambaLM with every layer attention (attn_layer_period 1): the same code path, no Mamba

Checkpoints (<out_dir>/ckpt-<step>/, named by <out_dir>/latest): config.json + model.safetensors (the HF layout,
`save_pretrained`), tokenizer.json, train_config.json, and train_state.pt (optimizer, step, the batch generator's
state) read back with torch.load(weights_only=True). Each file is written to a temp file then renamed, and
`latest` is switched only once a checkpoint folder is complete, so a crash at any moment leaves the last good one.
On CPU, `--resume` continues bit for bit: the losses equal those of an uninterrupted run.

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
import platform
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import data
from .checkpoint import _atomic_write
from .download import DEFAULT_DIR, check_downloaded
from .jamba import JambaConfig
from .mamba import MambaConfig
from .models import build_model, count_parameters, load_pretrained
from .scan import FUSED_IMPLS
from .tasks import param_groups

__all__ = [
    "TrainConfig",
    "PRESETS",
    "MODELS",
    "LOGS_DIR",
    "TrainingDiverged",
    "model_config",
    "compute_loss",
    "lr_at",
    "train",
    "sample_stories",
    "load_run",
    "read_log",
    "main",
]

MODELS = ("jamba", "mamba", "transformer")
SCAN_IMPLS = ("auto", "sequential", "chunked", *FUSED_IMPLS)  # "parallel" is O(L log L) memory: not for training
TOKENIZER_CHARS = 50_000_000  # --data full: the BPE learns its merges from this much of the training text
# The README's measured runs: each one's log.jsonl, committed as lessons/logs/08_<run>.jsonl (found from the package,
# so lesson 08 reads them from whatever folder it runs in)
LOGS_DIR = Path(__file__).resolve().parents[1] / "lessons" / "logs"

# Each preset: training settings shared by the models, then per model its shape and its own best learning rate.
# cpu20 is `make train`: <= 20 minutes of 2 CPU cores (17 min of training by the clock, then evaluation and stories).
# Learning rates from 3-minute runs on the shared 2-core machine (1 thread, fused CPU scan), validation bits/byte:
# jamba 1e-3 2.14, 3e-3 1.68, 6e-3 1.57; transformer 1e-3 2.05, 3e-3 1.93, 6e-3 1.95; mamba 3e-3 only, 1.99. Over
# the full 17 minutes (two jamba runs at the same time, 1 thread each) 6e-3 still wins: 0.959 against 1.009.
# tiny is for tests and the lesson's live run.
PRESETS = {
    "cpu20": {
        "train": dict(vocab_size=2048, context=256, batch_size=32, max_steps=4000, max_minutes=17.0, warmup_steps=100,
                      eval_every=100, eval_windows=64),
        "jamba": dict(lr=6e-3, shape=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4,
                                          attn_layer_offset=2, num_experts=4, num_experts_per_tok=2, mamba_d_state=16)),
        "mamba": dict(lr=3e-3, shape=dict(d_model=128, n_layer=8, d_state=16)),
        "transformer": dict(lr=3e-3, shape=dict(hidden_size=128, intermediate_size=448, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=4, num_experts=1,
                                                num_experts_per_tok=1, rope=True)),
    },
    "tiny": {
        "train": dict(vocab_size=300, context=32, batch_size=8, max_steps=20, warmup_steps=2, eval_every=10,
                      eval_windows=8, final_eval_windows=16, sample_tokens=24, max_stories=300),
        "jamba": dict(lr=3e-3, shape=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, attn_layer_period=4,
                                          attn_layer_offset=2, num_experts=4, mamba_d_state=8)),
        "mamba": dict(lr=3e-3, shape=dict(d_model=32, n_layer=2, d_state=8)),
        "transformer": dict(lr=3e-3, shape=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, num_experts=1,
                                                num_experts_per_tok=1, rope=True)),
    },
}  # fmt: skip


@dataclass
class TrainConfig:
    model: str = "jamba"  # jamba | mamba | transformer
    preset: str = "cpu20"  # the model's shape and lr, and the fields below that the preset sets (PRESETS)
    data: str = "bundled"  # bundled (shipped, offline) | full (downloaded with `make data-full`)
    data_dir: str | None = None  # where --data full looks (default: download.DEFAULT_DIR)
    max_stories: int | None = None  # only the first max_stories stories of each split (tests, quick looks)
    out_dir: str = "runs/jamba"
    resume: bool = False  # continue from <out_dir>/latest
    vocab_size: int = 2048  # the BPE tokenizer's, trained on the training text at the start of a run
    context: int = 256
    batch_size: int = 32  # global: split across processes under torchrun
    max_steps: int = 4000  # the cosine schedule's length
    max_minutes: float | None = None  # a wall-clock budget: the schedule ends at whichever comes first
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only: A_log, D, norms and biases never decay
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # steps between evaluations and checkpoints
    eval_windows: int = 64  # validation windows of `context` tokens, the same ones every time
    final_eval_windows: int = 512  # a larger sample for the number a run reports, once at the end (the first ones)
    log_every: int = 10  # steps between training-loss rows in log.jsonl
    seed: int = 0
    scan_impl: str = "auto"  # the Mamba layers' scan (scan.py): auto = the fused kernel when it builds, else chunked
    device: str = "auto"  # auto: cuda if available
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads (None: torch's default)
    sample_tokens: int = 200  # stories printed at the end: this many new tokens each
    n_samples: int = 3

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {SCAN_IMPLS}, got {self.scan_impl!r}")
        if self.data not in ("bundled", "full"):
            raise ValueError(f"data must be 'bundled' or 'full', got {self.data!r}")
        positive = (
            "vocab_size context batch_size max_steps eval_every eval_windows final_eval_windows log_every n_samples"
        )
        for name in positive.split():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_stories", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("lr", "grad_clip", "beta1", "beta2"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(
                f"warmup_steps and weight_decay must be >= 0, got {self.warmup_steps}, {self.weight_decay}"
            )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes!r}")

    @classmethod
    def from_preset(cls, model="jamba", preset="cpu20", **overrides):
        """The preset's settings for `model`, then `overrides` (any field)."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        values = {**PRESETS[preset]["train"], "lr": PRESETS[preset][model]["lr"], **overrides}
        return cls(model=model, preset=preset, **values)


class TrainingDiverged(RuntimeError):
    """The loss became inf or nan; the message names the step and the checkpoint that was kept."""


def model_config(cfg):
    """The model's config for a TrainConfig: its preset's shape at the tokenizer's vocabulary size, scanning with
    cfg.scan_impl."""
    shape = dict(PRESETS[cfg.preset][cfg.model]["shape"], vocab_size=cfg.vocab_size, scan_impl=cfg.scan_impl)
    if cfg.model == "mamba":
        return MambaConfig(**shape)
    if cfg.model == "transformer":
        shape.update(attn_layer_period=1, attn_layer_offset=0)  # every layer attention
    return JambaConfig(**shape)


def compute_loss(model, inputs, targets, aux_loss_coef=0.0):
    """(loss to minimise, cross-entropy in nats/token): the LM loss plus aux_loss_coef · the MoE aux loss."""
    out = model(inputs)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())  # logits (batch, context, vocab)
    return ce + aux_loss_coef * out.aux_loss, ce


def lr_at(cfg, step, elapsed):
    """Linear warmup over warmup_steps, then cosine from lr to lr · min_lr_ratio over the run.

    The run's progress is step / max_steps, or elapsed / max_minutes when the clock is further along: a
    wall-clock budget then ends the schedule on time (and the run is reproducible only while the clock does not lead).
    """
    progress = step / cfg.max_steps
    if cfg.max_minutes is not None:
        progress = max(progress, elapsed / (60 * cfg.max_minutes))
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warmup * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(Path(path), write)


def save_run(out_dir, model, tokenizer, cfg, optimizer, generator, step, elapsed):
    """Write <out_dir>/ckpt-<step>/, then point <out_dir>/latest at it, then delete the older ones."""
    out_dir = Path(out_dir)
    ckpt = out_dir / f"ckpt-{step:07d}"
    with warnings.catch_warnings():  # the transformer baseline's rope has no HF counterpart: known and wanted
        warnings.filterwarnings("ignore", message=".*no HF Jamba counterpart")
        model.save_pretrained(ckpt)
    data.save_tokenizer(tokenizer, ckpt)
    _write_json(ckpt / "train_config.json", asdict(cfg))
    state = {"step": step, "elapsed": elapsed, "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    _atomic_write(ckpt / "train_state.pt", lambda tmp: torch.save(state, tmp))
    _atomic_write(out_dir / "latest", lambda tmp: tmp.write_text(ckpt.name + "\n"))
    for old in out_dir.glob("ckpt-*"):
        if old.name != ckpt.name:
            shutil.rmtree(old)
    return ckpt


def checkpoint_dir(path):
    """A checkpoint folder: `path` itself, or the one a run folder's `latest` names."""
    path = Path(path)
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint folder nor a run folder with a 'latest' file")


def read_log(path):
    """The rows of a log.jsonl that train() wrote (a file path or a run folder), one dict per line, in order."""
    path = Path(path)
    path = path / "log.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(path, device="cpu"):
    """(model, tokenizer, TrainConfig) from a checkpoint or run folder; safetensors weights, weights_only state."""
    ckpt = checkpoint_dir(path)
    cfg = TrainConfig(**json.loads((ckpt / "train_config.json").read_text()))
    return load_pretrained(ckpt, device=device), data.load_tokenizer(ckpt), cfg


# ----------------------------------------------------------------------------------------------------------
# Evaluation and sampling
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


def sample_stories(
    model, tokenizer, prompt="Once upon a time", n=3, max_new_tokens=200, temperature=0.8, top_k=50, seed=0
):
    """n stories continuing `prompt`: prefill + O(1) Mamba steps (KV cache for attention), cut at the first EOT."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt).ids] * n, device=device)  # (n, prompt length)
    was_training = model.training
    model.eval()
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # (n, L + new)
    model.train(was_training)
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in out]
    return [text.split(data.EOT)[0].strip() for text in texts]


# ----------------------------------------------------------------------------------------------------------
# The training loop
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


def _load_data(cfg, tokenizer=None, say=print):
    """(tokenizer, train stream, valid stream): trains the tokenizer unless one is given (a resumed run's)."""
    t0 = time.perf_counter()
    if cfg.data == "full":  # ~2 GB: the tokenizer learns from the first TOKENIZER_CHARS, streams are memory-mapped
        data_dir = Path(cfg.data_dir or DEFAULT_DIR)
        check_downloaded(data_dir)
        if tokenizer is None:
            with open(data_dir / "train.txt", encoding="utf-8") as f:
                tokenizer = data.train_tokenizer(data.split_stories(f.read(TOKENIZER_CHARS)), cfg.vocab_size)
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


def train(cfg):
    """Run the training cfg describes; returns {"step", "val_loss", "val_bpb", "stories", "out_dir"} (rank 0 only)."""
    rank, world, ddp_device = _distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    out_dir = Path(cfg.out_dir)
    resume_from = checkpoint_dir(out_dir) if cfg.resume else None  # a missing checkpoint fails here, before work
    if resume_from is not None:
        saved = json.loads((resume_from / "train_config.json").read_text())
        free = {
            "max_steps",
            "max_minutes",
            "out_dir",
            "resume",
            "device",
            "compile",
            "threads",
            "eval_every",
            "scan_impl",
        }
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in free}})  # the rest as the run began
    mconfig = model_config(cfg)  # a shape that does not divide fails here, before any data is read
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = ddp_device or (("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in str(device) else nullcontext()

    torch.manual_seed(cfg.seed)
    tokenizer = data.load_tokenizer(resume_from) if resume_from is not None else None
    tokenizer, train_stream, valid_stream = _load_data(cfg, tokenizer, say)
    if resume_from is None:
        model = build_model(mconfig)
    else:
        model = load_pretrained(resume_from, scan_impl=cfg.scan_impl)
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)  # the batches: the same on every rank
    step, elapsed = 0, 0.0
    if resume_from is not None:
        state = torch.load(resume_from / "train_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, elapsed = state["step"], state["elapsed"]
        say(f"resumed from {resume_from} at step {step}")
    raw_model = model
    if world > 1:
        moe = any(layer.is_moe for layer in raw_model.layers)  # an expert may get no token in a step
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=moe)
    if cfg.compile:
        model = torch.compile(model)

    total, active = count_parameters(mconfig)
    token_bytes = data.token_bytes(tokenizer)
    val_inputs, val_targets = data.eval_windows(valid_stream, cfg.eval_windows, cfg.context)
    log_path = out_dir / "log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = log_path.read_text().splitlines() if resume_from is not None and log_path.exists() else []
        kept_rows = [r for r in rows if json.loads(r)["step"] <= step]  # drop what a crashed session logged
        _atomic_write(log_path, lambda tmp: tmp.write_text("".join(r + "\n" for r in kept_rows)))
        machine = {
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": str(device),
        }
        run = {**asdict(cfg), "params_total": total, "params_active": active, "world_size": world, **machine}
        _write_json(out_dir / "run.json", run)
    say(f"{cfg.model} ({cfg.preset}): {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
        f"{world} process(es) on {device}; batch {cfg.batch_size} x context {cfg.context}")  # fmt: skip

    def log(row):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate_and_save():
        metrics = evaluate(raw_model, val_inputs, val_targets, token_bytes, cfg.batch_size, autocast, rank, world)
        if rank == 0:
            save_run(out_dir, raw_model, tokenizer, cfg, optimizer, generator, step, elapsed)
        if world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint it could need
        return metrics

    rows_per_rank = cfg.batch_size // world
    aux_loss_coef = raw_model.aux_loss_coef  # 0 for MambaLM, which has no experts
    tokens_per_step = cfg.batch_size * cfg.context
    losses, start = [], time.perf_counter() - elapsed  # the clock continues a resumed run's
    session_start, session_step = time.perf_counter(), step
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc=cfg.model)
    metrics = {}
    model.train()
    while step < cfg.max_steps and (cfg.max_minutes is None or elapsed < 60 * cfg.max_minutes):
        lr = lr_at(cfg, step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = data.get_batch(train_stream, cfg.batch_size, cfg.context, generator)  # (batch, context)
        rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)  # this process's share of the global batch
        with autocast:
            loss, ce = compute_loss(model, inputs[rows].to(device), targets[rows].to(device), aux_loss_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        ce = ce.detach()
        if world > 1:
            dist.all_reduce(ce, op=dist.ReduceOp.AVG)  # the global batch's loss, the same on every rank
        ce = ce.item()
        if not math.isfinite(ce):  # stop before the step: the weights and the last checkpoint stay finite
            kept = "no checkpoint was written yet"
            if (out_dir / "latest").exists():
                kept = f"the last good checkpoint, {checkpoint_dir(out_dir)}, is kept"
            raise TrainingDiverged(
                f"loss is {ce} at step {step + 1} (lr {lr:.3g}): training stopped; {kept}; "
                "try a lower --lr or more --warmup_steps"
            )
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - start
        losses.append(ce)
        tok_s = (step - session_step) * tokens_per_step / (time.perf_counter() - session_start)
        bar.update(1)
        bar.set_postfix(loss=f"{ce:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if step % cfg.log_every == 0:
            log({"step": step, "loss": sum(losses) / len(losses), "lr": lr, "elapsed_s": elapsed})
            losses = []
        if step % cfg.eval_every == 0:
            metrics = evaluate_and_save()
            log({"step": step, "tokens": step * tokens_per_step, "elapsed_s": elapsed, **metrics})
            bar.write(f"step {step}: val loss {metrics['val_loss']:.4f} nats/token, {metrics['val_bpb']:.4f} bits/byte")
    bar.close()
    if not metrics or step % cfg.eval_every:  # the last step was not evaluated yet
        metrics = evaluate_and_save()
        log({"step": step, "tokens": step * tokens_per_step, "elapsed_s": elapsed, **metrics})
    inputs, targets = data.eval_windows(valid_stream, cfg.final_eval_windows, cfg.context)  # after the clock stops
    final = evaluate(raw_model, inputs, targets, token_bytes, cfg.batch_size, autocast, rank, world)
    final = {
        "final_val_loss": final["val_loss"],
        "final_val_bpb": final["val_bpb"],
        "final_eval_tokens": targets.numel(),
    }
    log({"step": step, **final})
    tokens_per_s = step * tokens_per_step / max(elapsed, 1e-9)
    say(f"done: {step} steps, {step * tokens_per_step:,} tokens in {elapsed / 60:.1f} min ({tokens_per_s:,.0f} "
        f"tokens/s); validation ({final['final_eval_tokens']:,} tokens): {final['final_val_loss']:.4f} nats/token, "
        f"{final['final_val_bpb']:.4f} bits/byte")  # fmt: skip
    result = {"step": step, "elapsed_s": elapsed, "tokens_per_s": tokens_per_s, "out_dir": str(out_dir), **metrics}
    result.update(final)
    if rank == 0:
        result["stories"] = sample_stories(raw_model, tokenizer, n=cfg.n_samples, max_new_tokens=cfg.sample_tokens)
        for i, story in enumerate(result["stories"], 1):
            say(f"\n--- story {i} ---\n{story}")
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's stories, so that all tear the group down together
        dist.destroy_process_group()
    return result


def parse_args(argv=None):
    """TrainConfig from the command line: --model and --preset pick the preset, every other field overrides it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in fields(TrainConfig):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:  # int, float, str, or one of them | None
            kind = next(t for t in (int, float, str) if t is f.type or t in getattr(f.type, "__args__", ()))
            parser.add_argument(f"--{f.name}", type=kind, default=None)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    model, preset = args.pop("model", "jamba"), args.pop("preset", "cpu20")
    args.setdefault("out_dir", f"runs/{model}")
    return TrainConfig.from_preset(model, preset, **args)


def main(argv=None):
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
