"""The Mamba block and a Mamba language model, with an O(1)-per-token inference cache and two checkpoint layouts.

Gu & Dao 2023, §3.4 "A Simplified SSM Architecture" and Figure 3. One block (MambaMixer) reads the residual
stream hidden (batch, L, d_model):
    u, z = in_proj(hidden)                two branches of width d_inner = expand · d_model
    u = SiLU(causal depthwise conv1d(u))  each channel mixes its last d_conv inputs: the only local mixing
    y = SSM(u) + D·u                      the selective SSM of s6.py (Δ, B, C read from u), D the skip
    out = out_proj(y · SiLU(z))           the gate z plays the role of a gated MLP's second branch
and the model is the usual pre-norm residual stack: hidden = hidden + mixer(RMSNorm(hidden)), a final RMSNorm, and
an LM head tied to the embedding. With `inner_norms`, RMSNorms on Δ's rank-R input, B and C (Jamba paper §6.4)
follow x_proj.

Inference (the recurrent mode; the model's `LMCache` holds one state per block, lm.py): everything a block needs
from the past is
    conv_state (batch, d_inner, d_conv)   the last d_conv conv inputs, newest last
    ssm_state  (batch, d_inner, N)        the SSM's state x
so `forward(ids, cache)` runs a whole prompt in parallel and leaves the cache at its end (a second call continues
from it: chunked prefill), and `step(token, cache)` advances one token in O(1) time and memory at any context length.
There is no KV cache, which is why Mamba §4.5 measures a higher inference throughput than a Transformer's.

Glossary (code name — symbol; the README's Notation table, where the Mamba paper writes other letters in brackets):
    d_model      — the width of the residual stream (paper: D);  d_inner — expand · d_model (paper: E·D)
    d_state      — N, the SSM state size;  dt_rank — R, the rank of Δ's projection;  expand — E
    d_conv       — the conv1d kernel width (4)
    hidden       — the residual stream (batch, L, d_model)
    u, z         — the two outputs of in_proj: the SSM's input branch (paper: x) and the gate branch of Figure 3
    conv_state   — the conv's input window;  ssm_state — x, the SSM's state (paper: h), (batch, d_inner, N)
    A_log, D     — log(-A) and the skip D, in `mixer.ssm` (see s6.py)

Where this differs from the official `mamba_simple.py` / `mixer_seq_simple.py` and HF `MambaMixer`, and why:
  - The conv has no padding: its left context is the conv_state window (zeros for a fresh sequence, which is the
    official padding of d_conv − 1 zeros), so forward and step share the conv, and a forward continues a cache.
    It is written out as d_conv multiply-adds (`depthwise_causal_conv`) rather than calling torch's conv1d.
  - Fast path: where the scan runs on the CPU twin (scan_impl "cpu", or "auto" on the CPU where it builds), the conv
    and its SiLU run in one C++ pass (`fused.fused_causal_conv_silu`, cuda/causal_conv_cpu.cpp) that reads u
    channels-last straight from in_proj's output, as the official fast path fuses them (causal_conv1d with its
    SiLU); elsewhere the torch lines below run. tests/test_mamba.py checks both equal in float64, with gradients.
    Both pass the gate z into the scan (the official kernel takes it too): y · silu(z) costs no pass of its own.
  - The official forward with a cache only takes one token after the prompt; ours takes any number (chunked prefill).
  - The vocabulary is not padded: vocab_size is the embedding's row count. An official checkpoint's vocab_size
    (50277) with pad_vocab_size_multiple (8) loads as vocab_size 50280, the padded size its embedding and head hold
    and HF's `-hf` configs store; the padding rows get logits like any other id, as in the official model.
  - Checkpoints: `from_pretrained` reads HF's layout (config.json with model_type "mamba", `backbone.embeddings.*`,
    HF_NAMES) or the official mamba_ssm one (config.json with d_model / ssm_cfg, `backbone.embedding.*`,
    MAMBA_SSM_NAMES, a tied head stored anyway), says which in `model.checkpoint_layout`, and refuses what MambaLM
    lacks (Mamba-2 or attention layers, MLPs, LayerNorm); `save_pretrained(dir, layout=...)` writes either.
  - No fused add+norm: hidden + mixer(norm(hidden)) computed plainly (the same numbers).
  - attention_mask (left padding): pads change no state. u is zeroed at the pads before the conv and again after
    it, so the scan's input there is 0 (Δ·B·u = 0): a left-padded row's states are still zero at its first token,
    as an unpadded row's are. HF 5.x's MambaMixer zeroes the pads of in_proj's input rather than of u: the same
    unless in_proj has a bias (bias=True), which HF then leaves in its pads' conv inputs.
  - residual_in_fp32 promotes the residual stream to at least float32 (HF casts to float32, which would round a
    float64 model); RMSNorm likewise computes in at least float32.
  - Init follows the official `_init_weights` (embedding N(0, 0.02), Linear biases zero except dt_proj's, out_proj
    divided by sqrt(n_layer), default conv1d init); HF instead zeroes the conv bias and uses initializer_range 0.1.
  - Config fields keep the official names (d_model, n_layer, ...); HF_CONFIG_NAMES maps them to config.json's.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, Layout
from .checks import positive_int, positive_real
from .lm import CausalLM
from .norm import RMSNorm
from .s6 import SelectiveSSM, auto_dt_rank
from .scan import resolve_impl

__all__ = [
    "MambaConfig",
    "depthwise_causal_conv",
    "MambaMixer",
    "MambaBlock",
    "MambaLM",
]

# MambaConfig field -> HF transformers MambaConfig field (config.json). inner_norms has no HF Mamba counterpart.
# rescale_prenorm_residual is left out on purpose: it only shapes a fresh init, and transformers 5.x applies it to
# loaded weights as well (it divides the checkpoint's out_proj by sqrt(n_layer) when config.json says true).
HF_CONFIG_NAMES = {
    "d_model": "hidden_size",
    "n_layer": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "dt_rank": "time_step_rank",
    "dt_min": "time_step_min",
    "dt_max": "time_step_max",
    "dt_init_floor": "time_step_floor",
    "conv_bias": "use_conv_bias",
    "bias": "use_bias",
    "norm_eps": "layer_norm_epsilon",
    "residual_in_fp32": "residual_in_fp32",
    "tie_embeddings": "tie_word_embeddings",
    "inner_norms": "inner_norms",
}

# Our parameter names -> HF MambaForCausalLM's, as (our prefix, HF prefix), first match wins; both from_pretrained
# and save_pretrained use it. HF nests the model in `backbone.`, says `embeddings`, and keeps the SSM's parameters
# (x_proj, dt_proj, A_log, D) directly in the mixer, where we group them in `mixer.ssm`. The inner norms take HF
# Jamba's names. A tied lm_head is not stored (HF does not store it either).
HF_NAMES = (
    ("embed_tokens.", "backbone.embeddings."),
    ("layers.{i}.mixer.ssm.dt_norm.", "backbone.layers.{i}.mixer.dt_layernorm."),
    ("layers.{i}.mixer.ssm.B_norm.", "backbone.layers.{i}.mixer.b_layernorm."),
    ("layers.{i}.mixer.ssm.C_norm.", "backbone.layers.{i}.mixer.c_layernorm."),
    ("layers.{i}.mixer.ssm.", "backbone.layers.{i}.mixer."),
    ("layers.{i}.", "backbone.layers.{i}."),
    ("final_layernorm.", "backbone.norm_f."),
    ("lm_head.", "lm_head."),
)

# Our parameter names -> the official mamba_ssm MambaLMHeadModel's (mixer_seq_simple.py): HF's but for `embedding`.
# Its state_dict holds lm_head.weight even when tied (the same tensor as the embedding), so a checkpoint does too.
# Jamba's inner norms have no official counterpart (to_mamba_ssm refuses them).
MAMBA_SSM_NAMES = (
    ("embed_tokens.", "backbone.embedding."),
    ("layers.{i}.mixer.ssm.", "backbone.layers.{i}.mixer."),
    ("layers.{i}.", "backbone.layers.{i}."),
    ("final_layernorm.", "backbone.norm_f."),
    ("lm_head.", "lm_head."),
)

# The official config.json (config_mamba.py's MambaConfig): its fields and defaults, besides the three it needs.
MAMBA_SSM_DEFAULTS = {
    "d_intermediate": 0,  # > 0: a gated MLP after each mixer
    "ssm_cfg": {},  # the Mamba mixer's arguments, MAMBA_SSM_CFG_DEFAULTS
    "attn_layer_idx": [],  # layers that are attention instead of Mamba
    "attn_cfg": {},  # their arguments
    "rms_norm": True,  # false: LayerNorm
    "residual_in_fp32": True,
    "fused_add_norm": True,  # the Triton kernel that fuses the residual add and the norm: the same arithmetic
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
    "norm_epsilon": 1e-5,  # not in the config class: older MambaLMHeadModels passed it through to the backbone
}
MAMBA_SSM_REQUIRED = ("d_model", "n_layer", "vocab_size")
# mamba_simple.py's Mamba(...) arguments that shape the weights or the arithmetic, with its defaults (our field names).
MAMBA_SSM_CFG_DEFAULTS = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",  # ceil(d_model / 16)
    "dt_min": 1e-3,
    "dt_max": 1e-1,
    "dt_init_floor": 1e-4,
    "conv_bias": True,
    "bias": False,
}
# ssm_cfg keys that only shape a fresh init or pick a kernel, so loading ignores them; "layer" is checked.
MAMBA_SSM_CFG_IGNORED = ("layer", "dt_init", "dt_scale", "use_fast_path")


@dataclass
class MambaConfig:
    """A Mamba LM's shape and init, with the official mamba_ssm names; HF_CONFIG_NAMES gives config.json's."""

    d_model: int = 64
    n_layer: int = 2
    vocab_size: int = 256
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto": s6.auto_dt_rank(d_model) = ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in_proj and out_proj
    inner_norms: bool = False  # Jamba's RMSNorms on Δ, B, C
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    rescale_prenorm_residual: bool = True  # init: out_proj / sqrt(n_layer)
    scan_impl: str = "chunked"  # the S6 layers' scan (scan.py); not stored in checkpoints: a choice of this machine

    def __post_init__(self):
        if self.dt_rank == "auto":
            self.dt_rank = auto_dt_rank(self.d_model)
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank"):
            positive_int(name, getattr(self, name))
        for name in ("norm_eps", "dt_min", "dt_max", "dt_init_floor"):
            positive_real(name, getattr(self, name), finite=True)
        if self.dt_max < self.dt_min:
            raise ValueError(f"dt_max must be >= dt_min={self.dt_min!r}, got {self.dt_max!r}")

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def layer_types(self):
        """ "mamba" for each layer: the same question JambaConfig.layer_types answers."""
        return ("mamba",) * self.n_layer

    def mamba_config(self):
        """The MambaConfig of this model's Mamba layers: itself (JambaConfig.mamba_config builds one)."""
        return self

    def to_hf(self):
        """The config.json dict of HF MambaForCausalLM."""
        mapped = {hf: getattr(self, ours) for ours, hf in HF_CONFIG_NAMES.items()}
        extra = {"intermediate_size": self.d_inner, "hidden_act": "silu"}
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **extra, **mapped}

    @classmethod
    def from_hf(cls, hf):
        """From a HF Mamba config.json dict; fields it lacks take HF's defaults (the same as ours)."""
        for key, expected in (("model_type", "mamba"), ("hidden_act", "silu")):
            if hf.get(key, expected) != expected:
                raise CheckpointError(f"config.json: {key} is {hf[key]!r}; this loader reads {expected!r} only")
        config = cls(**{ours: hf[name] for ours, name in HF_CONFIG_NAMES.items() if name in hf})
        if hf.get("intermediate_size", config.d_inner) != config.d_inner:
            raise CheckpointError(f"config.json: intermediate_size {hf['intermediate_size']} != expand · hidden_size")
        return config

    @staticmethod
    def is_mamba_ssm(config_json):
        """Whether a config.json dict is the official mamba_ssm one: d_model / ssm_cfg and no HF model_type."""
        return "model_type" not in config_json and ("d_model" in config_json or "ssm_cfg" in config_json)

    def to_mamba_ssm(self):
        """The config.json dict of the official mamba_ssm MambaLMHeadModel (every field of its MambaConfig).

        vocab_size is written as it is, with pad_vocab_size_multiple 1: it already counts the embedding's rows.
        Raises ValueError for what the official model cannot express: inner_norms, norm_eps other than 1e-5.
        """
        if self.inner_norms or self.norm_eps != MAMBA_SSM_DEFAULTS["norm_epsilon"]:
            raise ValueError(
                f"the mamba_ssm layout has no inner norms and norm eps 1e-5 only; this config has inner_norms="
                f"{self.inner_norms}, norm_eps={self.norm_eps}: save it in the 'hf' layout"
            )
        return {
            **{name: getattr(self, name) for name in MAMBA_SSM_REQUIRED},
            "ssm_cfg": {name: getattr(self, name) for name in MAMBA_SSM_CFG_DEFAULTS},
            **{k: v for k, v in MAMBA_SSM_DEFAULTS.items() if k not in ("ssm_cfg", "norm_epsilon")},
            "residual_in_fp32": self.residual_in_fp32,
            "pad_vocab_size_multiple": 1,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_mamba_ssm(cls, config_json):
        """From an official mamba_ssm config.json dict (state-spaces/mamba-130m and friends); absent fields take
        mamba_ssm's defaults (MAMBA_SSM_DEFAULTS, MAMBA_SSM_CFG_DEFAULTS).

        vocab_size becomes the padded size: rounded up to a multiple of pad_vocab_size_multiple, as MambaLMHeadModel
        pads its embedding and head (50277 -> 50280). Refuses, with a CheckpointError, unknown keys and what MambaLM
        has no counterpart for: Mamba-2 layers, attention layers, MLPs (d_intermediate > 0), LayerNorm.
        """
        missing = [k for k in MAMBA_SSM_REQUIRED if k not in config_json]
        unknown = sorted(config_json.keys() - {*MAMBA_SSM_REQUIRED, *MAMBA_SSM_DEFAULTS})
        if missing or unknown:
            raise CheckpointError(f"config.json (mamba_ssm layout): missing keys {missing}, unknown keys {unknown}")
        c = {**MAMBA_SSM_DEFAULTS, **config_json}
        ssm_cfg = c["ssm_cfg"]
        if not isinstance(ssm_cfg, dict):
            raise CheckpointError(f"config.json (mamba_ssm layout): ssm_cfg must be an object, got {ssm_cfg!r}")
        unknown = sorted(ssm_cfg.keys() - {*MAMBA_SSM_CFG_DEFAULTS, *MAMBA_SSM_CFG_IGNORED})
        layer = ssm_cfg.get("layer", "Mamba1")
        refusals = (
            (unknown, f"unknown ssm_cfg keys {unknown}"),
            (layer != "Mamba1", f"ssm_cfg.layer {layer!r} (MambaLM's layers are Mamba-1)"),
            (c["attn_layer_idx"], f"attention layers (attn_layer_idx {c['attn_layer_idx']})"),
            (c["d_intermediate"] != 0, f"a gated MLP in every block (d_intermediate {c['d_intermediate']})"),
            (not c["rms_norm"], "LayerNorms (rms_norm false; MambaLM's norms are RMSNorms)"),
        )
        refused = [reason for applies, reason in refusals if applies]
        if refused:
            raise CheckpointError("config.json (mamba_ssm layout): MambaLM cannot load " + "; ".join(refused))
        s = {**MAMBA_SSM_CFG_DEFAULTS, **{k: v for k, v in ssm_cfg.items() if k in MAMBA_SSM_CFG_DEFAULTS}}
        multiple = positive_int("pad_vocab_size_multiple", c["pad_vocab_size_multiple"])
        vocab_size = -(-positive_int("vocab_size", c["vocab_size"]) // multiple) * multiple  # round up
        return cls(
            d_model=c["d_model"],
            n_layer=c["n_layer"],
            vocab_size=vocab_size,
            norm_eps=c["norm_epsilon"],
            residual_in_fp32=c["residual_in_fp32"],
            tie_embeddings=c["tie_embeddings"],
            **s,
        )


def depthwise_causal_conv(window, weight, bias=None):
    """Each channel's own kernel over its window, no padding: (batch, d_inner, d_conv - 1 + L) -> (batch, d_inner, L).

    out[t] = Σ_j weight[j] · window[t + j] (+ bias): output t reads the d_conv inputs that end at input t. Written
    as d_conv shifted multiply-adds because torch's CPU conv1d is slow and erratic for depthwise kernels of a decode
    step's size, where it can cost more than the whole rest of the step (README, "Measured").
    """
    d_conv = weight.shape[-1]
    L = window.shape[-1] - d_conv + 1
    out = sum(weight[:, 0, j, None] * window[:, :, j : j + L] for j in range(d_conv))  # (batch, d_inner, L)
    return out if bias is None else out + bias[:, None]


class MambaMixer(nn.Module):
    """The Mamba block of Figure 3: (batch, L, d_model) -> (batch, L, d_model), plus its state after the last token.

    selective=False puts the LTI twin of S6 inside (SelectiveSSM(selective=False)): Table 1's "Mamba + S4" row
    (tasks/model.py). It is an argument, not a config field, because no checkpoint layout has such a block.
    """

    def __init__(self, config, device=None, dtype=None, selective=True):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_inner, self.d_conv = config.d_inner, config.d_conv
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias, **factory)
        # Holds the depthwise kernel (HF's name and shape (d_inner, 1, d_conv), torch's default init); the conv itself
        # is depthwise_causal_conv, with no padding: the left context is the conv_state window.
        self.conv1d = nn.Conv1d(d_inner, d_inner, config.d_conv, groups=d_inner, bias=config.conv_bias, **factory)
        # Jamba's Δ, B, C norms take the model's norm eps, as HF Jamba's take its rms_norm_eps (1e-6 there).
        norm = partial(RMSNorm, eps=config.norm_eps, **factory) if config.inner_norms else None
        self.ssm = SelectiveSSM(
            d_inner,
            config.d_state,
            config.dt_rank,
            config.dt_min,
            config.dt_max,
            config.dt_init_floor,
            selective=selective,
            scan_impl=config.scan_impl,
            inner_norm=norm,
            **factory,
        )
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias, **factory)

    def empty_state(self, batch):
        """The state before the first token, zeros: (conv_state, ssm_state)."""
        w = self.in_proj.weight
        conv_state = w.new_zeros(batch, self.ssm.d_inner, self.d_conv)  # (batch, d_inner, d_conv)
        return conv_state, w.new_zeros(batch, self.ssm.d_inner, self.ssm.d_state)  # (batch, d_inner, N)

    def forward(self, hidden, state=None, attention_mask=None):
        """hidden (batch, L, d_model), state from empty_state / a previous call -> (out, state after the last token).

        attention_mask: (batch, >= L) bool, False at pads, whose last L columns are these tokens (a mask over the
        cached positions too, as CausalLM passes every layer, is read from its end); None: no padding.
        """
        conv_state, ssm_state = self.empty_state(hidden.shape[0]) if state is None else state
        L = hidden.shape[1]
        u, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, L, d_inner) each, views of in_proj's output
        if attention_mask is not None:
            pad = ~attention_mask[:, -L:, None]  # (batch, L, 1)
            u = u.masked_fill(pad, 0.0)  # a pad enters the conv window as the zero a fresh sequence starts from
        prefix = conv_state[:, :, 1:]  # (batch, d_inner, d_conv - 1): the inputs before this call's first
        if self.uses_fused_conv(u):  # the same numbers in one C++ pass (cuda/causal_conv_cpu.cpp)
            from . import fused  # only here: it brings in torch's extension builder

            weight = self.conv1d.weight[:, 0]  # (d_inner, d_conv)
            u_conv = fused.fused_causal_conv_silu(u, weight, self.conv1d.bias, prefix)  # (batch, d_inner, L)
        else:
            window = torch.cat([prefix, u.transpose(1, 2)], dim=-1)  # (batch, d_inner, d_conv - 1 + L)
            u_conv = F.silu(depthwise_causal_conv(window, self.conv1d.weight, self.conv1d.bias))  # (batch, d_inner, L)
        if attention_mask is not None:  # the conv's bias made the pads nonzero: zero them, the scan writes nothing
            u_conv = u_conv.masked_fill(pad.transpose(1, 2), 0.0)
        # The gate y · silu(z) is applied inside the scan, as the official kernel does (one pass fewer over y).
        y, ssm_state = self.ssm(u_conv, z=z.transpose(1, 2), initial_state=ssm_state, return_last_state=True)
        out = self.out_proj(y.transpose(1, 2))  # (batch, L, d_model)
        # The window's last d_conv inputs, a fresh tensor (cat copies): no view keeps the whole sequence alive.
        kept = self.d_conv - min(L, self.d_conv)  # of the cached inputs, those still in the window
        news = u[:, L - (self.d_conv - kept) :].transpose(1, 2)  # (batch, d_inner, d_conv - kept)
        conv_state = torch.cat([prefix[:, :, prefix.shape[-1] - kept :], news], dim=-1)
        return out, (conv_state, ssm_state)  # (batch, d_inner, d_conv), (batch, d_inner, N)

    def uses_fused_conv(self, u):
        """Whether forward runs conv + SiLU on the C++ kernel: where the scan runs on the CPU twin (scan_impl "cpu",
        or "auto" on the CPU when it builds) and u is float32 or float64; otherwise depthwise_causal_conv in torch."""
        if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64):
            return False
        return resolve_impl(self.ssm.scan_impl, u) == "cpu"

    def step(self, hidden_t, state):
        """One token in O(1): hidden_t (batch, d_model), state -> (out (batch, d_model), new state)."""
        conv_state, ssm_state = state
        u, z = self.in_proj(hidden_t).chunk(2, dim=-1)  # (batch, d_inner) each
        conv_state = torch.cat([conv_state[:, :, 1:], u[:, :, None]], dim=-1)  # (batch, d_inner, d_conv): shift in u
        u = F.silu(depthwise_causal_conv(conv_state, self.conv1d.weight, self.conv1d.bias)[:, :, 0])  # (batch, d_inner)
        y, ssm_state = self.ssm.step(u, ssm_state)  # (batch, d_inner)
        return self.out_proj(y * F.silu(z)), (conv_state, ssm_state)


