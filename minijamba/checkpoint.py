"""Reading and writing Hugging Face-style checkpoints safely: the parts every model family shares.

A Hugging Face checkpoint is a directory with `config.json` and the weights, as `model.safetensors`, as
`pytorch_model.bin`, or sharded with a `*.index.json` naming the shard of every tensor. The model files
(`mamba.py`, later `jamba.py`) own their config fields and their table of parameter names; this file only moves
named tensors between disk and a dict, and checks them:

    resolve_checkpoint_dir   a local directory, or a Hub repo id fetched with huggingface_hub when installed
    load_tensors             every tensor of the directory, by name: safetensors, or torch.load(weights_only=True)
    check_tensors            the key set and shapes against the model's: one error naming every difference
    rename                   our parameter name -> the checkpoint's, from a table of prefix patterns
    save_checkpoint          config.json + model.safetensors, each written to a temp file then os.replace'd
    HFCheckpointMixin        from_pretrained / save_pretrained for a model class, built from the pieces above

Safety: a pickle can run any code while it loads, so `.bin` files are read only with torch's weights_only
unpickler, which accepts tensors and plain containers and refuses everything else; safetensors files hold no code.
"""

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "resolve_checkpoint_dir",
    "load_config",
    "load_tensors",
    "check_tensors",
    "rename",
    "save_checkpoint",
    "HFCheckpointMixin",
]

# In order of preference: safetensors before pickles, a single file before a shard index.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "owner/name" or "name"; never an absolute path


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read safely, or matched to the model; the message says which part."""


def resolve_checkpoint_dir(path_or_repo_id):
    """A local checkpoint directory, or a Hub repo id downloaded (config and weights only) to the local cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file: pass the checkpoint directory that holds config.json")
    name = str(path_or_repo_id)
    if not _REPO_ID.fullmatch(name):
        raise CheckpointError(f"no checkpoint directory {name!r} (and it is not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"no local directory {name!r}, and huggingface_hub is not installed to fetch it from the Hub "
            "(pip install huggingface_hub, or pass a local directory)"
        ) from None
    try:  # safetensors first; the pickled .bin only for repos that have nothing else
        local = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
        if not any((local / f).exists() for f in WEIGHT_FILES):
            local = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin"]))
    except Exception as e:  # offline, no such repo, gated: all mean "not available"
        raise CheckpointError(f"no local directory {name!r}, and fetching it from the Hub failed: {e}") from e
    return local


def load_config(directory):
    """config.json as a dict."""
    path = Path(directory) / "config.json"
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _load_file(path):
    """One weights file -> {name: tensor}, refusing anything that is not plain named tensors."""
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: refused: not a plain tensor checkpoint, so it was not unpickled "
                f"(weights_only=True said: {first_line})"
            ) from e
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} dict, got {type(tensors).__name__}")
    return tensors


def load_tensors(directory):
    """Every tensor of a checkpoint directory, by name. Prefers safetensors; follows a shard index if there is one."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return _load_file(path)
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_load_file(directory / shard))
        return tensors
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def check_tensors(tensors, expected_shapes, source):
    """Raise one CheckpointError naming every missing key, unexpected key and wrong shape, or return None.

    tensors: {name: tensor} read from `source`; expected_shapes: {name: shape} the model needs, in the same names.
    """
    missing = sorted(expected_shapes.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected_shapes.keys())
    wrong = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(expected_shapes[k])}"
        for k in expected_shapes.keys() & tensors.keys()
        if tuple(tensors[k].shape) != tuple(expected_shapes[k])
    )
    if missing or unexpected or wrong:
        parts = [f"{source} does not match the model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(parts))


def _pattern(prefix):
    return re.compile(re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def rename(name, table):
    """Our parameter name -> the checkpoint's, by the first (ours, theirs) prefix pair of `table` that matches.

    "{i}" in a prefix stands for a layer index; ("layers.{i}.ssm.", "model.layers.{i}.mamba.") maps
    "layers.3.ssm.D" to "model.layers.3.mamba.D". A name no pair matches is a bug in the table: KeyError.
    """
    for ours, theirs in table:
        m = _pattern(ours).match(name)
        if m:
            return theirs.format(**m.groupdict()) + name[m.end() :]
    raise KeyError(f"no entry of the name table matches {name!r}")


def _atomic_write(path, write):
    """write(tmp_path) into a temp file beside `path`, then os.replace it: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so os.replace is an atomic rename
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(directory, config, tensors):
    """Write config (a JSON-able dict) and tensors ({name: tensor}, no two sharing memory) in the HF layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    # Weights first: config.json appears (or changes) last, once the weights it describes are in place.
    _atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", write_config)
    return directory


class HFCheckpointMixin:
    """`from_pretrained` / `save_pretrained` in a Hugging Face layout, for a model class that defines

    config_class   a config dataclass with `from_hf(config.json dict)` and `to_hf()`
    HF_NAMES       its (our prefix, HF prefix) table for `rename`
    HF_EMBEDDING   the checkpoint name of the input embedding's weight
    tied_head      True when lm_head shares the embedding's weight: the head is then not stored (HF neither)
    """

    def _hf_names(self):
        """{our state_dict name: HF checkpoint name} for every tensor a checkpoint stores."""
        names = {name: rename(name, self.HF_NAMES) for name in self.state_dict()}
        if self.tied_head:
            del names["lm_head.weight"]
        return names

    @classmethod
    def from_pretrained(cls, path_or_repo_id, device=None, dtype=None, **overrides):
        """Load a HF checkpoint (config.json + weights) from a directory or the Hub, checking every key and shape.

        overrides: config fields to set on the loaded config, e.g. scan_impl="cpu" (a choice checkpoints do not store).
        """
        directory = resolve_checkpoint_dir(path_or_repo_id)
        config = dataclasses.replace(cls.config_class.from_hf(load_config(directory)), **overrides)
        model = cls(config, device=device, dtype=dtype)
        tensors = load_tensors(directory)
        names, ours = model._hf_names(), model.state_dict()
        head, embedding = tensors.get("lm_head.weight"), tensors.get(cls.HF_EMBEDDING)
        if model.tied_head and head is not None and embedding is not None and torch.equal(head, embedding):
            del tensors["lm_head.weight"]  # a tied head stored anyway: it carries nothing new
        check_tensors(tensors, {hf: ours[name].shape for name, hf in names.items()}, f"checkpoint {directory}")
        with torch.no_grad():
            for name, hf in names.items():
                ours[name].copy_(tensors[hf])
        return model

    def save_pretrained(self, directory):
        """Write config.json + model.safetensors in the HF layout (loadable by transformers), atomically."""
        ours = self.state_dict()
        return save_checkpoint(directory, self.config.to_hf(), {hf: ours[n] for n, hf in self._hf_names().items()})
