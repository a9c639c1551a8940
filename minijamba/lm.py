"""The causal language model both families share: one output type, one cache, one base class.

MambaLM (mamba.py) and JambaLM (jamba.py) are the same skeleton,
    input_ids (batch, L) -> embed_tokens -> layers -> final_layernorm -> lm_head -> logits (batch, L, vocab),
and differ only in their layers. A layer here is any module with
    layer(hidden, state) -> (hidden, state after the last token, routing or None)    a whole sequence
    layer.step(hidden_t, state) -> (hidden_t, state)                                 one token
    layer.mixer.empty_state(batch)                                                   the state before the first token
    layer.kind ("mamba" | "attention"), layer.is_moe
so `CausalLM` owns everything else once: the input and cache checks, forward (a prompt in parallel, continuing a
cache: chunked prefill), step (one token), prefill, generate (generation.py), the checkpoints (checkpoint.py) and the
part of the init they share.

    CausalLMOutput(logits, aux_loss, router_logits)   what forward returns, for every model (transformers' names)
    LMCache(states, seqlen)                            the inference state: one tuple of tensors per layer
        Mamba layer      (conv_state, ssm_state)      (batch, d_inner, d_conv), (batch, d_inner, N): fixed size
        attention layer  (k, v)                       each (batch, kv_heads, T, head_dim): grows with T

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
    seqlen: int = 0  # tokens consumed so far (informative only: nothing depends on it)

    @property
    def nbytes(self):
        """Bytes the cache holds now: the attention layers' share grows with seqlen, the Mamba layers' does not."""
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
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, **factory)
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = RMSNorm(hidden_size, eps=norm_eps, **factory)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False, **factory)
        self.tied_head = tie_embeddings
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
        states = getattr(cache, "states", None)
        if not isinstance(states, list) or len(states) != len(self.layers):
            raise ValueError(f"cache must be an LMCache from new_cache() with {len(self.layers)} layers, got {cache!r}")
        if states[0][0].shape[0] != batch:
            raise ValueError(f"cache is for batch {states[0][0].shape[0]}, input has batch {batch}")

    def _logits(self, hidden):
        return self.lm_head(self.final_layernorm(hidden.to(self.final_layernorm.weight.dtype)))

    def _aux_loss(self, router_logits, like):
        if not router_logits:
            return like.new_zeros(())
        return load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok)

    def forward(self, input_ids, cache=None):
        """input_ids (batch, L) -> CausalLMOutput(logits (batch, L, vocab), aux_loss, router_logits).

        With a cache: start from it and leave it after the last token, so forward(ids[:, :k], c) then
        forward(ids[:, k:], c) equals forward(ids). aux_loss is HF's load-balancing loss over all MoE layers,
        unweighted (0 without MoE layers): a training loss adds aux_loss_coef times it.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids must be a (batch, L) tensor with L >= 1, got {getattr(input_ids, 'shape', input_ids)}"
            )
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        hidden = self.embed_tokens(input_ids)  # (batch, L, hidden_size)
        router_logits = []
        for i, layer in enumerate(self.layers):
            hidden, state, routing = layer(hidden, None if cache is None else cache.states[i])
            if cache is not None:
                cache.states[i] = state
            if routing is not None:
                router_logits.append(routing.logits)  # (batch·L, num_experts)
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        logits = self._logits(hidden)  # (batch, L, vocab)
        return CausalLMOutput(logits, self._aux_loss(router_logits, logits), tuple(router_logits))

    def step(self, token, cache):
        """token (batch,) -> logits (batch, vocab) for the next position; advances the cache by one token.

        O(1) in the Mamba layers and O(T) in the attention layers, which read their whole KV cache.
        """
        if not isinstance(token, torch.Tensor) or token.ndim != 1:
            raise ValueError(f"token must be (batch,), one id per sequence, got {getattr(token, 'shape', token)}")
        self._check_cache(cache, token.shape[0])
        hidden = self.embed_tokens(token)  # (batch, hidden_size)
        for i, layer in enumerate(self.layers):
            hidden, cache.states[i] = layer.step(hidden, cache.states[i])
        cache.seqlen += 1
        return self._logits(hidden)  # (batch, vocab)

    def prefill(self, prompt_ids, cache):
        """Run the prompt into the cache; logits (batch, vocab) for the token after it."""
        return self(prompt_ids, cache).logits[:, -1]
