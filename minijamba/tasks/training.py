"""Training a model on a synthetic task's fresh batches, and scoring its answers."""

import time

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.checks import positive_int
from minijamba.optim import adamw, warmup_cosine
from minijamba.tasks.data import IGNORE_INDEX


@torch.no_grad()
def answer_accuracy(model, inputs, targets):
    """The fraction of answer positions (targets != -100) where the model's argmax is the target."""
    mask = targets != IGNORE_INDEX  # (batch, L)
    predictions = model(inputs).logits.argmax(dim=-1)  # (batch, L)
    return (predictions[mask] == targets[mask]).float().mean().item()


def train_task(
    model,
    make_batch,
    steps,
    lr=3e-3,
    weight_decay=0.1,
    warmup=100,
    eval_every=100,
    eval_batches=4,
    seed=0,
    on_eval=None,
    train_batch=None,
):
    """Train on fresh batches, scoring a fixed held-out set; returns the history, a list of dicts.

    make_batch(generator) -> (inputs, targets): called with one torch.Generator seeded by `seed` for the
    training stream, and with generators seeded seed+1, seed+2, ... for the eval_batches of the eval set.
    AdamW (optim.adamw), linear warmup then cosine decay to 0 (optim.warmup_cosine), gradient clipping at 1. Each
    history entry (every eval_every steps and at the end): {"step", "loss" (mean training loss since the last
    entry), "accuracy" (eval answer accuracy), "seconds" (wall-clock since the start)}. model(inputs) returns a
    CausalLMOutput; the loss is the answers' cross-entropy alone (an MoE model's aux_loss is not added).
    on_eval: called with each history entry as it is made (the CLI logs and prints it), or None.
    train_batch(generator, step) -> (inputs, targets): the training batches, when they change with the step (a
    length curriculum, induction.py); None: make_batch(generator). The eval set always comes from make_batch.
    """
    positive_int("steps", steps)
    positive_int("eval_every", eval_every)
    positive_int("eval_batches", eval_batches)
    evals = [make_batch(torch.Generator().manual_seed(seed + 1 + i)) for i in range(eval_batches)]
    eval_inputs, eval_targets = (torch.cat(t) for t in zip(*evals, strict=True))
    train_rng = torch.Generator().manual_seed(seed)
    opt = adamw(model, lr, weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))  # s: steps so far
    history, losses, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        inputs, targets = make_batch(train_rng) if train_batch is None else train_batch(train_rng, step)
        logits = model(inputs).logits  # (batch, L, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            model.eval()
            accuracy = answer_accuracy(model, eval_inputs, eval_targets)
            seconds = time.perf_counter() - start
            history.append({"step": step, "loss": sum(losses) / len(losses), "accuracy": accuracy, "seconds": seconds})
            losses = []
            if on_eval is not None:
                on_eval(history[-1])
    return history
