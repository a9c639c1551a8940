"""Causal self-attention with grouped-query heads and no positional encoding: Jamba's attention layer.

Vaswani et al. 2017, §3.2: Attention(Q, K, V) = softmax(Q Kᵀ / sqrt(d_k)) V, run by h heads side by side, with a
causal mask so that position i reads positions <= i only. Grouped-query attention (Ainslie et al. 2023, "GQA"): the
h query heads share g key/value heads, query head j reading kv head j // (h / g); g = h is multi-head attention and
g = 1 multi-query attention. Only the kv heads are cached, so the cache shrinks h / g times (Jamba v0.1: 32 query
heads, 8 kv heads).

No positional encoding (Lieber et al. 2024, Jamba §6.5 "Jamba does not Require Explicit Positional Information"):
the Mamba layers below an attention layer are recurrent, so their outputs already depend on position, and the
paper's ablation found the hybrid with and without RoPE equally good. `rope=True` adds rotary embeddings (Su et al.
2021) on q and k for the lesson that compares the two.

Inference: the layer's state is the keys and values of every token so far,
    state = (k, v), each (batch, kv_heads, T, head_dim)
which grows by one token per step: O(T) memory, and a step reads all of it, O(T) time per token, where a Mamba
layer's state is a fixed size (mamba.py). `forward(hidden, state)` attends over past + new tokens and returns the
longer state, so prompts can be prefilled in chunks; `step` is forward on one token.

Padding (a batch of prompts of different lengths, left-padded): `attention_mask` (batch, T + L), True (1) for a
token and False (0) for a pad, over every position so far, cached and new (HF's 2D mask). A pad key is never read;
a query with no key to read (a pad whose earlier positions are all pads) gets 0, not the NaN of a softmax over
nothing; and with RoPE a token's position is the number of real tokens before it in its row, as HF derives
position_ids from the mask, so a padded row turns q and k by exactly the angles of the unpadded row.

Glossary (code name — symbol in the papers):
    hidden_size    — d_model
    num_heads      — h, the query heads;  num_kv_heads — g, the key/value heads (GQA's groups)
    head_dim       — d_k = d_v = d_model / h
    q, k, v        — Q, K, V split into heads: (batch, heads, L, head_dim)
    scale          — 1 / sqrt(d_k)
    Lq, Lk         — query and key lengths; the queries are the last Lq of the Lk positions
    T              — tokens in the cache;  state — (k, v) of those T tokens
    rope_theta     — θ, RoFormer's base (10000): channel pair i turns by p · θ^(-2i/d_k) at position p
    key_mask       — (batch, Lk) booleans, False at the pad keys (attention_mask over the Lk positions)

Where this differs from HF transformers' JambaAttention, and why:
  - The cache is a plain tuple (k, v) returned by forward, not a Cache object updated in place, like the Mamba
    mixer's state; forward continues a cache with any number of tokens (chunked prefill).
  - attention_mask covers the cached positions too (HF's 2D mask); the layer builds the 4D mask from it. A query
    with no key to read (a left pad) returns 0 where HF's eager path spreads it over every key: either is
    discarded, as a pad's output is never read.
  - The written-out softmax runs in the input's dtype if wider than float32 (HF rounds float64 scores to float32).
  - Optional RoPE (HF Jamba has none), with angles in float64 (Llama's are float32: position 16K is then only
    resolved to 2e-3 radians).
  - No dropout (Jamba's attention_dropout is 0).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_int
from .reference import check_attention_shapes

__all__ = ["causal_mask", "attention_written_out", "sdpa_attention", "apply_rope", "CausalSelfAttention"]


def causal_mask(Lq, Lk, device=None):
    """(Lq, Lk) booleans, True where query i may read key j: j <= Lk - Lq + i (aligned bottom-right).

    One broadcast comparison: a chunked prefill builds the mask for every chunk and layer, and this is about twice
    as fast as `tril` on a CPU."""
    keys = torch.arange(Lk, device=device)  # (Lk,)
    last_key = torch.arange(Lk - Lq, Lk, device=device)  # (Lq,): the last key each query may read
    return keys[None, :] <= last_key[:, None]  # (Lq, Lk)


def _check_key_mask(key_mask, k):
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(
            f"key_mask must be a bool (batch, Lk) = {(k.shape[0], k.shape[2])} tensor, got "
            f"{getattr(key_mask, 'dtype', key_mask)} {tuple(getattr(key_mask, 'shape', ()))}"
        )


def attention_written_out(q, k, v, scale=None, key_mask=None):
    """softmax(Q Kᵀ · scale + causal mask) V, step by step: the torch twin of `reference.causal_attention_ref`.

    q: (batch, heads, Lq, head_dim);  k, v: (batch, kv_heads, Lk, head_dim), Lk >= Lq, the queries being the last
    Lq positions;  scale: 1/sqrt(head_dim) if None;  key_mask: (batch, Lk) bool, False at keys no query may read
    (padding), None for none -> (batch, heads, Lq, head_dim). The softmax runs in at least float32. A query with
    no key left to read returns 0.
    """
    check_attention_shapes(q, k, v)
    _check_key_mask(key_mask, k)
    heads, Lq, head_dim = q.shape[1:]
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (batch, heads, Lk, head_dim)
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale  # (batch, heads, Lq, Lk)
    visible = causal_mask(Lq, Lk, q.device)  # (Lq, Lk)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]  # (batch, 1, Lq, Lk)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Max-subtracted: no overflow, and masked scores -> exactly 0. The clamp only acts on a row with every key
    # masked, whose max is -inf (-inf - -inf would be NaN): its weights become exp(-inf) = 0 ...
    row_max = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min)  # (..., Lq, 1)
    weights = (scores - row_max).exp()
    # ... and its sum 0, which the clamp keeps from 0/0. Any other row's sum is >= 1 (its max term is exp(0)).
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
    return weights.to(v.dtype) @ v  # (batch, heads, Lq, head_dim)


def sdpa_attention(q, k, v, scale=None, key_mask=None):
    """The same through torch's fused scaled_dot_product_attention: shapes and semantics of attention_written_out."""
    check_attention_shapes(q, k, v)
    _check_key_mask(key_mask, k)
    Lq, Lk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]  # SDPA then repeats kv head j // (heads / kv_heads), as repeat_interleave does
    # SDPA's is_causal=True aligns the mask top-left: query i reads keys 0..i whatever Lk is. That is our mask only
    # when Lq == Lk. A prefill continuing a cache of Lk - Lq tokens would have its query i read only the oldest i + 1
    # keys, never its own; one new token (Lq == 1) would read key 0 alone. So: is_causal for Lq == Lk, no mask for
    # a single query (the newest token reads everything), and our bottom-right mask in between.
    # With padding, the causal mask and the key mask go in one boolean (batch, 1, Lq, Lk) mask.
    if key_mask is not None:
        mask = causal_mask(Lq, Lk, q.device) & key_mask[:, None, None, :]  # (batch, 1, Lq, Lk)
        # A query with no key to read (a pad with only pads before it) reads every key instead, and its output is
        # then set to 0: whether a fused kernel's softmax over nothing gives 0 or NaN is never asked.
        has_key = mask.any(dim=-1, keepdim=True)  # (batch, 1, Lq, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale, enable_gqa=gqa)
        return y.masked_fill(~has_key, 0.0)  # (batch, heads, Lq, head_dim)
    if Lq == Lk:
        mask, is_causal = None, True
    elif Lq == 1:
        mask, is_causal = None, False
    else:
        mask, is_causal = causal_mask(Lq, Lk, q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def apply_rope(x, positions, theta=10000.0):
    """Rotary embedding, the torch twin of `reference.rope_ref`: x (..., L, head_dim) -> x's shape.

    positions: (L,), one position per column, or (batch, L), one per token of each row (padding: x is then
    (batch, heads, L, head_dim))."""
    half = x.shape[-1] // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64, device=x.device) / x.shape[-1])  # (d/2,)
    angle = positions.to(torch.float64)[..., None] * freq  # (L, d/2) or (batch, L, d/2)
    if positions.ndim == 2:
        angle = angle[:, None]  # (batch, 1, L, d/2): every head of a row turns by its row's angles
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]  # (..., L, d/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (..., L, d)


