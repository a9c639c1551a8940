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
from .checkpoint import atomic_write
from .download import DEFAULT_DIR, check_downloaded
from .models import build_model, count_parameters, load_pretrained
from .optim import adamw, warmup_cosine
from .sample import checkpoint_dir, sample_stories
from .train_config import TrainConfig, model_config

__all__ = [
    "TrainConfig",
    "LOGS_DIR",
    "TrainingDiverged",
    "compute_loss",
    "lr_at",
    "train",
    "read_log",
    "main",
]

TOKENIZER_CHARS = 50_000_000  # --data full: the BPE learns its merges from this much of the training text
# The README's measured runs: each one's log.jsonl, committed as lessons/logs/08_<run>.jsonl (found from the package,
# so lesson 08 reads them from whatever folder it runs in)
LOGS_DIR = Path(__file__).resolve().parents[1] / "lessons" / "logs"
# What --resume may change; every other field is the one the run began with (train_config.json)
RESUME_MAY_CHANGE = ("max_steps", "max_minutes", "out_dir", "resume", "device", "compile", "threads", "eval_every",
                     "scan_impl")  # fmt: skip


class TrainingDiverged(RuntimeError):
    """The loss became inf or nan; the message names the step and the checkpoint that was kept."""


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


def read_log(path):
    """The rows of a log.jsonl that train() wrote (a file path or a run folder), one dict per line, in order."""
    path = Path(path)
    path = path / "log.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def start_or_resume(cfg):
    """(cfg, the checkpoint to resume from or None, Process). A resumed run takes the config it began with, but for
    RESUME_MAY_CHANGE. Every check that needs no data runs here, before any work."""
    rank, world, ddp_device = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    resume_from = checkpoint_dir(cfg.out_dir) if cfg.resume else None  # a missing checkpoint fails here
    if resume_from is not None:
        saved = json.loads((resume_from / "train_config.json").read_text())
        cfg = TrainConfig(**{**saved, **{k: getattr(cfg, k) for k in RESUME_MAY_CHANGE}})
    model_config(cfg)  # a shape that does not divide fails here, before any data is read
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = ddp_device or (("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if "cuda" in str(device) else nullcontext()
    return cfg, resume_from, Process(rank, world, device, autocast)


def load_data(cfg, resume_from, say=print):
    """(tokenizer, train stream, valid stream): a resumed run keeps its tokenizer, a fresh one trains its own."""
    t0 = time.perf_counter()
    tokenizer = data.load_tokenizer(resume_from) if resume_from is not None else None
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


def model_and_optimizer(cfg, resume_from, proc):
    """(model, optimizer, batch generator, Progress): fresh and seeded, or as the checkpoint left them."""
    torch.manual_seed(cfg.seed)  # the init
    if resume_from is None:
        model = build_model(model_config(cfg))
    else:
        model = load_pretrained(resume_from, scan_impl=cfg.scan_impl)
    model = model.to(proc.device)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    generator = torch.Generator().manual_seed(cfg.seed)  # the batches: the same on every rank
    progress = Progress()
    if resume_from is not None:
        state = torch.load(resume_from / "train_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        progress = Progress(state["step"], state["elapsed"])
        proc.say(f"resumed from {resume_from} at step {progress.step}")
    return model, optimizer, generator, progress


def wrap_model(model, cfg, proc):
    """What a training step calls: the model under DistributedDataParallel (several processes), then torch.compile."""
    if proc.world > 1:
        moe = any(layer.is_moe for layer in model.layers)  # an expert may get no token in a step
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=moe)
    return torch.compile(model) if cfg.compile else model


def open_log(run, progress, resume_from):
    """Rank 0: log.jsonl keeps only the rows up to the step the run starts from (a crashed session's later rows go),
    and run.json records the config, the parameter counts and the machine. Every rank: the summary line."""
    cfg, proc = run.cfg, run.proc
    total, active = count_parameters(model_config(cfg))
    if proc.rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = run.out_dir / "log.jsonl"
        rows = log_path.read_text().splitlines() if resume_from is not None and log_path.exists() else []
        kept_rows = [r for r in rows if json.loads(r)["step"] <= progress.step]
        atomic_write(log_path, lambda tmp: tmp.write_text("".join(r + "\n" for r in kept_rows)))
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
        kept = "no checkpoint was written yet"
        if (run.out_dir / "latest").exists():
            kept = f"the last good checkpoint, {checkpoint_dir(run.out_dir)}, is kept"
        raise TrainingDiverged(
            f"loss is {ce} at step {progress.step + 1} (lr {lr:.3g}): training stopped; {kept}; "
            "try a lower --lr or more --warmup_steps"
        )
    run.optimizer.step()
    return ce, lr


def train_loop(run, progress):
    """train_step until max_steps or the clock's budget, with a log row every log_every steps and evaluate_and_save
    every eval_every steps and after the last; returns the last evaluation's metrics."""
    cfg = run.cfg
    clock_start = time.perf_counter() - progress.elapsed  # the clock continues a resumed run's
    session_start, session_step = time.perf_counter(), progress.step
    losses, metrics = [], {}
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=run.proc.rank != 0, dynamic_ncols=True,
               desc=cfg.model)  # fmt: skip
    run.forward.train()
    while progress.step < cfg.max_steps and (cfg.max_minutes is None or progress.elapsed < 60 * cfg.max_minutes):
        ce, lr = train_step(run, progress)
        progress.step += 1
        progress.elapsed = time.perf_counter() - clock_start
        losses.append(ce)
        tok_s = (progress.step - session_step) * run.tokens_per_step / (time.perf_counter() - session_start)
        bar.update(1)
        bar.set_postfix(loss=f"{ce:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        if progress.step % cfg.log_every == 0:
            row = {"step": progress.step, "loss": sum(losses) / len(losses), "lr": lr, "elapsed_s": progress.elapsed}
            _log(run, row)
            losses = []
        if progress.step % cfg.eval_every == 0:
            metrics = evaluate_and_save(run, progress)
            bar.write(f"step {progress.step}: val loss {metrics['val_loss']:.4f} nats/token, "
                      f"{metrics['val_bpb']:.4f} bits/byte")  # fmt: skip
    bar.close()
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
    """Score the validation windows, write a checkpoint (rank 0) and the log row; returns {"val_loss", "val_bpb"}."""
    cfg, proc = run.cfg, run.proc
    metrics = evaluate(run.model, *run.val_windows, run.token_bytes, cfg.batch_size, proc.autocast, proc.rank,
                       proc.world)  # fmt: skip
    if proc.rank == 0:
        save_run(run.out_dir, run.model, run.tokenizer, cfg, run.optimizer, run.generator, progress.step,
                 progress.elapsed)  # fmt: skip
    if proc.world > 1:
        dist.barrier()  # no rank runs ahead of a checkpoint it could need
    tokens = progress.step * run.tokens_per_step
    _log(run, {"step": progress.step, "tokens": tokens, "elapsed_s": progress.elapsed, **metrics})
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
    atomic_write(ckpt / "train_state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write(out_dir / "latest", lambda tmp: tmp.write_text(ckpt.name + "\n"))
    for old in out_dir.glob("ckpt-*"):
        if old.name != ckpt.name:
            shutil.rmtree(old)
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


def train(cfg):
    """Run the training cfg describes; returns {"step", "val_loss", "val_bpb", "final_val_bpb", ..., "out_dir"}
    and, on rank 0, "stories"."""
    cfg, resume_from, proc = start_or_resume(cfg)
    tokenizer, train_stream, valid_stream = load_data(cfg, resume_from, proc.say)
    model, optimizer, generator, progress = model_and_optimizer(cfg, resume_from, proc)
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
    )
    open_log(run, progress, resume_from)
    metrics = train_loop(run, progress)
    return final_report(run, progress, metrics)


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
