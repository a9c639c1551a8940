"""The causal language model both families share: one output type, one cache, one base class.

MambaLM (mamba.py) and JambaLM (jamba.py) are the same skeleton,
    input_ids (batch, L) -> embed_tokens -> layers -> final_layernorm -> lm_head -> logits (batch, L, vocab),
and differ only in their layers. A layer here is any module with
    layer(hidden, state, attention_mask) -> (hidden, state after the last token, routing or None)   a sequence
    layer.step(hidden_t, state, attention_mask) -> (hidden_t, state)                                one token
    layer.mixer.empty_state(batch)                                                  the state before the first token
    layer.kind ("mamba" | "attention"), layer.is_moe
(attention_mask: (batch, T + L) bool over the cached and new positions, False at pads; None without padding)
so `CausalLM` owns everything else once: the input and cache checks, forward (a prompt in parallel, continuing a
cache: chunked prefill), step (one token), prefill, generate (generation.py), the checkpoints (checkpoint.py) and the
part of the init they share.

    CausalLMOutput(logits, aux_loss, router_logits)   what forward returns, for every model (transformers' names)
    LMCache(states, seqlen, pads)                      the inference state: one tuple of tensors per layer
        Mamba layer      (conv_state, ssm_state)      (batch, d_inner, d_conv), (batch, d_inner, N): fixed size
        attention layer  (k, v)                       each (batch, kv_heads, T, head_dim): grows with T

Batches of prompts of different lengths: `attention_mask` (batch, L) in forward / prefill / generate, 1 (or True)
at tokens and 0 at pads, with transformers' meaning and LEFT padding only: a row is 0...0 1...1, and once a row
has a token every later position is one. The cache keeps each row's number of leading pads (`pads`, (batch,)), which
is the whole mask (`LMCache.attention_mask`) under left padding, so every later chunk and step still masks the
cached pad keys; each layer gets the mask of all positions so far (HF's 2D mask). Pads change no Mamba state, are
never attended to, count nowhere in the aux loss, and take no RoPE position; so the logits at a row's tokens are
its unpadded run's, up to rounding.

Attribute names are HF transformers' Llama/Jamba ones (`embed_tokens`, `layers`, `final_layernorm`, `lm_head`); the
official mamba_ssm model calls the first and third `backbone.embedding` and `backbone.norm_f`, HF Mamba
`backbone.embeddings` and `backbone.norm_f` (each model's checkpoint name table maps them).
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .checkpoint import HFCheckpointMixin
from .generation import GenerationMixin
from .moe import load_balancing_loss
from .norm import RMSNorm

__all__ = ["CausalLMOutput", "LMCache", "CausalLM"]


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor  # (batch, L, vocab)
    aux_loss: torch.Tensor  # the load-balancing loss over every MoE layer (HF's aux_loss); 0 without MoE layers
    router_logits: tuple  # one (batch·L, num_experts) tensor per MoE layer: for the z-loss and utilisation stats


@dataclass
class LMCache:
    """The whole inference state of a CausalLM, one entry per layer (the module docstring gives the shapes)."""

    states: list = field(default_factory=list)  # n_layers × a tuple of tensors
    seqlen: int = 0  # positions consumed so far, pads included (the masks built from pads span it)
    pads: torch.Tensor | None = None  # (batch,) int64: each row's leading pads; None while no position was a pad

    @property
    def attention_mask(self):
        """(batch, seqlen) bool, False at the pads and True at the tokens so far; None without padding."""
        if self.pads is None:
            return None
        return torch.arange(self.seqlen, device=self.pads.device)[None, :] >= self.pads[:, None]  # (batch, seqlen)

    @property
    def nbytes(self):
        """Bytes of the layer states now: the attention layers' share grows with seqlen, the Mamba layers' does not.

        `pads` (batch integers) is left out, as models.cache_bytes leaves it out: it does not grow with seqlen."""
        return sum(t.nbytes for state in self.states for t in state)


class CausalLM(GenerationMixin, HFCheckpointMixin, nn.Module):
    """Embedding -> layers -> RMSNorm -> LM head (optionally tied to the embedding). A subclass builds its layers.

    Subclasses set `config_class`, the checkpoint tables (HF_NAMES, HF_EMBEDDING: see HFCheckpointMixin) and
    `aux_loss_coef` (the weight a training loss gives aux_loss), and call `super().__init__` with their layers.
    """

    aux_loss_coef = 0.0

    def __init__(self, config, layers, hidden_size, vocab_size, norm_eps, tie_embeddings, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        # Meta tensors (count_parameters, from_pretrained's size check) hold no values to initialise, and torch's
        # normal_ on one first imports its Python decompositions, which takes seconds: no init at all there.
        meta = torch.empty(0, **factory).is_meta
        unset = torch.empty(vocab_size, hidden_size, **factory) if meta else None  # nn.Embedding's own init skipped
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, _weight=unset, **factory)
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = RMSNorm(hidden_size, eps=norm_eps, **factory)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, **factory)
        self.tied_head = tie_embeddings
        if not meta:
            self._init_weights()
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def _init_weights(self, embedding_std=0.02):
        """What both families' inits share: the embedding N(0, std²), every Linear bias zero except Δ's."""
        nn.init.normal_(self.embed_tokens.weight, std=embedding_std)
        for module in self.modules():
            bias = module.bias if isinstance(module, nn.Linear) else None
            if bias is not None and not getattr(bias, "_no_reinit", False):  # dt_proj.bias holds Δ's init
                nn.init.zeros_(bias)

    def new_cache(self, batch):
        """An empty cache for `batch` sequences: zero states for Mamba layers, zero-length (k, v) for attention."""
        return LMCache([layer.mixer.empty_state(batch) for layer in self.layers])

    def _check_cache(self, cache, batch):
        """The cache must be new_cache(batch)'s, advanced: every state with the shapes and device this model's
        layers make (an attention layer's keys and values cache.seqlen long), so a cache of another model of the
        same depth is refused here, not inside a layer's torch.cat."""
        states = getattr(cache, "states", None)
        if not isinstance(states, list) or len(states) != len(self.layers):
            raise ValueError(f"cache must be an LMCache from new_cache() with {len(self.layers)} layers, got {cache!r}")
        if states[0][0].shape[0] != batch:
            raise ValueError(f"cache is for batch {states[0][0].shape[0]}, input has batch {batch}")
        for i, (layer, state) in enumerate(zip(self.layers, states, strict=True)):
            fresh = layer.mixer.empty_state(batch)
            # A zero-length dimension of the fresh state (attention's T) has grown to the positions seen so far.
            want = [(tuple(cache.seqlen if n == 0 else n for n in f.shape), f.device) for f in fresh]
            state = state if isinstance(state, (tuple, list)) else [state]
            # The dtype may differ from the fresh state's (autocast computes some in 16 bits): floating point only.
            if len(state) != len(fresh) or not all(
                isinstance(t, torch.Tensor) and t.dtype.is_floating_point and (tuple(t.shape), t.device) == w
                for t, w in zip(state, want, strict=False)
            ):
                got = [(tuple(t.shape), t.device, t.dtype) if isinstance(t, torch.Tensor) else t for t in state]
                raise ValueError(
                    f"cache is not this model's: layer {i} ({layer.kind}) holds (shape, device, dtype) {got}, this "
                    f"model's holds (shape, device) {want}: make the cache with this model's new_cache()"
                )

    def _check_ids(self, name, ids):
        """Token ids must index the embedding: integers in [0, vocab_size) (on CUDA a bad one is a device assert)."""
        vocab = self.embed_tokens.num_embeddings
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must hold integer token ids (int64 or int32), got {ids.dtype}")
        if ids.numel() and ids.device.type != "meta":
            low, high = (int(x) for x in torch.aminmax(ids))
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"{name} must hold token ids in [0, vocab_size={vocab}), got ids from {low} to {high}: is the "
                    f"tokenizer this model's?"
                )

    def _logits(self, hidden):
        return self.lm_head(self.final_layernorm(hidden.to(self.final_layernorm.weight.dtype)))

    def _aux_loss(self, router_logits, like, attention_mask=None):
        """HF's aux loss; attention_mask (batch, L) leaves the pads out, as HF's JambaForCausalLM does."""
        if not router_logits or (attention_mask is not None and not attention_mask.any()):
            return like.new_zeros(())  # no MoE layer, or a chunk of pads only: nothing routed that counts
        top_k = self.config.num_experts_per_tok
        return load_balancing_loss(router_logits, self.config.num_experts, top_k, attention_mask=attention_mask)

    def _padding(self, attention_mask, input_ids, cache, need_token):
        """Check attention_mask (left padding, continuing the cache's) -> each row's leading pads (batch,) after
        input_ids, or None while no position is a pad. need_token: every row must have a token by then."""
        batch, L = input_ids.shape
        T, past = (0, None) if cache is None else (cache.seqlen, cache.pads)
        if attention_mask is None:
            return past  # every new position is a token
        if (
            not isinstance(attention_mask, torch.Tensor)
            or attention_mask.dtype.is_floating_point
            or attention_mask.dtype.is_complex
            or tuple(attention_mask.shape) != (batch, L)
        ):
            raise ValueError(
                f"attention_mask must be a bool or integer tensor of input_ids' shape {(batch, L)}, got "
                f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)} "
                f"{tuple(getattr(attention_mask, 'shape', ()))}"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
        real = attention_mask.to(device=input_ids.device, dtype=torch.bool)  # (batch, L)
        after_token = (real[:, :-1] & ~real[:, 1:]).any(-1)  # (batch,): a pad right after a token
        new_pads = L - real.sum(-1)  # (batch,)
        if past is None:
            past = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        after_token |= (past < T) & (new_pads > 0)  # a pad after a cached token
        if after_token.any():
            rows = after_token.nonzero()[:, 0].tolist()
            raise ValueError(
                f"attention_mask must be left padding, each row 0...0 1...1 and all 1 once the cache holds a token "
                f"of it: rows {rows} have a pad after a token"
            )
        pads = past + new_pads  # (batch,)
        if need_token and (pads == T + L).any():
            rows = (pads == T + L).nonzero()[:, 0].tolist()
            raise ValueError(f"attention_mask has rows of zeros, with no token to predict from: rows {rows}")
        return pads if bool((pads > 0).any()) else None

    def forward(self, input_ids, cache=None, attention_mask=None):
        """input_ids (batch, L) -> CausalLMOutput(logits (batch, L, vocab), aux_loss, router_logits).

        With a cache: start from it and leave it after the last token, so forward(ids[:, :k], c) then
        forward(ids[:, k:], c) equals forward(ids). aux_loss is HF's load-balancing loss over all MoE layers,
        unweighted (0 without MoE layers): a training loss adds aux_loss_coef times it.
        attention_mask (batch, L), 0/1 or bool, left padding (module docstring): the logits at pads are computed but
        mean nothing. Every row needs a token, except with a cache: a chunked prefill may reach a short row's first
        token in a later chunk.
        """
        return self._forward(input_ids, cache, attention_mask, need_token=cache is None)

    def _forward(self, input_ids, cache, attention_mask, need_token):
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids must be a (batch, L) tensor with L >= 1, got {getattr(input_ids, 'shape', input_ids)}"
            )
        self._check_ids("input_ids", input_ids)
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        pads = self._padding(attention_mask, input_ids, cache, need_token)
        T, L = (0 if cache is None else cache.seqlen), input_ids.shape[1]
        mask = None  # (batch, T + L): every position so far, the cached ones included, as each layer reads it
        if pads is not None:
            mask = torch.arange(T + L, device=input_ids.device)[None, :] >= pads[:, None]
        hidden = self.embed_tokens(input_ids)  # (batch, L, hidden_size)
        router_logits = []
        for i, layer in enumerate(self.layers):
            hidden, state, routing = layer(hidden, None if cache is None else cache.states[i], mask)
            if cache is not None:
                cache.states[i] = state
            if routing is not None:
                router_logits.append(routing.logits)  # (batch·L, num_experts)
        if cache is not None:
            cache.seqlen += L
            cache.pads = pads
        logits = self._logits(hidden)  # (batch, L, vocab)
        aux_loss = self._aux_loss(router_logits, logits, None if mask is None else mask[:, T:])
        return CausalLMOutput(logits, aux_loss, tuple(router_logits))

    def step(self, token, cache):
        """token (batch,) -> logits (batch, vocab) for the next position; advances the cache by one token.

        O(1) in the Mamba layers and O(T) in the attention layers, which read their whole KV cache (and, after a
        padded prefill, a (batch, T + 1) mask that hides the cached pads). The token is real in every row.
        """
        if not isinstance(token, torch.Tensor) or token.ndim != 1:
            raise ValueError(f"token must be (batch,), one id per sequence, got {getattr(token, 'shape', token)}")
        self._check_ids("token", token)
        self._check_cache(cache, token.shape[0])
        mask = None
        if cache.pads is not None and any(layer.kind == "attention" for layer in self.layers):
            mask = torch.arange(cache.seqlen + 1, device=token.device)[None, :] >= cache.pads[:, None]  # (batch, T+1)
        hidden = self.embed_tokens(token)  # (batch, hidden_size)
        for i, layer in enumerate(self.layers):
            hidden, cache.states[i] = layer.step(hidden, cache.states[i], mask)
        cache.seqlen += 1
        return self._logits(hidden)  # (batch, vocab)

    def prefill(self, prompt_ids, cache, attention_mask=None):
        """Run the prompt into the cache; logits (batch, vocab) for the token after it. attention_mask as in
        forward; every row must have a token by the end of the prompt."""
        return self._forward(prompt_ids, cache, attention_mask, need_token=True).logits[:, -1]
