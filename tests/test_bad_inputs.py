"""Bad input to checkpoints, models, scans and the benchmark CLIs is refused in one line that names what is wrong
(issue 15, "Tracebacks instead of messages", the model side), and checkpoint files get the user's umask.

Each test is one finding of the issue: without its fix the input gets through to a traceback (a KeyError, a
torch.cat shape error, a hang on a FIFO, a terabyte allocation) or to NaN logits.
"""

import argparse
import json
import math
import os
import signal
import stat

import pytest
import torch

from minijamba import checkpoint
from minijamba.bench import decode
from minijamba.bench.__main__ import main as bench_main
from minijamba.checkpoint import CheckpointError, load_config, load_tensors
from minijamba.jamba import PRESETS, JambaConfig
from minijamba.mamba import MambaConfig, MambaLM
from minijamba.models import build_model, load_pretrained
from minijamba.scan import selective_scan

CONFIGS = {
    "mamba": lambda **kw: MambaConfig(**{**dict(d_model=16, n_layer=2, vocab_size=11, d_state=4), **kw}),
    "jamba": lambda **kw: JambaConfig(**{**PRESETS["tiny"], **kw}),  # mamba and attention layers, MoE
}


@pytest.fixture(params=sorted(CONFIGS))
def family(request):
    return request.param


def make(family, **fields):
    torch.manual_seed(0)
    return build_model(CONFIGS[family](**fields)).eval()


def saved(tmp_path, **fields):
    """A tiny MambaLM's checkpoint folder."""
    MambaLM(CONFIGS["mamba"](**fields)).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files


def test_huge_config_is_refused_before_allocating(tmp_path):
    """A config.json whose model could never fit (here 2**46 embedding parameters, 256 TiB in float32: more than
    any address space) is refused from its parameter count, built on the meta device, not by a failed malloc."""
    directory = saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "vocab_size": 2**42}))
    with pytest.raises(CheckpointError, match=r"parameters .* more than the .* memory .*hidden_size"):
        load_pretrained(directory)


def test_model_larger_than_the_memory_bound_is_refused(tmp_path, monkeypatch):
    """The bound is checkpoint.memory_bytes(device): a model one byte over it is refused, one that fits loads."""
    directory = saved(tmp_path)
    need = sum(p.numel() * p.element_size() for p in MambaLM(CONFIGS["mamba"]()).parameters())
    assert checkpoint.memory_bytes("cpu") > need and checkpoint.memory_bytes("meta") is None
    monkeypatch.setattr(checkpoint, "memory_bytes", lambda device: need - 1)
    with pytest.raises(CheckpointError, match="memory"):
        MambaLM.from_pretrained(directory)
    monkeypatch.setattr(checkpoint, "memory_bytes", lambda device: need)
    MambaLM.from_pretrained(directory)


