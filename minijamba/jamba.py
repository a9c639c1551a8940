"""Jamba: a hybrid of attention and Mamba layers, with mixture-of-experts MLPs, and its hybrid inference cache.

Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model", §2 (Figure 1) and §3. Every layer is a
pre-norm residual pair, a mixer then an MLP:
    h = h + mixer(RMSNorm(h))          mixer: causal self-attention (attention.py) or a Mamba block (mamba.py)
    h = h + mlp(RMSNorm(h))            mlp: a SwiGLU MLP, or a mixture of experts of SwiGLUs (moe.py)
Which one, layer by layer, is two rules (the HF config names):
    attention  iff i % attn_layer_period == attn_layer_offset        Jamba-v0.1: 8, 4 — one attention layer in 8
    MoE        iff i % expert_layer_period == expert_layer_offset    Jamba-v0.1: 2, 1 — every other layer
No positional encoding anywhere: the Mamba layers carry order (the paper found RoPE in the hybrid adds nothing).

Why mix: attention recalls any earlier token exactly but keeps a KV cache that grows with the context; Mamba
compresses the past into a fixed state (cheap, long) but can fail to retrieve a specific earlier token. Jamba-v0.1
(52B parameters, 12B active per token) keeps 4 attention layers out of 32, so its KV cache at 256K tokens is
4 GB where an all-attention model of the same shape (Mixtral) needs 32 GB.

Inference (`HybridCache`): each layer keeps its own state, and nothing else is needed to continue a sequence:
    attention layer   (k, v)                    each (batch, kv_heads, T, head_dim): grows with the context T
    Mamba layer       (conv_state, ssm_state)   (batch, d_inner, d_conv), (batch, d_inner, N): fixed size

Sizing from the config alone, without building (any size, even 52B): `count_parameters` (total and active per
token), `parameters_by_part` (where they live: what a quantization scheme needs), `cache_bytes` (the cache after
T tokens) and `longest_context` (the longest T whose cache fits in given memory).

Glossary (code name — symbol or name in the Jamba paper / HF config):
    hidden_size              — d, the model width;  intermediate_size — the (expert) MLP's hidden width
    attn_layer_period/offset — l = 8 layers per Jamba block, a : m = 1 : 7 attention to Mamba
    expert_layer_period/offset — e = 2, MoE every other layer;  num_experts — n = 16;  num_experts_per_tok — K = 2
    mamba_d_state, mamba_d_conv, mamba_expand, mamba_dt_rank — N, the conv width, E, R of the Mamba block
    router_aux_loss_coef     — the load-balancing loss weight (0.001)
    layer_types              — "attention" / "mamba" per layer;  moe_layers — which layers have experts

Where this differs from HF `JambaForCausalLM` and why:
  - No attention_mask / left padding (as MambaLM); the load-balancing loss function takes a mask for callers.
  - forward with a cache takes any number of tokens (chunked prefill), and `step` is a separate O(1)-per-Mamba-layer
    call, as in MambaLM.
  - Init: official Mamba init for the Mamba layers (Δ log-uniform, A = -(1..N)), N(0, 0.02) for the embedding and
    the routers, torch's default for the other Linear weights, and every residual branch's output projection divided
    by sqrt(2 · num_hidden_layers) (GPT-2's scheme, two branches per layer). HF draws every Linear from
    N(0, initializer_range) and zeroes dt_proj's bias, which starts every Δ at softplus(0) = 0.69.
  - Additions with no HF counterpart, off by default: `normalize_top_k` (Mixtral's renormalised routing weights),
    `capacity_factor` (dropped tokens), `rope` (for the lesson's NoPE-vs-RoPE comparison). transformers ignores them,
    so save_pretrained warns when one is on.
  - tie_word_embeddings defaults to True here (small models); HF's default and Jamba-v0.1's are False.
"""

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
from torch import nn

from .attention import CausalSelfAttention
from .checkpoint import CheckpointError, HFCheckpointMixin
from .generation import GenerationMixin
from .mamba import MambaConfig, MambaMixer, RMSNorm
from .moe import MoE, SwiGLU, load_balancing_loss

__all__ = [
    "JambaConfig",
    "PRESETS",
    "JambaLayer",
    "HybridCache",
    "JambaOutput",
    "JambaLM",
    "ParameterCount",
    "count_parameters",
    "PARTS",
    "parameters_by_part",
    "cache_bytes",
    "longest_context",
]

