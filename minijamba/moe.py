"""Mixture-of-experts MLPs: a top-k router, SwiGLU experts, capacity, and the auxiliary losses that keep it balanced.

Jamba (Lieber et al. 2024, §2 "Model Architecture") replaces the MLP of every other layer by n_e = 16 experts, of
which each token uses k = 2 (the paper writes n and K). A token h (d_model,), one row of the residual stream, is
routed by one linear map:
    p = softmax(W_r h)                        (n_e,) router probabilities, computed in float32 (at least)
    S = top-k indices of p,  g_e = p_e        Jamba and HF JambaTopKRouter keep the raw p_e: Σ_{e∈S} g_e <= 1
                                              Mixtral renormalises them, g_e = p_e / Σ_{e'∈S} p_e' (normalize_top_k)
    MoE(h) = Σ_{e∈S} g_e · expert_e(h),       expert_e(h) = down_e(SiLU(gate_e h) · up_e h)   (SwiGLU, Shazeer 2020)
so a layer holds n_e experts' parameters but a token runs only k of them. Training adds the Switch Transformer's
load-balancing loss (Fedus et al. 2021, eq. 4-6) and optionally ST-MoE's router z-loss (Zoph et al. 2022, eq. 5).

Dispatch is by grouping, not by looping over tokens: the n_tok × k assignments are sorted by expert, each expert
runs once on the rows routed to it, and the weighted results are added back to their tokens (`index_add_`).

Expert capacity (Switch Transformer §2.2, GShard §2.2): with a capacity factor c, expert e keeps at most
    capacity = ceil(c · n_tok · k / n_e)
assignments; the rest are dropped and add nothing to their token (in Jamba the residual stream still carries it).
Priority, as GShard's and Mesh TensorFlow's dispatch: every token's first choice before any second choice, and
within a choice earlier tokens first (batch-major). So a token's top-1 expert is never taken by another token's
top-2, and the rule depends only on which experts were chosen, not on probabilities that rounding can reorder (as
Batch Prioritized Routing's "most confident first", Riquelme et al. 2021, would). Tokens of one batch compete:
with a capacity, a token's output depends on the other tokens routed with it.

Glossary (code name — symbol; the course's notation table is in README.md):
    num_experts        — n_e: experts per MoE layer (n in Jamba, N in Switch); n_e in the shape comments
    top_k              — k: experts per token (K in Jamba; num_experts_per_tok in HF)
    n_tok              — the number of tokens routed together (batch · L, flattened)
    router.weight      — W_r (Switch) / W_g (Mixtral gate): (num_experts, hidden_size)
    logits             — W_r h (h(x) in Switch eq. 1), before the softmax: what HF's router returns
    top_k_weights      — g_e (p_e in Switch eq. 2): the weights of the chosen experts
    tokens_per_expert  — assignments routed to each expert, before capacity
    capacity_factor    — c, the capacity factor (Switch §2.2)
    fraction           — f_e, the fraction of tokens dispatched to expert e (Switch eq. 5; Σ_e f_e = k here)
    mean_prob          — P_e, the mean router probability of expert e (Switch eq. 6)
    gate_proj, up_proj, down_proj — W, V, W_2 of SwiGLU (Shazeer 2020, eq. 6)
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_int

__all__ = [
    "SwiGLU",
    "Router",
    "RouterOutput",
    "MoE",
    "load_balancing_loss",
    "router_z_loss",
    "Utilisation",
    "expert_utilisation",
]


def _check_top_k(top_k, num_experts):
    positive_int("num_experts", num_experts)
    positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts = {num_experts}, got {top_k}")


def _at_least_float32(t):
    """Softmax and losses in float32 as HF does, but float64 stays float64 (the tests compare with a float64 oracle)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class SwiGLU(nn.Module):
    """down(SiLU(gate(h)) · up(h)), no biases: one expert, and the dense MLP of Jamba's other layers (HF JambaMLP)."""

    def __init__(self, hidden_size, intermediate_size, device=None, dtype=None):
        super().__init__()
        positive_int("hidden_size", hidden_size)
        positive_int("intermediate_size", intermediate_size)
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, h):
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))  # (..., intermediate) -> (..., hidden)


