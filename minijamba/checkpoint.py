"""Reading and writing Hugging Face-style checkpoints safely: the parts every model family shares.

A Hugging Face checkpoint is a directory with `config.json` and the weights, as `model.safetensors`, as
`pytorch_model.bin`, or sharded with a `*.index.json` naming the shard of every tensor. A model may be stored in
more than one such layout (MambaLM: HF transformers' and the official mamba_ssm package's): each `Layout` names its
config.json format, its parameter names and its weights file. The model files (`mamba.py`, `jamba.py`) own their
config fields and their tables of parameter names; this file only moves named tensors between disk and a dict, and
checks them:

    resolve_checkpoint_dir   a local directory, or a Hub repo id fetched with huggingface_hub when installed
    load_tensors             every tensor of the directory, by name: safetensors, or torch.load(weights_only=True)
    check_tensors            the key set and shapes against the model's: one error naming every difference
    rename                   our parameter name -> the checkpoint's, from a table of prefix patterns
    save_checkpoint          config.json + the weights (model.safetensors or pytorch_model.bin), each written to
                             a temp file then os.replace'd
    Layout                   one way of storing a model: config.json format, name table, weights file
    memory_bytes             the memory a model on a device must fit in: from_pretrained refuses a config.json
                             whose model (counted on the meta device, allocating nothing) exceeds it
    HFCheckpointMixin        from_pretrained / save_pretrained for a model class, built from the pieces above

Safety: a pickle can run any code while it loads, so `.bin` files are read only with torch's weights_only
unpickler, which accepts tensors and plain containers and refuses everything else; safetensors files hold no code.
Every file read must be a regular file (a FIFO would block the open, a symlink loop fails in it), config.json and
index files UTF-8 JSON objects, and an index's shards files inside the checkpoint folder. Every file written gets
the user's umask, whatever mode its writer created it with.
"""

import dataclasses
import json
import os
import pickle
import re
import stat
from collections.abc import Callable
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
    "atomic_write",
    "memory_bytes",
    "Layout",
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


def _is_present(path):
    """Whether `path` names something, and if so that it is a regular file (a symlink to one is fine): a FIFO, a
    device or a folder where a checkpoint file should be is refused before anything opens it (opening a FIFO blocks
    until a writer comes), and so is a symlink that loops or dangles."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from e
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # a dangling symlink, a symlink loop
        raise CheckpointError(f"{path}: a symlink that leads to no file ({e.strerror}): fix or remove it") from e
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a folder, FIFO or device): replace it with the file")
    return True


def _read_json(path, what):
    """A checkpoint's JSON file (config.json, a shard index) as a dict, refusing non-UTF-8, non-JSON and non-objects."""
    if not _is_present(path):
        raise CheckpointError(f"{path.parent}: no {path.name}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): is it really {what}?") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def load_config(directory):
    """config.json as a dict."""
    return _read_json(Path(directory) / "config.json", "a model's config.json")


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
        # A file that is no pickle at all (text, HTML) fails inside the unpickler with a KeyError or ValueError.
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
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


def _shards(index_path):
    """The shard file names a *.index.json names, each a file inside the checkpoint folder."""
    weight_map = _read_json(index_path, "a shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index_path}: expected a "weight_map" object of tensor name -> shard file name')
    shards = sorted(set(weight_map.values()))
    # Only files beside the index: a name that climbs out (../) or is absolute could read anything on the machine.
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts or not Path(s).parts]
    if outside:
        raise CheckpointError(f"{index_path}: weight_map names files outside the checkpoint folder: {outside}")
    return shards


