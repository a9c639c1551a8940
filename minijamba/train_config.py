"""What a training run is asked to do: `TrainConfig`, its presets, and the model config it names.

A module of its own so that reading a run back (sample.py's `load_run`, which returns the run's TrainConfig from its
train_config.json) needs no part of the training loop; train.py imports it too.

    MODELS        the model families train.py trains: jamba, mamba, and a transformer baseline
    PRESETS       {preset: {"train": TrainConfig fields, model: {"lr", "shape"}}}: shapes by name (models.PRESETS)
    TrainConfig   every setting of a run, one dataclass; each field is a --flag of `python -m minijamba.train`;
                  TrainConfig.from_json reads a run's train_config.json back
    model_config  the JambaConfig or MambaConfig a TrainConfig builds
    resolve_device  the torch device a --device names, checked to exist on this machine
"""

import json
import math
import types
from dataclasses import dataclass, fields
from numbers import Integral, Real
from pathlib import Path

import torch

from . import models
from .checks import positive_int
from .generation import check_seed
from .scan import FUSED_IMPLS

__all__ = ["MODELS", "SCAN_IMPLS", "PRESETS", "DEVICE_TYPES", "MAX_LR", "TrainConfig", "model_config", "resolve_device"]

# Each model and the family of its shape: the transformer baseline is a JambaLM whose every layer is attention
# (the same code path, no Mamba).
MODELS = {"jamba": "jamba", "mamba": "mamba", "transformer": "jamba"}
SCAN_IMPLS = ("auto", "sequential", "chunked", *FUSED_IMPLS)  # "parallel" is O(L log L) memory: not for training

# Each preset: training settings shared by the models, then per model a shape (a name in models.PRESETS) and its own
# learning rate, the best of short calibration runs (the README's TinyStories section), since the families differ.
# cpu20 is `make train`: 20 minutes of 2 CPU cores, 17 of them training by the clock, the rest the tokenizer, the
# final evaluation and the stories. tiny is for tests and lesson 08's live run.
PRESETS = {
    "cpu20": {
        "train": dict(vocab_size=2048, context=256, batch_size=32, max_steps=4000, max_minutes=17.0, warmup_steps=100,
                      eval_every=100, eval_windows=64),
        "jamba": dict(lr=6e-3, shape="small-cpu"),
        "mamba": dict(lr=3e-3, shape="small-cpu"),
        "transformer": dict(lr=3e-3, shape="small-cpu-transformer"),
    },
    "tiny": {
        "train": dict(vocab_size=300, context=32, batch_size=8, max_steps=20, warmup_steps=2, eval_every=10,
                      eval_windows=8, final_eval_windows=16, sample_tokens=24, max_stories=300),
        "jamba": dict(lr=3e-3, shape="tiny"),
        "mamba": dict(lr=3e-3, shape="tiny"),
        "transformer": dict(lr=3e-3, shape="tiny-transformer"),
    },
}  # fmt: skip

DEVICE_TYPES = ("cpu", "cuda", "mps")  # where train and sample run: torch.device types, besides "auto"
# AdamW moves every weight by about lr per step, and these weights are of order 0.02 to 1, so no lr above 1 trains;
# up to MAX_LR is accepted so that a divergence can still be provoked on purpose (`--lr 20`) and stop cleanly. Far
# above it torch's own arithmetic overflows: --lr 3e38 makes AdamW's step size lr / (1 - beta1) pass float32's range,
# a RuntimeError inside torch.
MAX_LR = 100.0


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "None"}


def _type_error(name, kind, value):
    """The message for a field whose value is not of its annotated type (a bool is no int), or None when it is."""
    options = kind.__args__ if isinstance(kind, types.UnionType) else (kind,)
    fits = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, Integral) and not isinstance(v, bool),
        float: lambda v: isinstance(v, Real) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        type(None): lambda v: v is None,
    }
    if any(fits[option](value) for option in options):
        return None
    return f"{name} must be {' or '.join(_KINDS[option] for option in options)}, got {value!r}"