def test_text_file_named_pytorch_model_bin_is_refused(tmp_path):
    directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_text("hello world\n")  # the unpickler fails with a KeyError
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused: not a plain tensor checkpoint"):
        load_tensors(directory)


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {"x": 3}}', "weight_map"),
        ('{"weight_map": {"x": "../outside.safetensors"}}', "outside the checkpoint folder"),
        ('{"weight_map": {"x": "/etc/passwd"}}', "outside the checkpoint folder"),
        ('{"weight_map": {"x": "missing.safetensors"}}', "not in"),
    ],
)
def test_bad_shard_index_is_refused(tmp_path, index, message):
    directory = saved(tmp_path)
    (directory / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (directory / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        load_tensors(directory)


def test_non_utf8_config_is_refused(tmp_path):
    directory = saved(tmp_path)
    (directory / "config.json").write_bytes(b'{"d_model": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match="config.json: not UTF-8"):
        load_config(directory)


def test_symlink_loop_is_refused(tmp_path):
    directory = saved(tmp_path)
    (directory / "config.json").unlink()
    os.symlink("config.json", directory / "config.json")  # points at itself
    with pytest.raises(CheckpointError, match="config.json: a symlink that leads to no file"):
        load_config(directory)
    (directory / "model.safetensors").unlink()
    os.symlink("model.safetensors", directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: a symlink that leads to no file"):
        load_tensors(directory)


def test_fifo_config_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO blocks until a writer comes: it must be refused from its stat alone, never opened."""
    directory = saved(tmp_path)
    (directory / "config.json").unlink()
    os.mkfifo(directory / "config.json")

    def hung(signum, frame):
        raise TimeoutError("load_config opened the FIFO and waited for a writer")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        with pytest.raises(CheckpointError, match="config.json: not a regular file"):
            load_config(directory)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file"):
        load_tensors(directory)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_checkpoint_files_get_the_users_umask(tmp_path, umask, weights_file):
    """safetensors creates its file 0600 whatever the umask: every file of a checkpoint is 0666 & ~umask."""
    old = os.umask(umask)
    try:
        checkpoint.save_checkpoint(tmp_path, {"a": 1}, {"w": torch.zeros(2)}, weights_file)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, weights_file: 0o666 & ~umask}


# ---------------------------------------------------------------------------------------------------------------
# Model calls


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(family, bad):
    model = make(family)
    vocab = model.config.vocab_size
    bad_id = vocab if bad == "vocab" else bad
    ids = torch.tensor([[1, bad_id, 2]])
    match = rf"input_ids must hold token ids in \[0, vocab_size={vocab}\)"
    with pytest.raises(ValueError, match=match):
        model(ids)
    with pytest.raises(ValueError, match=match):
        model.prefill(ids, model.new_cache(1))
    with pytest.raises(ValueError, match=match):
        model.generate(ids, 2)
    cache = model.new_cache(1)
    model.prefill(torch.tensor([[1, 2]]), cache)
    with pytest.raises(ValueError, match=rf"token must hold token ids in \[0, vocab_size={vocab}\)"):
        model.step(torch.tensor([bad_id]), cache)
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.float())


def test_cache_of_another_model_of_the_same_depth_is_refused(family):
    """Same depth and layer kinds, other widths: refused by _check_cache, not inside a layer's torch.cat."""
    model = make(family)
    wider = {"mamba": dict(d_model=32), "jamba": dict(hidden_size=64, num_attention_heads=8)}[family]
    other = make(family, **wider)
    ids = torch.tensor([[1, 2, 3]])
    for fill in (False, True):  # a fresh cache of the other model, and one it has filled
        cache = other.new_cache(1)
        if fill:
            other.prefill(ids, cache)
        with pytest.raises(ValueError, match="cache is not this model's: layer 0"):
            model(ids, cache)
        with pytest.raises(ValueError, match="cache is not this model's: layer 0"):
            model.step(torch.tensor([1]), cache)
    cache = model.new_cache(1)
    model.prefill(ids, cache)
    cache.states[-1] = tuple(t.to(torch.int64) for t in cache.states[-1])
    with pytest.raises(ValueError, match="cache is not this model's"):
        model.step(torch.tensor([1]), cache)


def test_own_cache_still_passes_the_check(family):
    """prefill, chunked forward and step with the model's own cache: every state matches what new_cache makes."""
    model = make(family)
    cache = model.new_cache(2)
    model(torch.tensor([[1, 2], [3, 4]]), cache, attention_mask=torch.tensor([[0, 1], [1, 1]]))
    model(torch.tensor([[5], [6]]), cache)
    assert model.step(torch.tensor([1, 2]), cache).shape == (2, model.config.vocab_size) and cache.seqlen == 4


# ---------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("value", [-1e-6, 0.0, math.nan, math.inf])
@pytest.mark.parametrize(
    "family_field",
    [
        ("mamba", "norm_eps"),
        ("mamba", "dt_min"),
        ("mamba", "dt_max"),
        ("mamba", "dt_init_floor"),
        ("jamba", "rms_norm_eps"),
        ("jamba", "initializer_range"),
    ],
)
def test_nonsense_config_reals_are_refused(family_field, value):
    family, name = family_field
    with pytest.raises(ValueError, match=name):
        CONFIGS[family](**{name: value})


def test_dt_max_below_dt_min_is_refused():
    with pytest.raises(ValueError, match="dt_max must be >= dt_min"):
        MambaConfig(dt_min=0.1, dt_max=0.01)


def test_nan_norm_eps_in_config_json_is_a_checkpoint_error(tmp_path):
    directory = saved(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": -1.0}))
    with pytest.raises(CheckpointError, match="norm_eps must be a finite positive number"):
        MambaLM.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------
# Scans


def scan_args(N, device="cpu"):
    u = torch.randn(1, 4, 8, device=device)
    return u, u.clone(), -torch.ones(4, N, device=device), torch.randn(1, N, 8, device=device)


@pytest.mark.parametrize("impl", ["sequential", "parallel", "chunked", "cpu", "auto"])
def test_zero_d_state_is_refused_by_every_impl(impl):
    u, delta, A, B = scan_args(0)
    with pytest.raises(ValueError, match=r"A must be \(dim, N\) with d_state N >= 1"):
        selective_scan(u, delta, A, B, B, impl=impl)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_auto_on_meta_tensors_scans_in_torch(requires_grad):
    """ "auto" on the meta device (shapes only) uses the chunked torch scan: no kernel build, no traceback."""
    u, delta, A, B = scan_args(3, "meta")
    u.requires_grad_(requires_grad)
    y, last = selective_scan(u, delta, A, B, B, impl="auto", return_last_state=True)
    assert y.shape == (1, 4, 8) and last.shape == (1, 4, 3) and y.device.type == "meta"


# ---------------------------------------------------------------------------------------------------------------
# Benchmark CLIs


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["scan", "--lengths", "0"], "--lengths"),
        (["scan", "--lengths", "16,,32"], "--lengths"),
        (["accuracy", "--lengths", "-4"], "--lengths"),
        (["decode", "--lengths", "x"], "--lengths"),
        (["scan", "--repeats", "0"], "--repeats"),
        (["decode", "--repeats", "0"], "--repeats"),
        (["decode", "--threads", "-3"], "--threads"),
        (["scan", "--batch", "0"], "--batch"),
        (["accuracy", "--batch", "0"], "--batch"),
        (["scan", "--d-state", "0"], "--d-state"),
        (["scan", "--max-gb", "nan"], "--max-gb"),
        (["decode", "--chunk", "-1"], "--chunk"),
        (["sass", "--items", "0"], "--items"),
        (["step", "--steps", "0"], "--steps"),
        (["step", "--context", "-1"], "--context"),
    ],
)
def test_bench_flags_refuse_bad_values_in_one_line(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: expected" in err.splitlines()[-1] and "Traceback" not in err


def test_bench_threads_zero_means_torch_default():
    """--threads 0 stays valid (run() then leaves torch's thread count alone); --lengths parses to a list."""
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    assert parser.parse_args(["--threads", "0", "--lengths", "8,4"]).threads == 0
    assert parser.parse_args(["--lengths", "8,4"]).lengths == [8, 4]


def conv_args(batch=2, L=5, dim=3, K=4, dtype=torch.float32):
    shapes = ((batch, L, dim), (dim, K), (dim,), (batch, dim, K - 1))  # x, weight, bias, prefix
    return tuple(torch.randn(shape, dtype=dtype) for shape in shapes)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, w, b, p: (x[0], w, b, p), r"x must have shape \(batch, L, dim\)"),
        (lambda x, w, b, p: (x.int(), w, b, p), "x must be float32 or float64"),
        (lambda x, w, b, p: (x.transpose(1, 2).contiguous().transpose(1, 2), w, b, p), "x must have unit stride"),
        (lambda x, w, b, p: (x, w.double(), b, p), "weight must have x's dtype"),
        (lambda x, w, b, p: (x, w[:2], b, p), r"weight must have shape \(dim=3, d_conv >= 1\)"),
        (lambda x, w, b, p: (x, w.t().contiguous().t(), b, p), "weight must be contiguous"),
        (lambda x, w, b, p: (x, w, b[:2], p), "bias must have shape"),
        (lambda x, w, b, p: (x, w, b, p[:, :, :2].contiguous()), "prefix must have shape"),
    ],
)
def test_fused_conv_refuses_bad_tensors_by_name(change, message):
    """The conv kernel's binding checks what its loops trust: a RuntimeError naming the argument, never a crash."""
    from minijamba import fused

    extension = fused.load("cpu")
    with pytest.raises(RuntimeError, match=message):
        extension.conv_forward(*change(*conv_args()))
    x, w, b, p = conv_args()
    with pytest.raises(RuntimeError, match=r"grad_out must have shape"):
        extension.conv_backward(x, w, b, p, torch.zeros(2, 5, 3))
