"""Benchmark a training step: ms/step and tokens/s of train.py's models in one process, and where each step goes.

The three models of a train.py preset (cpu20 by default: `make train`'s jamba and its two baselines) are built as
train.py builds them, each with its AdamW, and a training step (forward, cross-entropy, backward, gradient clipping,
AdamW) is timed on one fixed batch of random token ids. The models take turns, step by step, so that a machine that
slows down mid-run slows all of them alike; the table gives each one's median step and its tokens/s as a ratio of the
first model's (the Transformer). One more step of each runs under torch's profiler, and the self time of every op in
its forward and backward is put in one of CATEGORIES by the op's name; the optimizer (clipping and AdamW) is timed on
its own. The breakdown says what to make faster: for the hybrid, the fused scan against the matrix products.
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from ..models import build_model, count_parameters
from ..optim import adamw
from ..train import compute_loss
from ..train_config import MODELS, PRESETS, TrainConfig, model_config
from .measure import describe_machine, pos_int, threads_arg

# Category -> the op names (profiler event names, or their prefixes ending in "*") whose self time it collects;
# every other op is "elementwise and other" (norms, activations, copies, the residual adds).
CATEGORIES = {
    "scan forward": ("_FusedScan",),
    "scan backward": ("_FusedScanBackward",),
    "conv+SiLU (fused)": ("_FusedConv", "_FusedConvBackward"),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"),
    "attention": ("aten::_scaled_dot_product*",),
    "MoE dispatch": ("aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::index_select",
                     "aten::index_add_", "aten::scatter_add_", "aten::topk", "aten::sort", "aten::argsort",
                     "aten::nonzero", "aten::bincount", "aten::histc", "aten::one_hot"),
    "log-softmax + loss": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss*"),
}  # fmt: skip
OTHER = "elementwise and other"
OPTIMIZER = "optimizer (clip + AdamW)"


def add_arguments(parser):
    parser.add_argument("--preset", default="cpu20", choices=sorted(PRESETS), help="train.py's preset")
    parser.add_argument("--models", default="transformer,jamba,mamba", help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--context", type=pos_int, default=None, help="tokens per row (default: the preset's)")
    parser.add_argument("--batch-size", type=pos_int, default=None, help="rows per step (default: the preset's)")
    parser.add_argument("--steps", type=pos_int, default=6, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--threads", type=threads_arg, default=2, help="torch threads (0: torch's default)")


def category_of(name):
    for category, names in CATEGORIES.items():
        for pattern in names:
            if name == pattern or (pattern.endswith("*") and name.startswith(pattern[:-1])):
                return category
    return OTHER


class Trainer:
    """One model of the preset as train.py builds it, its AdamW, and a fixed batch: `step()` is a training step."""

    def __init__(self, model_name, cfg, seed=0):
        self.name, self.cfg = model_name, cfg
        torch.manual_seed(seed)
        self.model = build_model(model_config(cfg))
        self.params = count_parameters(self.model.config)
        self.optimizer = adamw(self.model, cfg.lr, cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        self.grad_clip = cfg.grad_clip
        ids = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.context + 1), generator=torch.Generator())
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]  # (batch, context) each
        self.tokens = cfg.batch_size * cfg.context

    def forward_backward(self):
        loss, _ = compute_loss(self.model, self.inputs, self.targets, self.model.aux_loss_coef)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def optimize(self):
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()

    def step(self):
        self.forward_backward()
        self.optimize()

    def breakdown(self):
        """{category: ms} of one step: the profiled forward and backward by op, the optimizer timed."""
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.forward_backward()
        ms = dict.fromkeys([*CATEGORIES, OTHER], 0.0)
        for event in prof.key_averages():
            ms[category_of(event.key)] += event.self_cpu_time_total / 1000
        start = time.perf_counter()
        self.optimize()
        ms[OPTIMIZER] = 1000 * (time.perf_counter() - start)
        return ms


def median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise SystemExit(f"--models: unknown {unknown or names}, expected a comma-separated list from {list(MODELS)}")
    overrides = {k: v for k, v in (("context", args.context), ("batch_size", args.batch_size)) if v is not None}
    trainers = [Trainer(name, TrainConfig.from_preset(name, args.preset, **overrides)) for name in names]
    times = {t.name: [] for t in trainers}
    for round_ in range(2 + args.steps):  # round-robin: the first two rounds warm up (allocator, caches, builds)
        for t in trainers:
            start = time.perf_counter()
            t.step()
            if round_ >= 2:
                times[t.name].append(1000 * (time.perf_counter() - start))
    steps_ms = {name: median(ms) for name, ms in times.items()}
    first = trainers[0]
    cfg = first.cfg
    print(f"training steps, preset {args.preset}: batch {cfg.batch_size} x context {cfg.context}, AdamW included; "
          f"median of {args.steps} steps each, models taking turns")  # fmt: skip
    print(f"machine: {describe_machine()}")
    print(f"{'model':>12} | {'parameters':>18} | {'ms/step':>8} | {'tokens/s':>9} | tokens/s vs {first.name}")
    for t in trainers:
        tok_s = t.tokens / steps_ms[t.name] * 1000
        params = f"{t.params.total / 1e6:.2f}M"
        if t.params.active != t.params.total:
            params += f" ({t.params.active / 1e6:.2f}M act.)"
        ratio = steps_ms[first.name] / steps_ms[t.name]
        print(f"{t.name:>12} | {params:>18} | {steps_ms[t.name]:8.0f} | {tok_s:9.0f} | {ratio:.2f}")
    print("\nwhere a step goes (ms, and % of the profiled step; the profiler adds a little to each op):")
    breakdowns = {t.name: t.breakdown() for t in trainers}
    columns = [*CATEGORIES, OTHER, OPTIMIZER]
    print(f"{'':>26}" + "".join(f" | {t.name:>17}" for t in trainers))
    for category in columns:
        cells = []
        for t in trainers:
            ms, total = breakdowns[t.name][category], sum(breakdowns[t.name].values())
            cells.append(f" | {ms:8.0f} ({100 * ms / total:4.1f}%)" if ms else f" | {'-':>17}")
        print(f"{category:>26}" + "".join(cells))
    print(f"{'total':>26}" + "".join(f" | {sum(breakdowns[t.name].values()):8.0f}         " for t in trainers))
    return {"ms_per_step": steps_ms, "breakdown": breakdowns}