@dataclass
class TrainConfig:
    model: str = "jamba"  # jamba | mamba | transformer
    preset: str = "cpu20"  # the model's shape and lr, and the fields below that the preset sets (PRESETS)
    data: str = "bundled"  # bundled (shipped, offline) | full (downloaded with `make data-full`)
    data_dir: str | None = None  # where --data full looks (default: download.DEFAULT_DIR)
    max_stories: int | None = None  # only the first max_stories stories of each split (tests, quick looks)
    out_dir: str = "runs/jamba"
    resume: bool = False  # continue from <out_dir>/latest
    overwrite: bool = False  # replace the run already in out_dir (a new run refuses to, otherwise)
    vocab_size: int = 2048  # the BPE tokenizer's, trained on the training text at the start of a run
    context: int = 256
    batch_size: int = 32  # global: split across processes under torchrun
    max_steps: int = 4000  # the cosine schedule's length
    max_minutes: float | None = None  # a wall-clock budget: the schedule ends at whichever comes first
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only: A_log, D, norms and biases never decay
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # steps between evaluations and checkpoints
    eval_windows: int = 64  # validation windows of `context` tokens, the same ones every time
    final_eval_windows: int = 512  # a larger sample for the number a run reports, once at the end (the first ones)
    log_every: int = 10  # steps between training-loss rows in log.jsonl
    seed: int = 0
    scan_impl: str = "auto"  # the Mamba layers' scan (scan.py): auto = the fused kernel when it builds, else chunked
    device: str = "auto"  # auto: cuda if available
    compile: bool = False  # torch.compile the model
    threads: int | None = None  # torch CPU threads (None: torch's default)
    sample_tokens: int = 200  # stories printed at the end: this many new tokens each
    n_samples: int = 3

    def __post_init__(self):
        for f in fields(self):
            error = _type_error(f.name, f.type, getattr(self, f.name))
            if error:
                raise ValueError(error)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {tuple(MODELS)}, got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {SCAN_IMPLS}, got {self.scan_impl!r}")
        if self.data not in ("bundled", "full"):
            raise ValueError(f"data must be 'bundled' or 'full', got {self.data!r}")
        positive = (
            "vocab_size context batch_size max_steps eval_every eval_windows final_eval_windows log_every n_samples"
        )
        for name in positive.split():
            positive_int(name, getattr(self, name))
        for name in ("max_stories", "threads"):
            positive_int(name, getattr(self, name), none_ok=True)
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"lr must be in (0, {MAX_LR:g}] (MAX_LR: no AdamW run learns above 1), got {self.lr!r}")
        if not 0 < self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be a positive finite number, got {self.grad_clip!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes!r}")
        check_seed("seed", self.seed)
        if self.device != "auto":
            _device(self.device)

    @classmethod
    def from_preset(cls, model="jamba", preset="cpu20", **overrides):
        """The preset's settings for `model`, then `overrides` (any field)."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        if model not in MODELS:
            raise ValueError(f"model must be one of {tuple(MODELS)}, got {model!r}")
        values = {**PRESETS[preset]["train"], "lr": PRESETS[preset][model]["lr"], **overrides}
        return cls(model=model, preset=preset, **values)

    @classmethod
    def from_json(cls, path):
        """The TrainConfig a run saved (its train_config.json). A missing, damaged or foreign file is a one-line
        error naming it: FileNotFoundError when it is absent, ValueError otherwise. Keys it lacks take their
        defaults (files written before a field existed); keys this TrainConfig lacks are refused."""
        path = Path(path)
        if not path.is_file():  # a FIFO or a folder there would hang or fail inside read_text
            if path.exists():
                raise ValueError(f"{path} is not a regular file: the checkpoint is damaged; use another one")
            raise FileNotFoundError(f"no {path.name} in {str(path.parent)!r}: is it a checkpoint folder of train.py?")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not readable JSON ({e}): the checkpoint is damaged; use another one") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of TrainConfig fields, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{path}: unknown setting(s) {', '.join(unknown)}: not a train_config.json of this version of "
                "minijamba; remove them or use the version that wrote it"
            )
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _device(name):
    """torch.device(name), a ValueError naming the flag when torch cannot parse it or train cannot use its type."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's parse error lists every backend it was built with
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:<index> or mps, got {name!r}")
    return device


def resolve_device(name):
    """The device (a str torch takes) that --device `name` means here ("auto": cuda when torch sees a GPU, else
    cpu); a device this machine lacks is a ValueError saying so. Checked here, not in TrainConfig, since a run saved
    with --device cuda must still load where there is no GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = _device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: torch sees {count} GPU(s) here, cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: torch sees no MPS device on this machine; use --device cpu (or auto)")
    return str(device)


def model_config(cfg):
    """The model's config for a TrainConfig: its preset's shape at the tokenizer's vocabulary size, scanning with
    cfg.scan_impl."""
    shape = PRESETS[cfg.preset][cfg.model]["shape"]
    return models.preset(MODELS[cfg.model], shape, vocab_size=cfg.vocab_size, scan_impl=cfg.scan_impl)