# Fields of JambaConfig that HF's JambaConfig does not have: kept in our config.json, ignored by transformers.
NOT_IN_HF = {"normalize_top_k": False, "capacity_factor": None, "rope": False, "rope_theta": 10000.0}


@dataclass
class JambaConfig:
    """A Jamba LM's shape, with the field names of HF transformers' JambaConfig (see PRESETS for real sizes)."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    num_experts: int = 4
    num_experts_per_tok: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"  # "auto": ceil(hidden_size / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    rms_norm_eps: float = 1e-6
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std of the embedding's and the routers' init
    normalize_top_k: bool = False  # not in HF: Mixtral-style renormalised top-k weights
    capacity_factor: float | None = None  # not in HF: expert capacity, None = no token is ever dropped
    rope: bool = False  # not in HF: rotary positions in the attention layers
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        positive = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
            "attn_layer_period expert_layer_period num_experts num_experts_per_tok mamba_d_state mamba_d_conv "
            "mamba_expand mamba_dt_rank"
        )
        for name in positive.split():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for offset, period in (
            ("attn_layer_offset", "attn_layer_period"),
            ("expert_layer_offset", "expert_layer_period"),
        ):
            if not isinstance(getattr(self, offset), int) or not 0 <= getattr(self, offset) < getattr(self, period):
                raise ValueError(
                    f"{offset} must be in [0, {period}={getattr(self, period)}), got {getattr(self, offset)!r}"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be divisible by num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} > num_experts {self.num_experts}")

    @property
    def layer_types(self):
        """ "attention" or "mamba" for each layer (HF's layers_block_type)."""
        return tuple(
            "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            for i in range(self.num_hidden_layers)
        )

    @property
    def moe_layers(self):
        """True for each layer whose MLP is a mixture of experts (HF: layers_num_experts[i] > 1)."""
        return tuple(
            self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
            for i in range(self.num_hidden_layers)
        )

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def mamba_config(self):
        """The MambaConfig of this model's Mamba layers: Jamba's mixer is Mamba's, with RMSNorms on Δ, B and C."""
        return MambaConfig(
            d_model=self.hidden_size,
            n_layer=self.num_hidden_layers,
            vocab_size=self.vocab_size,
            d_state=self.mamba_d_state,
            d_conv=self.mamba_d_conv,
            expand=self.mamba_expand,
            dt_rank=self.mamba_dt_rank,
            conv_bias=self.mamba_conv_bias,
            bias=self.mamba_proj_bias,
            inner_norms=True,
            norm_eps=self.rms_norm_eps,
        )

    @classmethod
    def preset(cls, name, **overrides):
        """A named configuration (PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_hf(self):
        """The config.json dict of HF JambaForCausalLM (our extra fields included; transformers ignores them)."""
        return {"architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_act": "silu", **asdict(self)}

    @classmethod
    def from_hf(cls, hf):
        """From a HF Jamba config.json dict; a field it lacks takes HF's default (Jamba-v0.1's)."""
        for key, expected in (("model_type", "jamba"), ("hidden_act", "silu")):
            if hf.get(key, expected) != expected:
                raise CheckpointError(f"config.json: {key} is {hf[key]!r}; this loader reads {expected!r} only")
        jamba_v01 = cls.preset("jamba-v0.1")
        hf_defaults = {f.name: getattr(jamba_v01, f.name) for f in fields(cls)}
        values = {name: hf.get(name, default) for name, default in hf_defaults.items()}
        if values["num_key_value_heads"] is None:  # HF's convention for plain multi-head attention
            values["num_key_value_heads"] = values["num_attention_heads"]
        try:
            return cls(**values)
        except ValueError as e:
            raise CheckpointError(f"config.json: {e}") from e


# Named configurations, as JambaConfig keyword arguments (so "auto" fields resolve after any override).
PRESETS = {
    # Two Jamba blocks' worth of layout in 4 layers: [mamba, mamba+MoE, attention, mamba+MoE]; for tests.
    "tiny": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, num_experts=4, mamba_d_state=8,
    ),
    # TinyStories on a 2-core CPU (issue 7 tunes it): 1 attention layer in 4, MoE every other layer.
    "small-cpu": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, num_experts=4, mamba_d_state=16,
    ),
    # The real ai21labs/Jamba-v0.1 (HF's defaults): for counting parameters and cache bytes, not for building.
    "jamba-v0.1": dict(
        vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
        num_experts=16, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
        tie_word_embeddings=False,
    ),
    # Two Transformers in JambaConfig's terms (every layer attention), for lesson 05's budget beside Jamba: counting
    # parameters and cache bytes, not building. Their rotary positions change neither count, so rope stays off.
    # Mixtral-8x7B (Jiang et al. 2024): an MoE of 8 experts, top-2, in every layer; 46.7B parameters.
    "mixtral-8x7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1, expert_layer_offset=0,
        num_experts=8, num_experts_per_tok=2, normalize_top_k=True, tie_word_embeddings=False,
    ),
    # Llama-2-70B (Touvron et al. 2023): dense, 80 layers, GQA with 8 KV heads; 69.0B parameters.
    "llama-2-70b": dict(
        vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, attn_layer_period=1, attn_layer_offset=0, num_experts=1, num_experts_per_tok=1,
        tie_word_embeddings=False,
    ),
}  # fmt: skip

# Our parameter names -> HF JambaForCausalLM's, as (our prefix, HF prefix), first match wins. Layers already use HF's
# module names (self_attn, mamba, feed_forward, router, experts.{e}, input_layernorm, pre_ff_layernorm); the Mamba
# mixer groups its SSM parameters in `mamba.ssm`, where HF keeps them in the mixer, with its own names for the norms.
HF_NAMES = (
    ("layers.{i}.mamba.ssm.dt_norm.", "model.layers.{i}.mamba.dt_layernorm."),
    ("layers.{i}.mamba.ssm.B_norm.", "model.layers.{i}.mamba.b_layernorm."),
    ("layers.{i}.mamba.ssm.C_norm.", "model.layers.{i}.mamba.c_layernorm."),
    ("layers.{i}.mamba.ssm.", "model.layers.{i}.mamba."),
    ("layers.{i}.", "model.layers.{i}."),
    ("embed_tokens.", "model.embed_tokens."),
    ("final_layernorm.", "model.final_layernorm."),
    ("lm_head.", "lm_head."),
)


class JambaLayer(nn.Module):
    """One layer: h + mixer(RMSNorm(h)), then h + mlp(RMSNorm(h)). The mixer is `self_attn` or `mamba`."""

    def __init__(self, config, layer_idx, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.kind = config.layer_types[layer_idx]
        self.is_moe = config.moe_layers[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **factory)
        if self.kind == "attention":
            self.self_attn = CausalSelfAttention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                rope=config.rope,
                rope_theta=config.rope_theta,
                **factory,
            )
        else:
            self.mamba = MambaMixer(config.mamba_config(), **factory)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **factory)
        if self.is_moe:
            self.feed_forward = MoE(
                config.hidden_size,
                config.intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                normalize_top_k=config.normalize_top_k,
                capacity_factor=config.capacity_factor,
                **factory,
            )
        else:
            self.feed_forward = SwiGLU(config.hidden_size, config.intermediate_size, **factory)

    @property
    def mixer(self):
        return self.self_attn if self.kind == "attention" else self.mamba

    def _mlp(self, h):
        """h + mlp(RMSNorm(h)) for h (batch, L, hidden) -> (h, the router's output or None)."""
        out = self.feed_forward(self.pre_ff_layernorm(h))
        out, routing = out if self.is_moe else (out, None)
        return h + out, routing

    def forward(self, h, state=None):
        """h (batch, L, hidden), the mixer's state or None -> (h, state after the last token, routing or None)."""
        out, state = self.mixer(self.input_layernorm(h), state)
        h, routing = self._mlp(h + out)
        return h, state, routing

    def step(self, h_t, state):
        """One token: h_t (batch, hidden) -> (h_t, state)."""
        out, state = self.mixer.step(self.input_layernorm(h_t), state)
        h, _ = self._mlp((h_t + out)[:, None])  # (batch, 1, hidden): the MLP reads tokens, one here
        return h[:, 0], state


@dataclass
class HybridCache:
    """The inference state of a JambaLM: per layer (k, v) for attention, (conv_state, ssm_state) for Mamba."""

    states: list = field(default_factory=list)  # num_hidden_layers × a 2-tuple of tensors (see the module docstring)
    seqlen: int = 0  # tokens consumed so far

    @property
    def nbytes(self):
        """Bytes the cache holds now: the attention layers' share grows with seqlen, the Mamba layers' does not."""
        return sum(t.nbytes for state in self.states for t in state)


class JambaOutput(NamedTuple):
    logits: torch.Tensor  # (batch, L, vocab)
    aux_loss: torch.Tensor  # the load-balancing loss over every MoE layer (HF's aux_loss); 0 without MoE layers
    router_logits: tuple  # one (batch·L, num_experts) tensor per MoE layer: for the z-loss and utilisation stats


class JambaLM(GenerationMixin, HFCheckpointMixin, nn.Module):
    """Embedding -> JambaLayers -> RMSNorm -> LM head. `generate`, `from_pretrained`, `save_pretrained` as MambaLM."""

    config_class = JambaConfig
    HF_NAMES = HF_NAMES
    HF_EMBEDDING = "model.embed_tokens.weight"

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(JambaLayer(config, i, **factory) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def tied_head(self):
        return self.config.tie_word_embeddings

    @torch.no_grad()
    def _init_weights(self):
        std = self.config.initializer_range
        nn.init.normal_(self.embed_tokens.weight, std=std)
        for module in self.modules():
            bias = module.bias if isinstance(module, nn.Linear) else None
            if bias is not None and not getattr(bias, "_no_reinit", False):  # dt_proj.bias holds Δ's init
                nn.init.zeros_(bias)
        residual_scale = math.sqrt(2 * self.config.num_hidden_layers)  # two residual branches per layer
        for layer in self.layers:
            out = layer.mamba.out_proj if layer.kind == "mamba" else layer.self_attn.o_proj
            out.weight /= residual_scale
            if layer.is_moe:
                nn.init.normal_(layer.feed_forward.router.weight, std=std)
                for expert in layer.feed_forward.experts:
                    expert.down_proj.weight /= residual_scale
            else:
                layer.feed_forward.down_proj.weight /= residual_scale

    def new_cache(self, batch):
        """An empty cache for `batch` sequences: zero-length KV for attention layers, zero states for Mamba layers."""
        return HybridCache([layer.mixer.empty_state(batch) for layer in self.layers])

    def _check_cache(self, cache, batch):
        if not isinstance(cache, HybridCache) or len(cache.states) != len(self.layers):
            raise ValueError(f"cache must be a HybridCache from new_cache() with {len(self.layers)} layers")
        if cache.states[0][0].shape[0] != batch:
            raise ValueError(f"cache is for batch {cache.states[0][0].shape[0]}, input has batch {batch}")

    def _logits(self, h):
        return self.lm_head(self.final_layernorm(h))

    def forward(self, input_ids, cache=None):
        """input_ids (batch, L) -> JambaOutput(logits (batch, L, vocab), aux_loss, router_logits).

        With a cache: start from it and leave it after the last token, so forward(ids[:, :k], c) then
        forward(ids[:, k:], c) equals forward(ids). aux_loss is HF's load-balancing loss over all MoE layers,
        unweighted: a training loss adds router_aux_loss_coef times it.
        """
        if input_ids.ndim != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, L) with L >= 1, got {tuple(input_ids.shape)}")
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        h = self.embed_tokens(input_ids)  # (batch, L, hidden)
        router_logits = []
        for i, layer in enumerate(self.layers):
            h, state, routing = layer(h, None if cache is None else cache.states[i])
            if cache is not None:
                cache.states[i] = state
            if routing is not None:
                router_logits.append(routing.logits)  # (batch·L, num_experts)
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
        if router_logits:
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts, self.config.num_experts_per_tok)
        else:
            aux_loss = h.new_zeros(())
        return JambaOutput(self._logits(h), aux_loss, tuple(router_logits))

    def step(self, token, cache):
        """token (batch,) -> logits (batch, vocab) for the next position; advances the cache by one token.

        O(1) in the Mamba layers and O(T) in the attention layers, which read their whole KV cache.
        """
        if token.ndim != 1:
            raise ValueError(f"token must be (batch,), one id per sequence, got {tuple(token.shape)}")
        self._check_cache(cache, token.shape[0])
        h = self.embed_tokens(token)  # (batch, hidden)
        for i, layer in enumerate(self.layers):
            h, cache.states[i] = layer.step(h, cache.states[i])
        cache.seqlen += 1
        return self._logits(h)  # (batch, vocab)

    def prefill(self, prompt_ids, cache):
        """Run the prompt into the cache; logits (batch, vocab) for the token after it."""
        return self(prompt_ids, cache).logits[:, -1]

    def save_pretrained(self, directory):
        on = {name: getattr(self.config, name) for name, off in NOT_IN_HF.items() if getattr(self.config, name) != off}
        if on:
            warnings.warn(
                f"{on} have no HF Jamba counterpart: transformers would load this checkpoint without them", stacklevel=2
            )
        return super().save_pretrained(directory)