def load_tensors(directory):
    """Every tensor of a checkpoint directory, by name. Prefers safetensors; follows a shard index if there is one."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not _is_present(path):
            continue
        if not name.endswith(".index.json"):
            return _load_file(path)
        tensors = {}
        for shard in _shards(path):
            if not _is_present(directory / shard):
                raise CheckpointError(f"{path}: its weight_map names {shard}, which is not in {directory}")
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


def _umask():
    """The process's umask. os.umask can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """write(tmp_path) into a temp file beside `path`, then os.replace it: readers never see a half-written file.

    Every file the package writes for a reader to find later goes through here (checkpoints, tokenizers, token
    caches, training logs and state). On any failure, an interrupt included, the temp file is removed and `path`
    keeps its old content (or stays absent).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so os.replace is an atomic rename
    try:
        write(tmp)
        # Every file with the user's umask: some writers (safetensors) create theirs 0600 whatever the umask says.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(directory, config, tensors, weights_file="model.safetensors"):
    """Write config (a JSON-able dict) and tensors ({name: tensor}) as config.json + weights_file.

    weights_file "model.safetensors" (tensors may not share memory) or "pytorch_model.bin" (torch.save; CPU tensors
    that share memory, such as a tied head stored beside its embedding, are stored once; off the CPU, each is copied
    on its own). A directory that already holds another weights file is refused: load_tensors would read that one.
    """
    if weights_file not in ("model.safetensors", "pytorch_model.bin"):
        raise ValueError(f"weights_file must be 'model.safetensors' or 'pytorch_model.bin', got {weights_file!r}")
    directory = Path(directory)
    others = [name for name in WEIGHT_FILES if name != weights_file and (directory / name).exists()]
    if others:
        raise CheckpointError(
            f"{directory} already holds {', '.join(others)}, which from_pretrained could read instead of the "
            f"{weights_file} being written: save into an empty directory, or delete it first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    def write_weights(tmp):
        if weights_file == "pytorch_model.bin":
            torch.save(tensors, tmp)
        else:
            save_file(tensors, tmp, metadata={"format": "pt"})

    # Weights first: config.json appears (or changes) last, once the weights it describes are in place.
    atomic_write(directory / weights_file, write_weights)
    atomic_write(directory / "config.json", write_config)
    return directory


def memory_bytes(device):
    """The memory a model built on `device` must fit in: the machine's physical RAM on the CPU, the GPU's own on
    CUDA; None where it is not known (other devices, a platform without sysconf), which sets no bound."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[1]
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits(meta_model, device, source):
    """Refuse a config whose model (built on the meta device: no memory) cannot fit in `device`'s memory, before
    allocating it: a damaged config.json's hidden_size of 10**7 would otherwise try to allocate terabytes."""
    tensors = [*meta_model.parameters(), *meta_model.buffers()]
    need, have = sum(t.numel() * t.element_size() for t in tensors), memory_bytes(device)
    if have is not None and need > have:
        count = sum(p.numel() for p in meta_model.parameters())
        raise CheckpointError(
            f"{source}: config.json describes a model of {count:,} parameters ({need / 2**30:,.1f} GiB), more than "
            f"the {have / 2**30:,.1f} GiB of memory of {device or 'the default device'}: check its sizes "
            f"(hidden_size, vocab_size, layers)"
        )


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way of storing a model on disk; from_pretrained reports its `name` (model.checkpoint_layout)."""

    name: str  # "hf", "mamba_ssm": what from_pretrained reports, and its errors say
    names: tuple  # (our prefix, checkpoint prefix) pairs for `rename`
    embedding: str  # the checkpoint name of the input embedding's weight
    from_config: Callable  # config.json dict -> the model's config
    to_config: Callable  # the model's config -> config.json dict
    weights_file: str = "model.safetensors"  # what save_pretrained writes
    stores_tied_head: bool = False  # a tied lm_head stored anyway (torch state_dicts hold it), or left out (HF)
    recognizes: Callable = None  # config.json dict -> whether it is in this layout; None: the default layout


class HFCheckpointMixin:
    """`from_pretrained` / `save_pretrained` in a Hugging Face layout (and others), for a model class that defines

    config_class    a config dataclass with `from_hf(config.json dict)` and `to_hf()`
    HF_NAMES        its (our prefix, HF prefix) table for `rename`
    HF_EMBEDDING    the checkpoint name of the input embedding's weight
    tied_head       True when lm_head shares the embedding's weight: the head is then not stored (HF neither)
    OTHER_LAYOUTS   (optional) more Layouts; from_pretrained reads the first whose `recognizes(config.json)` holds,
                    else the HF layout
    """

    OTHER_LAYOUTS = ()
    checkpoint_layout = None  # the Layout.name from_pretrained read ("hf", "mamba_ssm"); None for a fresh model

    @classmethod
    def checkpoint_layouts(cls):
        """{name: Layout} of every layout this class reads and writes, "hf" first."""
        hf = Layout("hf", cls.HF_NAMES, cls.HF_EMBEDDING, cls.config_class.from_hf, cls.config_class.to_hf)
        return {layout.name: layout for layout in (hf, *cls.OTHER_LAYOUTS)}

    @classmethod
    def _detect_layout(cls, config_json):
        layouts = cls.checkpoint_layouts()
        return next((x for x in layouts.values() if x.recognizes and x.recognizes(config_json)), layouts["hf"])

    def _checkpoint_names(self, layout):
        """{our state_dict name: checkpoint name} for every tensor a checkpoint in `layout` stores."""
        names = {name: rename(name, layout.names) for name in self.state_dict()}
        if self.tied_head and not layout.stores_tied_head:
            del names["lm_head.weight"]
        return names

    @classmethod
    def from_pretrained(cls, path_or_repo_id, device=None, dtype=None, **overrides):
        """Load a checkpoint (config.json + weights) from a directory or the Hub, checking every key and shape.

        The layout is read off config.json (see OTHER_LAYOUTS) and kept in `model.checkpoint_layout`.
        overrides: config fields to set on the loaded config, e.g. scan_impl="cpu" (a choice checkpoints do not store).
        """
        directory = resolve_checkpoint_dir(path_or_repo_id)
        config_json = load_config(directory)
        layout = cls._detect_layout(config_json)
        source = f"checkpoint {directory} ({layout.name} layout)"
        try:
            config = layout.from_config(config_json)
        except ValueError as e:  # CheckpointError too: a config.json this layout cannot build the model from
            raise CheckpointError(f"{source}: {e}") from e
        config = dataclasses.replace(config, **overrides)
        _check_fits(cls(config, device="meta", dtype=dtype), device, source)
        model = cls(config, device=device, dtype=dtype)
        tensors = load_tensors(directory)
        names, ours = model._checkpoint_names(layout), model.state_dict()
        head_name = rename("lm_head.weight", layout.names)
        head, embedding = tensors.get(head_name), tensors.get(layout.embedding)
        if model.tied_head and head is not None and embedding is not None and head.shape == embedding.shape:
            if not torch.equal(head, embedding):
                raise CheckpointError(
                    f"{source}: config.json ties the LM head to the embedding, but the stored {head_name} "
                    f"differs from {layout.embedding}"
                )
            if not layout.stores_tied_head:
                del tensors[head_name]  # a tied head stored anyway: it carries nothing new
        check_tensors(tensors, {ckpt: ours[name].shape for name, ckpt in names.items()}, source)
        with torch.no_grad():
            for name, ckpt in names.items():
                ours[name].copy_(tensors[ckpt])
        model.checkpoint_layout = layout.name
        return model

    def save_pretrained(self, directory, layout="hf"):
        """Write config.json + weights in `layout` ("hf": model.safetensors, loadable by transformers), atomically."""
        layouts = self.checkpoint_layouts()
        if layout not in layouts:
            raise ValueError(f"layout must be one of {list(layouts)}, got {layout!r}")
        chosen, ours = layouts[layout], self.state_dict()
        config = chosen.to_config(self.config)  # first: it refuses a config the layout cannot express
        tensors = {ckpt: ours[name] for name, ckpt in self._checkpoint_names(chosen).items()}
        return save_checkpoint(directory, config, tensors, chosen.weights_file)
