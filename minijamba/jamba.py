"""Jamba: a hybrid of attention and Mamba layers, with mixture-of-experts MLPs, and its hybrid inference cache.

Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model", §2 (Figure 1) and §3. Every layer is a
pre-norm residual pair, a mixer then an MLP:
    h = h + mixer(RMSNorm(h))          mixer: causal self-attention (attention.py) or a Mamba block (mamba.py)
    h = h + mlp(RMSNorm(h))            mlp: a SwiGLU MLP, or a mixture of experts of SwiGLUs (moe.py)
Which one, layer by layer, is two rules (the HF config names):
    attention  iff i % attn_layer_period == attn_layer_offset        Jamba-v0.1: 8, 4 — one attention layer in 8
    MoE        iff i % expert_layer_period == expert_layer_offset    Jamba-v0.1: 2, 1 — every other layer
Named layouts (`layout_fields`, `JambaConfig.with_layout`): "all-mamba", "jamba", "all-attention", or HF's per-layer
type list, turned into the two fields above (the only layout HF's JambaConfig can store).
No positional encoding anywhere: the Mamba layers carry order (the paper found RoPE in the hybrid adds nothing).

Why mix: attention recalls any earlier token exactly but keeps a KV cache that grows with the context; Mamba
compresses the past into a fixed state (cheap, long) but can fail to retrieve a specific earlier token. Jamba-v0.1
(52B parameters, 12B active per token) keeps 4 attention layers out of 32, so its KV cache at 256K tokens is
4 GB where an all-attention model of the same shape (Mixtral) needs 32 GB.

Inference (the `LMCache` of lm.py): each layer keeps its own state, and nothing else is needed to continue a sequence:
    attention layer   (k, v)                    each (batch, kv_heads, T, head_dim): grows with the context T
    Mamba layer       (conv_state, ssm_state)   (batch, d_inner, d_conv), (batch, d_inner, N): fixed size

Sizing from the config alone, without building (any size, even 52B), is in models.py: `count_parameters`,
`parameters_by_part`, `cache_bytes`, `longest_context`.

Glossary (code name — symbol or name in the Jamba paper / HF config):
    hidden_size              — d, the model width;  intermediate_size — the (expert) MLP's hidden width
    attn_layer_period/offset — l = 8 layers per Jamba block, a : m = 1 : 7 attention to Mamba
    expert_layer_period/offset — e = 2, MoE every other layer;  num_experts — n = 16;  num_experts_per_tok — K = 2
    mamba_d_state, mamba_d_conv, mamba_expand, mamba_dt_rank — N, the conv width, E, R of the Mamba block
    router_aux_loss_coef     — the load-balancing loss weight (0.001)
    layer_types              — "attention" / "mamba" per layer;  moe_layers — which layers have experts

Where this differs from HF `JambaForCausalLM` and why:
  - attention_mask (left padding) as HF's: pads change no Mamba state (mamba.py), are never attended to
    (attention.py), and count nowhere in the aux loss; the MoE routes them too and their outputs are discarded
    (with a capacity_factor they would take capacity from real tokens: it is off by default).
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
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .attention import CausalSelfAttention
from .checkpoint import CheckpointError
from .checks import positive_int, positive_real
from .lm import CausalLM
from .mamba import MambaConfig, MambaMixer
from .moe import MoE, SwiGLU
from .norm import RMSNorm
from .s6 import auto_dt_rank

__all__ = [
    "JambaConfig",
    "PRESETS",
    "LAYOUTS",
    "layout_fields",
    "JambaLayer",
    "JambaLM",
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
    mamba_dt_rank: int | str = "auto"  # "auto": s6.auto_dt_rank(hidden_size) = ceil(hidden_size / 16)
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
    scan_impl: str = "chunked"  # the Mamba layers' scan (scan.py); not stored in checkpoints: a choice of this machine

    def __post_init__(self):
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = auto_dt_rank(self.hidden_size)
        positive = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
            "attn_layer_period expert_layer_period num_experts num_experts_per_tok mamba_d_state mamba_d_conv "
            "mamba_expand mamba_dt_rank"
        )
        for name in positive.split():
            positive_int(name, getattr(self, name))
        for name in ("rms_norm_eps", "initializer_range"):
            positive_real(name, getattr(self, name), finite=True)
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
        return _layer_types(self.num_hidden_layers, self.attn_layer_period, self.attn_layer_offset)

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
            scan_impl=self.scan_impl,
        )

    @classmethod
    def preset(cls, name, layout=None, **overrides):
        """A named configuration (PRESETS), with any field overridden; `layout` (see with_layout) replaces its own."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        if layout is None or layout == "jamba":
            return cls.with_layout("jamba", **{**PRESETS[name], **overrides})
        shape = {k: v for k, v in PRESETS[name].items() if k not in ("attn_layer_period", "attn_layer_offset")}
        return cls.with_layout(layout, **{**shape, **overrides})

    @classmethod
    def with_layout(cls, layout, **fields):
        """A config whose layers follow `layout`, the other fields as given (see layout_fields).

        "jamba" keeps the attn_layer_period/offset given (by default the paper's, 8 and 4); any other layout sets
        them itself, so giving them too is an error. A per-layer list also sets num_hidden_layers when not given.
        """
        if layout == "jamba":
            return cls(**fields)
        if given := sorted(fields.keys() & {"attn_layer_period", "attn_layer_offset"}):
            raise ValueError(f"layout {layout!r} sets {' and '.join(given)} itself: give one or the other")
        if not isinstance(layout, str) and "num_hidden_layers" not in fields:
            fields["num_hidden_layers"] = len(layout)
        return cls(**fields, **layout_fields(layout, fields.get("num_hidden_layers", cls.num_hidden_layers)))

    def to_hf(self):
        """The config.json dict of HF JambaForCausalLM (our extra fields included; transformers ignores them)."""
        fields_ = {k: v for k, v in asdict(self).items() if k != "scan_impl"}
        return {"architectures": ["JambaForCausalLM"], "model_type": "jamba", "hidden_act": "silu", **fields_}

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