class ParameterCount(NamedTuple):
    total: int  # every parameter (a tied head counted once)
    active: int  # those one token uses: each MoE layer counts only num_experts_per_tok of its experts


def count_parameters(config):
    """Total and active-per-token parameters of a JambaLM, counted on the meta device (no memory, any size)."""
    model = JambaLM(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in model.layers:
        if layer.is_moe:
            per_expert = sum(p.numel() for p in layer.feed_forward.experts[0].parameters())
            idle += (config.num_experts - config.num_experts_per_tok) * per_expert
    return ParameterCount(total, total - idle)


# Where a JambaLM's parameters live, as (the part, a test on the parameter's name), first match wins.
_PART_OF = (
    ("embedding", lambda name: name.startswith("embed_tokens.")),
    ("lm_head", lambda name: name.startswith("lm_head.")),
    ("attention", lambda name: ".self_attn." in name),
    ("mamba", lambda name: ".mamba." in name),  # the whole mixer: projections, conv, A_log, D and its inner norms
    ("routers", lambda name: ".feed_forward.router." in name),
    ("experts", lambda name: ".feed_forward.experts." in name),
    ("mlp", lambda name: ".feed_forward." in name),  # a dense layer's SwiGLU
    ("norms", lambda name: True),  # input_layernorm, pre_ff_layernorm, final_layernorm
)
PARTS = tuple(part for part, _ in _PART_OF)


def parameters_by_part(config):
    """{part: parameters} over PARTS for a JambaLM, counted on the meta device; a tied LM head counts 0.

    The parts sum to count_parameters(config).total. They are what a quantization scheme needs: e.g. the Jamba
    card's 8-bit loading keeps the Mamba mixers (the "mamba" part) in 16 bits.
    """
    counts = dict.fromkeys(PARTS, 0)
    for name, p in JambaLM(config, device="meta").named_parameters():
        counts[next(part for part, matches in _PART_OF if matches(name))] += p.numel()
    return counts


def cache_bytes(config, batch, context, dtype=torch.float32):
    """Bytes a HybridCache holds after `context` tokens (what new_cache + forward leave in HybridCache.nbytes).

    attention layer: 2 (k and v) · batch · kv_heads · head_dim · context;  Mamba layer: batch · d_inner · (d_conv + N).
    """
    item = torch.empty((), dtype=dtype).element_size()
    d_inner = config.mamba_expand * config.hidden_size
    per_layer = {
        "attention": 2 * batch * config.num_key_value_heads * config.head_dim * context,
        "mamba": batch * d_inner * (config.mamba_d_conv + config.mamba_d_state),
    }
    return item * sum(per_layer[kind] for kind in config.layer_types)


def longest_context(config, memory_bytes, batch=1, dtype=torch.bfloat16):
    """The largest context T with cache_bytes(config, batch, T, dtype) <= memory_bytes: how long the sequences of a
    batch can grow in the memory left for the cache. math.inf without attention layers (the cache never grows).
    Raises ValueError when not even the empty cache (the Mamba layers' states) fits."""
    fixed = cache_bytes(config, batch, 0, dtype)  # the Mamba states: the same at every length
    if fixed > memory_bytes:
        raise ValueError(f"{memory_bytes} bytes do not hold even the empty cache ({fixed} bytes of Mamba states)")
    per_token = cache_bytes(config, batch, 1, dtype) - fixed  # the attention layers' k and v of one more token
    return math.inf if per_token == 0 else (memory_bytes - fixed) // per_token