class Router(nn.Module):
    """Top-k of softmax(h W_rᵀ): h (n_tok, hidden) -> (logits (n_tok, n_e), top_k_weights (n_tok, k), top_k_index)."""

    def __init__(self, hidden_size, num_experts, top_k, normalize_top_k=False, device=None, dtype=None):
        super().__init__()
        positive_int("hidden_size", hidden_size)
        _check_top_k(top_k, num_experts)
        self.num_experts, self.top_k, self.normalize_top_k = num_experts, top_k, normalize_top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init

    def forward(self, h):
        logits = F.linear(h, self.weight)  # (n_tok, n_e)
        probs = torch.softmax(_at_least_float32(logits), dim=-1)  # (n_tok, n_e)
        # Softmax is monotone, so these are the top-k logits too, except where two logits round to one probability:
        # choosing from probs, as HF does, makes HF's choice there as well.
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (n_tok, k) each
        if self.normalize_top_k:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, top_k_weights.to(h.dtype), top_k_index


class RouterOutput(NamedTuple):
    """What one MoE forward routed: enough for the auxiliary losses and for utilisation logs."""

    logits: torch.Tensor  # (n_tok, n_e) before the softmax
    top_k_index: torch.Tensor  # (n_tok, k) chosen experts, most probable first
    top_k_weights: torch.Tensor  # (n_tok, k) their weights g_e
    tokens_per_expert: torch.Tensor  # (n_e,) assignments routed to each expert, before capacity
    dropped: int  # assignments over capacity (0 without a capacity)