class MambaBlock(nn.Module):
    """Pre-norm residual: hidden + mixer(RMSNorm(hidden)), the residual kept in at least float32 if residual_in_fp32.

    A CausalLM layer (lm.py): forward returns (hidden, state, None), as a Mamba block has no router.
    """

    kind = "mamba"
    is_moe = False

    def __init__(self, config, device=None, dtype=None, selective=True):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)
        self.mixer = MambaMixer(config, device=device, dtype=dtype, selective=selective)

    def _residual(self, hidden):
        return hidden.to(torch.promote_types(hidden.dtype, torch.float32)) if self.residual_in_fp32 else hidden

    def forward(self, hidden, state=None, attention_mask=None):
        out, state = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), state, attention_mask)
        return self._residual(hidden) + out, state, None

    def step(self, hidden_t, state, attention_mask=None):
        """One token. attention_mask is the CausalLM layer interface's: a stepped token is real, and the pads before it
        left the state untouched, so a Mamba step has nothing to mask."""
        out, state = self.mixer.step(self.norm(hidden_t.to(self.norm.weight.dtype)), state)
        return self._residual(hidden_t) + out, state


class MambaLM(CausalLM):
    """Embedding -> n_layer MambaBlocks -> RMSNorm -> LM head (tied to the embedding by default).

    forward / step / prefill / generate and the checkpoints come from CausalLM (lm.py); this class builds the blocks
    and applies the official init.
    """

    config_class = MambaConfig
    HF_NAMES = HF_NAMES
    HF_EMBEDDING = "backbone.embeddings.weight"
    # The official layout: what state-spaces/mamba-130m and friends hold, and what mamba_ssm's save_pretrained
    # writes, pytorch_model.bin (its from_pretrained reads no other weights file).
    OTHER_LAYOUTS = (
        Layout(
            "mamba_ssm",
            MAMBA_SSM_NAMES,
            "backbone.embedding.weight",
            MambaConfig.from_mamba_ssm,
            MambaConfig.to_mamba_ssm,
            weights_file="pytorch_model.bin",
            stores_tied_head=True,
            recognizes=MambaConfig.is_mamba_ssm,
        ),
    )

    def __init__(self, config, device=None, dtype=None):
        layers = (MambaBlock(config, device=device, dtype=dtype) for _ in range(config.n_layer))
        super().__init__(
            config, layers, config.d_model, config.vocab_size, config.norm_eps, config.tie_embeddings, device, dtype
        )

    @torch.no_grad()
    def _init_weights(self):
        """The official `_init_weights` (mixer_seq_simple.py); SelectiveSSM already set Δ, A and D as Mamba does."""
        super()._init_weights(embedding_std=0.02)
        if self.config.rescale_prenorm_residual:  # GPT-2's scheme: n_layer residual branches add up
            for layer in self.layers:
                layer.mixer.out_proj.weight /= math.sqrt(self.config.n_layer)