# Named layouts: which layers are attention, the rest being Mamba. HF's JambaConfig stores a layout as two fields
# only (attention iff i % attn_layer_period == attn_layer_offset), so every layout is written in those terms.
LAYOUTS = ("all-mamba", "jamba", "all-attention")


def _layer_types(num_hidden_layers, attn_layer_period, attn_layer_offset):
    return tuple(
        "attention" if i % attn_layer_period == attn_layer_offset else "mamba" for i in range(num_hidden_layers)
    )


def layout_fields(layout, num_hidden_layers):
    """{"attn_layer_period", "attn_layer_offset"} of a layout of num_hidden_layers layers.

    layout: "all-mamba" (no attention layer), "jamba" (the paper's: one attention layer in 8, at offset 4),
    "all-attention" (every layer), or HF's per-layer list of "mamba" / "attention" (its layers_block_type), which
    must be periodic as the two fields can say: attention exactly at the layers i with i % period == offset.
    A list that is not gets a ValueError; one that is comes back from JambaConfig.layer_types unchanged.
    """
    n = positive_int("num_hidden_layers", num_hidden_layers)
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS} or a list of 'mamba'/'attention', got {layout!r}")
        period, offset = {"all-mamba": (n + 1, n), "jamba": (8, 4), "all-attention": (1, 0)}[layout]
        return {"attn_layer_period": period, "attn_layer_offset": offset}  # all-mamba: period n + 1 reaches no i < n
    kinds = tuple(layout)
    if unknown := sorted(set(kinds) - {"mamba", "attention"}):
        raise ValueError(f"a per-layer layout holds 'mamba' and 'attention' only, got {unknown}")
    if len(kinds) != n:
        raise ValueError(f"the layout lists {len(kinds)} layers, num_hidden_layers is {n}")
    if "attention" not in kinds:
        return layout_fields("all-mamba", n)
    offset = kinds.index("attention")
    for period in range(offset + 1, n + 1):  # the shortest period that fits; period n fits one attention layer
        if _layer_types(n, period, offset) == kinds:
            return {"attn_layer_period": period, "attn_layer_offset": offset}
    raise ValueError(
        f"layout {list(kinds)} is not periodic: HF's JambaConfig stores only attn_layer_period and "
        "attn_layer_offset (attention exactly where i % period == offset), which cannot express it"
    )


