"""A toy routing experiment for lesson 06: does the load-balancing loss keep a small MoE from collapsing?

The task: tokens h (dim,) drawn around `clusters` centres, the target a per-cluster linear map M_c h, so that
experts have something to specialise in. Every centre is shifted by one common `offset` vector, as the hidden
states of a real model share large common directions: the router's logits W_r h then agree across tokens at the
start, the same few experts win everywhere, they learn fastest, and the router learns to prefer them further
(the "rich get richer" loop of Shazeer et al. 2017, §4). The Switch Transformer's auxiliary loss (eq. 4) counters
it. With offset 0 the same model stays roughly balanced on its own: the offset is what this task is about.

Glossary (code name — symbol):
    centres, maps   — the cluster centres (offset included) and the maps M_c of target = M_c h
    aux_coef        — α, the weight of the load-balancing loss (Switch: 0.01; HF Jamba: router_aux_loss_coef 0.001)
    fractions       — f_e per step: each expert's share of that step's top-k assignments
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .moe import MoE, expert_utilisation, load_balancing_loss

__all__ = ["ClusterTask", "TrainingLog", "train_moe"]


@dataclass
class ClusterTask:
    """Regression tokens in clusters: h = centre_c + noise · ε, target = M_c h."""

    centres: torch.Tensor  # (clusters, dim), the common offset included
    maps: torch.Tensor  # (clusters, dim, dim)
    noise: float = 0.5

    @classmethod
    def make(cls, clusters=8, dim=16, offset=4.0, noise=0.5, seed=0):
        """Centres N(0, I) plus one shared vector of norm `offset`; maps N(0, 1/dim) (they keep |target| near |h|)."""
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(clusters, dim, generator=g)  # (clusters, dim)
        shared = torch.randn(dim, generator=g)  # (dim,)
        maps = torch.randn(clusters, dim, dim, generator=g) / math.sqrt(dim)  # (clusters, dim, dim)
        return cls(centres + offset * shared / shared.norm(), maps, noise)

    def sample(self, n, generator):
        """n tokens: (h (n, dim), target (n, dim), cluster (n,))."""
        cluster = torch.randint(0, self.centres.shape[0], (n,), generator=generator)  # (n,)
        h = self.centres[cluster] + self.noise * torch.randn(n, self.centres.shape[1], generator=generator)  # (n, dim)
        target = torch.einsum("nij,nj->ni", self.maps[cluster], h)  # (n, dim)
        return h, target, cluster


class TrainingLog(NamedTuple):
    fractions: torch.Tensor  # (steps, n_e): each expert's share of the step's assignments
    entropy: torch.Tensor  # (steps,): the routing entropy in nats (log n_e = balanced)
    task_loss: torch.Tensor  # (steps,): the mean squared error
    aux_loss: torch.Tensor  # (steps,): the load-balancing loss (logged even when aux_coef = 0)


def train_moe(task, num_experts=8, top_k=2, aux_coef=0.0, steps=300, batch=256, intermediate=32, lr=1e-2, seed=0):
    """Train MoE(dim, intermediate, num_experts, top_k) on task with Adam; returns (moe, TrainingLog).

    loss = MSE + aux_coef · load_balancing_loss. Deterministic for a seed (the init and the batches). About 2 s
    for the defaults on one CPU thread.
    """
    torch.manual_seed(seed)
    moe = MoE(task.centres.shape[1], intermediate, num_experts, top_k)
    optimiser = torch.optim.Adam(moe.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    fractions, entropy, task_loss, aux_loss = [], [], [], []
    for _ in range(steps):
        h, target, _ = task.sample(batch, generator)
        out, routing = moe(h)
        mse = F.mse_loss(out, target)
        aux = load_balancing_loss(routing.logits, num_experts, top_k)
        optimiser.zero_grad()
        (mse + aux_coef * aux).backward()
        optimiser.step()
        usage = expert_utilisation(routing, num_experts)
        fractions.append(usage.fractions)
        entropy.append(usage.entropy)
        task_loss.append(mse.item())
        aux_loss.append(aux.item())
    log = TrainingLog(torch.stack(fractions), torch.tensor(entropy), torch.tensor(task_loss), torch.tensor(aux_loss))
    return moe, log
