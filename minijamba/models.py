"""Every model family behind one door: build or load either LM from its config or checkpoint, and size either one
from its config alone, without building it (any size, even 52B).

    MODEL_CLASSES          {"mamba": MambaLM, "jamba": JambaLM}: config.json's model_type -> the class
    PRESETS, preset        named model shapes of either family (train.py's presets name them)
    build_model            the LM of a MambaConfig or a JambaConfig
    load_pretrained        a checkpoint folder (or Hub id) of either family, the class chosen from its config.json
    count_parameters       total and active-per-token parameters (MoE layers use num_experts_per_tok experts)
    parameters_by_part     where they live (embedding, attention, mamba, experts, ...): what quantization needs
    cache_bytes            what the inference cache holds after T tokens
    longest_context        the longest T whose cache fits in given memory
"""

import math
from typing import NamedTuple

import torch

from .checkpoint import CheckpointError, load_config, resolve_checkpoint_dir
from .jamba import PRESETS as JAMBA_PRESETS
from .jamba import JambaLM
from .mamba import MambaLM

__all__ = [
    "MODEL_CLASSES",
    "model_class",
    "PRESETS",
    "preset",
    "build_model",
    "load_pretrained",
    "ParameterCount",
    "count_parameters",
    "PARTS",
    "parameters_by_part",
    "cache_bytes",
    "longest_context",
]

MODEL_CLASSES = {"mamba": MambaLM, "jamba": JambaLM}

# Named model shapes, {family: {name: config fields}}, each shape written once: the Jamba family's (the Transformer
# baselines included: JambaConfigs whose every layer is attention) are jamba.PRESETS, which JambaConfig.preset reads;
# the MambaLM shapes of train.py's baselines are here.
PRESETS = {
    "jamba": JAMBA_PRESETS,
    "mamba": {
        "tiny": dict(d_model=32, n_layer=2, d_state=8),
        "small-cpu": dict(d_model=128, n_layer=8, d_state=16),
    },
}


def model_class(config):
    """The LM class of a config object (MambaConfig -> MambaLM, JambaConfig -> JambaLM)."""
    for cls in MODEL_CLASSES.values():
        if type(config) is cls.config_class:
            return cls
    names = [cls.config_class.__name__ for cls in MODEL_CLASSES.values()]
    raise ValueError(f"config must be one of {names}, got {type(config).__name__}")


def preset(family, name, **overrides):
    """The config (MambaConfig or JambaConfig) of the shape PRESETS[family][name], with any field overridden."""
    if family not in PRESETS:
        raise ValueError(f"family must be one of {sorted(PRESETS)}, got {family!r}")
    if name not in PRESETS[family]:
        raise ValueError(f"unknown {family} preset {name!r}; choose one of {sorted(PRESETS[family])}")
    return MODEL_CLASSES[family].config_class(**{**PRESETS[family][name], **overrides})


def build_model(config, device=None, dtype=None):
    """A fresh LM for `config` (a MambaConfig or a JambaConfig)."""
    return model_class(config)(config, device=device, dtype=dtype)


def load_pretrained(path_or_repo_id, device=None, dtype=None, **overrides):
    """The LM of a checkpoint folder or Hub repo id, MambaLM or JambaLM as its config.json says (model_type)."""
    directory = resolve_checkpoint_dir(path_or_repo_id)
    model_type = load_config(directory).get("model_type", "mamba")  # mamba_ssm's own config.json has none
    if model_type not in MODEL_CLASSES:
        raise CheckpointError(f"{directory}: config.json model_type {model_type!r} is not one of {list(MODEL_CLASSES)}")
    return MODEL_CLASSES[model_type].from_pretrained(directory, device=device, dtype=dtype, **overrides)


class ParameterCount(NamedTuple):
    total: int  # every parameter (a tied head counted once)
    active: int  # those one token uses: each MoE layer counts only num_experts_per_tok of its experts


def count_parameters(config):
    """Total and active-per-token parameters of the config's LM, counted on the meta device (no memory, any size)."""
    model = build_model(config, device="meta")
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for layer in model.layers:
        if layer.is_moe:
            per_expert = sum(p.numel() for p in layer.feed_forward.experts[0].parameters())
            idle += (config.num_experts - config.num_experts_per_tok) * per_expert
    return ParameterCount(total, total - idle)


# Where an LM's parameters live, as (the part, a test on the parameter's name), first match wins.
_PART_OF = (
    ("embedding", lambda name: name.startswith("embed_tokens.")),
    ("lm_head", lambda name: name.startswith("lm_head.")),
    ("attention", lambda name: ".self_attn." in name),
    # the whole Mamba mixer (JambaLM: `mamba`, MambaLM: `mixer`): projections, conv, A_log, D and its inner norms
    ("mamba", lambda name: ".mamba." in name or ".mixer." in name),
    ("routers", lambda name: ".feed_forward.router." in name),
    ("experts", lambda name: ".feed_forward.experts." in name),
    ("mlp", lambda name: ".feed_forward." in name),  # a dense layer's SwiGLU
    ("norms", lambda name: True),  # the layers' norms and final_layernorm
)
PARTS = tuple(part for part, _ in _PART_OF)


def parameters_by_part(config):
    """{part: parameters} over PARTS for the config's LM, counted on the meta device; a tied LM head counts 0.

    The parts sum to count_parameters(config).total. They are what a quantization scheme needs: e.g. the Jamba
    card's 8-bit loading keeps the Mamba mixers (the "mamba" part) in 16 bits.
    """
    counts = dict.fromkeys(PARTS, 0)
    for name, p in build_model(config, device="meta").named_parameters():
        counts[next(part for part, matches in _PART_OF if matches(name))] += p.numel()
    return counts


def cache_bytes(config, batch, context, dtype=torch.float32):
    """Bytes an LMCache holds after `context` tokens (what new_cache + forward leave in LMCache.nbytes).

    attention layer: 2 (k and v) · batch · kv_heads · head_dim · context;  Mamba layer: batch · d_inner · (d_conv + N).
    """
    model_class(config)  # a clear error for anything but an LM config
    item = torch.empty((), dtype=dtype).element_size()
    mamba = config.mamba_config()
    per_layer = {"mamba": batch * mamba.d_inner * (mamba.d_conv + mamba.d_state)}
    if "attention" in config.layer_types:
        per_layer["attention"] = 2 * batch * config.num_key_value_heads * config.head_dim * context
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
