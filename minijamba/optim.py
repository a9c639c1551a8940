"""The optimizer every trainer here uses: AdamW with decoupled weight decay on matrices only, and one learning-rate
schedule, a linear warmup then half a cosine.

Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (AdamW, Algorithm 2); Loshchilov & Hutter 2017,
"SGDR" §3 (cosine annealing, here without restarts). Used by train.py (TinyStories) and tasks.py (the synthetic
tasks of lessons 02 and 05):

    param_groups    matrices decay; vectors (biases, norms, D) and parameters flagged `_no_weight_decay` (A_log) do not
    adamw           torch's AdamW over those two groups
    warmup_cosine   the schedule's multiplier of the peak learning rate at a step (optionally ended by a clock)

Why no decay on A_log, D, norms and biases: their values mean something (a decay rate, a skip, a scale, an offset)
that should not drift toward 0; the Mamba reference flags A_log and D the same way.

Glossary: lr — η, the peak learning rate;  weight_decay — λ (torch multiplies it by the current lr);
betas — (β1, β2), the running means' decay rates;  min_lr_ratio — η_min / η_max of SGDR.
"""

import math

import torch

__all__ = ["param_groups", "adamw", "warmup_cosine"]


def param_groups(model, weight_decay):
    """AdamW groups: matrices decay; vectors (biases, norms, D) and flagged parameters (A_log) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model, lr, weight_decay, betas=(0.9, 0.95)):
    """torch.optim.AdamW over param_groups(model, weight_decay) (torch's default eps, 1e-8)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def warmup_cosine(step, total_steps, warmup_steps, min_lr_ratio=0.0, elapsed=0.0, budget=None):
    """The learning rate's multiplier at `step` (optimizer steps taken so far, from 0): linear warmup, then cosine.

    warmup: (step + 1) / warmup_steps while that is below 1 (1 throughout when warmup_steps is 0). Decay: half a
    cosine from 1 down to min_lr_ratio over the run, then min_lr_ratio. The run's progress is step / total_steps,
    or elapsed / budget (seconds) when a budget is given and the clock is further along: a wall-clock budget then
    ends the schedule on time (and a run is reproducible only while the clock does not lead).
    """
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    done, total = step, total_steps
    if budget is not None and elapsed / budget > step / total_steps:
        done, total = elapsed, budget
    cosine = 0.5 * (1 + math.cos(math.pi * min(done, total) / total))
    return warmup * (min_lr_ratio + (1 - min_lr_ratio) * cosine)