class CausalSelfAttention(nn.Module):
    """Causal GQA self-attention, (batch, L, hidden_size) -> (batch, L, hidden_size), plus the (k, v) cache.

    Parameter names match HF JambaAttention (`self_attn.q_proj` ...), so checkpoints map one to one.
    `use_sdpa = False` switches to the written-out attention (teaching, tests).
    """

    def __init__(
        self, hidden_size, num_heads, num_kv_heads=None, rope=False, rope_theta=10000.0, device=None, dtype=None
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            positive_int(name, value)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        if rope and self.head_dim % 2:
            raise ValueError(f"rope turns channel pairs: head_dim = hidden_size / num_heads = {self.head_dim} is odd")
        self.rope, self.rope_theta = rope, rope_theta
        self.use_sdpa = True
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False, **factory)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False, **factory)

    def empty_state(self, batch):
        """The state before the first token: (k, v) with T = 0, in the layer's dtype and device."""
        w = self.k_proj.weight
        empty = w.new_zeros(batch, self.num_kv_heads, 0, self.head_dim)  # (batch, kv_heads, 0, head_dim)
        return empty, empty.clone()

    def _check_state(self, state, batch):
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError("state must be a tuple (k, v) from empty_state() or a previous forward/step")
        expected = (batch, self.num_kv_heads, self.head_dim)
        for name, t in zip(("k", "v"), state, strict=True):
            if t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != expected:
                raise ValueError(
                    f"state {name} must have shape (batch={batch}, kv_heads={self.num_kv_heads}, T, "
                    f"head_dim={self.head_dim}), got {tuple(t.shape)}"
                )
        if state[0].shape != state[1].shape:
            raise ValueError(f"state k and v must have one shape, got {tuple(state[0].shape)}, {tuple(state[1].shape)}")
        return state

    def forward(self, hidden, state=None, attention_mask=None):
        """hidden (batch, L, hidden_size), state from empty_state / a previous call (None: a fresh sequence)
        -> (out (batch, L, hidden_size), state (k, v) holding the T + L tokens).

        attention_mask: (batch, T + L) bool, False at the pads of the cached and new positions; None: no padding
        (the caller, CausalLM, checks it is left padding)."""
        if hidden.ndim != 3 or hidden.shape[1] < 1 or hidden.shape[2] != self.hidden_size:
            raise ValueError(
                f"hidden must have shape (batch, L >= 1, hidden_size={self.hidden_size}), got {tuple(hidden.shape)}"
            )
        batch, L, _ = hidden.shape
        k_past, v_past = self.empty_state(batch) if state is None else self._check_state(state, batch)
        T = k_past.shape[2]
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, T + L):
            raise ValueError(
                f"attention_mask must cover the T + L = {T + L} cached and new positions: shape {(batch, T + L)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        q = self.q_proj(hidden).view(batch, L, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, L, hd)
        k = self.k_proj(hidden).view(batch, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (batch, kv, L, hd)
        v = self.v_proj(hidden).view(batch, L, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (batch, kv, L, hd)
        if self.rope:  # at positions T..T+L-1 without padding; the cache holds keys already rotated
            if attention_mask is None:
                positions = torch.arange(T, T + L, device=hidden.device)  # (L,)
            else:  # real tokens before each one (HF: cumsum - 1); a pad's position is 0, and its output unread
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T:]  # (batch, L)
            q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
        # cat, not a preallocated buffer: the cache holds exactly T + L tokens, at the price of copying it each call.
        k, v = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)  # (batch, kv_heads, T + L, head_dim)
        attend = sdpa_attention if self.use_sdpa else attention_written_out
        y = attend(q, k, v, key_mask=attention_mask)  # (batch, heads, L, head_dim)
        out = self.o_proj(y.transpose(1, 2).reshape(batch, L, self.num_heads * self.head_dim))  # (batch, L, hidden)
        return out, (k, v)

    def step(self, hidden_t, state, attention_mask=None):
        """One token: hidden_t (batch, hidden_size), state -> (out (batch, hidden_size), state one token longer).

        attention_mask: (batch, T + 1) as in forward, or None. O(T) per token, not O(1) as in Mamba: the new query
        reads all T cached keys and values (and the cat copies them)."""
        if hidden_t.ndim != 2:
            raise ValueError(f"hidden_t must have shape (batch, hidden_size), got {tuple(hidden_t.shape)}")
        out, state = self(hidden_t[:, None], state, attention_mask)  # (batch, 1, hidden_size)
        return out[:, 0], state