class MoE(nn.Module):
    """A sparse MoE MLP (HF JambaSparseMoeBlock): (..., hidden) -> ((..., hidden), RouterOutput).

    State-dict keys `router.weight` and `experts.{e}.{gate,up,down}_proj.weight`, as HF Jamba's checkpoints.
    capacity_factor None (the default, as Jamba and Mixtral) drops nothing.
    """

    def __init__(
        self,
        hidden_size,
        intermediate_size,
        num_experts,
        top_k,
        normalize_top_k=False,
        capacity_factor=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if capacity_factor is not None and not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be None or a positive number, got {capacity_factor!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.router = Router(hidden_size, num_experts, top_k, normalize_top_k, **factory)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, intermediate_size, **factory) for _ in range(num_experts))

    def capacity(self, num_tokens):
        """Assignments each expert may take for a batch of num_tokens tokens (None: unlimited)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, h):
        tokens = h.reshape(-1, h.shape[-1])  # (n_tok, hidden)
        n_tok, k = tokens.shape[0], self.top_k
        logits, top_k_weights, top_k_index = self.router(tokens)  # (n_tok, n_e), (n_tok, k), (n_tok, k)

        # Assignment a = slot · n_tok + token (slot-major), sorted stably by expert: within an expert, all first choices
        # in token order, then all second choices: the capacity priority of the module docstring.
        expert_of = top_k_index.t().reshape(-1)  # (k·n_tok,)
        order = torch.argsort(expert_of, stable=True)  # (k·n_tok,)
        token_of = order % n_tok  # (k·n_tok,) the token of each sorted assignment
        weight_of = top_k_weights.t().reshape(-1)[order]  # (k·n_tok,)
        routed = torch.bincount(expert_of, minlength=self.num_experts)  # (n_e,)

        kept, dropped = routed, 0
        capacity = self.capacity(n_tok)
        if capacity is not None:
            group_start = torch.cumsum(routed, 0) - routed  # (n_e,) where each expert's run begins in `order`
            # (k·n_tok,) each assignment's place in its expert's run
            rank = torch.arange(k * n_tok, device=h.device) - group_start.repeat_interleave(routed)
            keep = rank < capacity  # (k·n_tok,)
            token_of, weight_of = token_of[keep], weight_of[keep]  # (kept,)
            kept = routed.clamp(max=capacity)  # (n_e,)
            dropped = int((routed - kept).sum())

        out = torch.zeros_like(tokens)  # (n_tok, hidden)
        # A loop over experts, not tokens: each expert runs once on all its rows (its run in the sorted order).
        runs = zip(token_of.split(kept.tolist()), weight_of.split(kept.tolist()), self.experts, strict=True)
        for rows, weights, expert in runs:
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[:, None])  # (rows, hidden) added to its tokens
        return out.reshape(h.shape), RouterOutput(logits, top_k_index, top_k_weights, routed, dropped)


def _as_layers(router_logits, num_experts):
    """One (n_tok, n_e) tensor or a sequence of them -> a list of float tensors, checked."""
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits must hold at least one (tokens, num_experts) tensor")
    for i, logits in enumerate(layers):
        if logits.ndim != 2 or (num_experts is not None and logits.shape[1] != num_experts):
            shape = tuple(logits.shape)
            raise ValueError(f"router_logits[{i}] must have shape (tokens, num_experts={num_experts}), got {shape}")
    return [_at_least_float32(logits) for logits in layers]


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    """The Switch Transformer's auxiliary loss (eq. 4-6) with top-k routing, equal to HF's load_balancing_loss_func.

        loss = n_e · Σ_e f_e · P_e,   f_e = (assignments to e) / n_tok,   P_e = mean over tokens of p_e
    f_e counts top-k assignments, so Σ_e f_e = k: a uniform router (every P_e = 1/n_e) gives exactly k, whatever its
    ties pick. As every f_e <= 1 and Σ_e P_e = 1, the loss is at most n_e, reached when routing collapses: every
    token sent to the same k experts, which hold all the probability. Only P carries a gradient (f counts an argmax): it
    moves probability away from the experts that are overloaded.

    router_logits: (n_tok, n_e), or a sequence of them, one per MoE layer. Several layers are pooled as HF pools
    them: counts and probabilities are summed over all layers' rows and the product is taken once at the end, which
    is not the mean of per-layer losses (a layer overloading expert 0 and another underloading it cancel).
    attention_mask: (batch, L) with batch · L = tokens per layer; tokens where it is 0 (padding) count nowhere.
    """
    _check_top_k(top_k, num_experts)
    layers = _as_layers(router_logits, num_experts)
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(layers[0])  # (n_tok,)
        for i, logits in enumerate(layers):
            if logits.shape[0] != mask.numel():
                raise ValueError(
                    f"attention_mask has {mask.numel()} entries, router_logits[{i}] {logits.shape[0]} rows"
                )
    counts = torch.zeros(num_experts, dtype=layers[0].dtype, device=layers[0].device)  # (n_e,)
    prob_sums = torch.zeros_like(counts)  # (n_e,)
    rows = 0
    for logits in layers:
        probs = torch.softmax(logits, dim=-1)  # (n_tok, n_e)
        chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(1).to(probs)  # (n_tok, n_e)
        if attention_mask is None:
            counts = counts + chosen.sum(0)
            prob_sums = prob_sums + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            counts = counts + (chosen * mask[:, None]).sum(0)
            prob_sums = prob_sums + (probs * mask[:, None]).sum(0)
            rows = rows + mask.sum()
    fraction, mean_prob = counts / rows, prob_sums / rows  # (n_e,) each
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(router_logits):
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)².

    It keeps the logits small, where the float32 softmax stays accurate. router_logits: (n_tok, n_e) or a sequence of
    them (one per layer); the mean is over all their rows together.
    """
    layers = _as_layers(router_logits, None)
    return torch.cat([torch.logsumexp(logits, dim=-1) for logits in layers]).square().mean()


class Utilisation(NamedTuple):
    counts: torch.Tensor  # (n_e,) assignments per expert
    fractions: torch.Tensor  # (n_e,) counts / all assignments: sums to 1
    entropy: float  # -Σ_e fraction_e log fraction_e in nats: log(n_e) balanced, log(k) collapsed onto k experts


def expert_utilisation(routing, num_experts):
    """How evenly a batch was routed: counts and shares per expert and their entropy, for logs and plots.

    routing: the top-k indices (any shape) or a RouterOutput (counts before capacity).
    """
    positive_int("num_experts", num_experts)
    index = routing.top_k_index if isinstance(routing, RouterOutput) else routing
    counts = torch.bincount(index.reshape(-1), minlength=num_experts)  # (n_e,)
    if counts.numel() != num_experts:
        raise ValueError(f"routing holds expert indices >= num_experts = {num_experts}")
    fractions = counts.double() / counts.sum().clamp(min=1)  # (n_e,)
    entropy = -torch.special.xlogy(fractions, fractions).sum()  # xlogy(0, 0) = 0: unused experts add nothing
    return Utilisation(counts, fractions, float(entropy))