# Named model shapes, as JambaConfig keyword arguments (so "auto" fields resolve after any override). train.py's
# presets name the first four.
PRESETS = {
    # Two Jamba blocks' worth of layout in 4 layers: [mamba, mamba+MoE, attention, mamba+MoE]; for tests.
    "tiny": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, num_experts=4, mamba_d_state=8,
    ),
    # TinyStories on a 2-core CPU (`make train`): 1 attention layer in 4, MoE every other layer.
    "small-cpu": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, num_experts=4, mamba_d_state=16,
    ),
    # The Transformer baselines of train.py at those two sizes: every layer attention, dense MLPs (one expert), rotary
    # positions (a Transformer without Mamba layers has nothing else to tell it the order).
    "tiny-transformer": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=1, attn_layer_offset=0, num_experts=1, num_experts_per_tok=1,
        rope=True,
    ),
    "small-cpu-transformer": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, attn_layer_period=1, attn_layer_offset=0, num_experts=1, num_experts_per_tok=1,
        rope=True,
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

    def forward(self, h, state=None, attention_mask=None):
        """h (batch, L, hidden), the mixer's state or None -> (h, state after the last token, routing or None).

        attention_mask: (batch, T + L) bool over the cached and new positions, False at pads; None: no padding.
        """
        out, state = self.mixer(self.input_layernorm(h), state, attention_mask)
        h, routing = self._mlp(h + out)
        return h, state, routing

    def step(self, h_t, state, attention_mask=None):
        """One token: h_t (batch, hidden) -> (h_t, state). attention_mask (batch, T + 1): only attention reads it."""
        x = self.input_layernorm(h_t)
        if self.kind == "attention":
            out, state = self.self_attn.step(x, state, attention_mask)
        else:  # a stepped token is real, and pads left no trace in the Mamba state: nothing to mask
            out, state = self.mamba.step(x, state)
        h, _ = self._mlp((h_t + out)[:, None])  # (batch, 1, hidden): the MLP reads tokens, one here
        return h[:, 0], state


class JambaLM(CausalLM):
    """Embedding -> JambaLayers -> RMSNorm -> LM head; forward / step / generate / checkpoints from CausalLM (lm.py)."""

    config_class = JambaConfig
    HF_NAMES = HF_NAMES
    HF_EMBEDDING = "model.embed_tokens.weight"

    def __init__(self, config, device=None, dtype=None):
        layers = (JambaLayer(config, i, device=device, dtype=dtype) for i in range(config.num_hidden_layers))
        super().__init__(
            config,
            layers,
            config.hidden_size,
            config.vocab_size,
            config.rms_norm_eps,
            config.tie_word_embeddings,
            device,
            dtype,
        )

    @property
    def aux_loss_coef(self):
        return self.config.router_aux_loss_coef

    @torch.no_grad()
    def _init_weights(self):
        std = self.config.initializer_range
        super()._init_weights(embedding_std=std)
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

    def save_pretrained(self, directory):
        on = {name: getattr(self.config, name) for name, off in NOT_IN_HF.items() if getattr(self.config, name) != off}
        if on:
            warnings.warn(
                f"{on} have no HF Jamba counterpart: transformers would load this checkpoint without them", stacklevel=2
            )
        return super().save_pretrained(directory)
