"""Tests of the Mamba block and MambaLM: step == forward, the cache, a NumPy twin, HF checkpoints, init, sampling.

The first test matters most: a step() that drifts from forward() is the most reported bug in Mamba implementations,
so for random configs and every split point k, forward on the whole sequence must equal forward on the first k
tokens followed by step() on the rest, in the logits and in the final cache.
"""

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tolerances import assert_close

from minijamba import reference as ref
from minijamba.checkpoint import CheckpointError
from minijamba.generation import sample_next
from minijamba.mamba import MambaConfig, MambaLM, depthwise_causal_conv

try:
    import transformers
except ImportError:  # the test extra installs it; without it only the HF parity tests skip
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers not importable: pip install .[test]")

d_model = st.integers(1, 24)
d_state = st.integers(1, 8)
d_conv = st.integers(1, 5)
expand = st.integers(1, 3)
dt_rank = st.integers(1, 6)
n_layer = st.integers(1, 3)
vocab_size = st.integers(2, 20)
batch = st.integers(1, 3)
seq_len = st.integers(1, 64)
inner_norms = st.booleans()
seeds = st.integers(0, 2**31 - 1)

STEP_TOL = {torch.float64: "mamba_step_float64", torch.float32: "mamba_step_float32"}


@pytest.fixture(autouse=True)
def _inference():
    """No autograd unless a test asks for it: the chunked scan then skips its checkpointing (conftest sets 1 thread)."""
    with torch.no_grad():
        yield


def make_model(seed, dtype=torch.float64, **config):
    """A MambaLM with every parameter moved off its init (ones, zeros, tiny scales), so no wiring bug can hide."""
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(**config)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def tokens(batch, L, vocab_size, seed):
    return torch.randint(0, vocab_size, (batch, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# step == forward, and the cache
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(
    d_model=d_model,
    d_state=d_state,
    d_conv=d_conv,
    expand=expand,
    dt_rank=dt_rank,
    n_layer=n_layer,
    inner_norms=inner_norms,
    batch=batch,
    L=seq_len,
    seed=seeds,
    data=st.data(),
)
def test_step_matches_forward(
    dtype, d_model, d_state, d_conv, expand, dt_rank, n_layer, inner_norms, batch, L, seed, data
):
    """forward(ids) == forward(ids[:, :k]) then step() for each later token: logits and every cache tensor."""
    k = data.draw(st.integers(0, L), label="k")
    if dtype == torch.float32:
        # An RMSNorm over 1-3 numbers is nearly x/|x|: near 0 it multiplies rounding errors by up to 1/sqrt(eps)
        # (300-1000), beyond any float32 tolerance. float64 covers those sizes; float32 normalises 4 or more numbers.
        d_model = max(d_model, 4)
        if inner_norms:
            d_state, dt_rank = max(d_state, 4), max(dt_rank, 4)
    config = dict(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, n_layer=n_layer)
    model = make_model(seed, dtype, inner_norms=inner_norms, vocab_size=11, **config)
    ids = tokens(batch, L, 11, seed)
    whole = model.new_cache(batch)
    logits = model(ids, whole).logits  # (batch, L, vocab)
    assert torch.equal(logits, model(ids).logits), "a fresh cache must change nothing"

    cache = model.new_cache(batch)
    parts = [model(ids[:, :k], cache).logits] if k else []
    parts += [model.step(ids[:, t], cache)[:, None] for t in range(k, L)]
    tol = STEP_TOL[dtype]
    assert_close(torch.cat(parts, dim=1), logits, tol, f"prefill {k} + step vs forward: logits")
    for i in range(n_layer):
        assert_close(cache.states[i][0], whole.states[i][0], tol, f"layer {i} conv_state")
        assert_close(cache.states[i][1], whole.states[i][1], tol, f"layer {i} ssm_state")
    assert cache.seqlen == whole.seqlen == L


@given(
    d_model=d_model, d_state=d_state, d_conv=d_conv, inner_norms=inner_norms, batch=batch, L=seq_len, seed=seeds,
    data=st.data(),
)  # fmt: skip
def test_chunked_prefill_matches_forward(d_model, d_state, d_conv, inner_norms, batch, L, seed, data):
    """forward over consecutive chunks with one cache == one forward: what lets a long prompt be prefilled in parts."""
    cuts = sorted(data.draw(st.lists(st.integers(1, L), max_size=4), label="cuts"))
    model = make_model(seed, d_model=d_model, d_state=d_state, d_conv=d_conv, inner_norms=inner_norms, vocab_size=7)
    ids = tokens(batch, L, 7, seed)
    whole = model.new_cache(batch)
    logits = model(ids, whole).logits
    cache, parts = model.new_cache(batch), []
    for t0, t1 in zip([0, *cuts], [*cuts, L], strict=True):
        if t1 > t0:
            parts.append(model(ids[:, t0:t1], cache).logits)
    assert_close(torch.cat(parts, dim=1), logits, "mamba_step_float64", f"chunks at {cuts} vs whole")
    assert_close(cache.states[-1][1], whole.states[-1][1], "mamba_step_float64", "last ssm_state")
    assert_close(cache.states[-1][0], whole.states[-1][0], "mamba_step_float64", "last conv_state")


# ---------------------------------------------------------------------------------------------------------
# The fused CPU path (scan_impl "cpu": conv + SiLU and the gated scan in C++) == the readable torch block
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    batch=batch, L=st.integers(1, 40), dim=st.integers(1, 12), d_conv=d_conv, bias=st.booleans(),
    prefix=st.booleans(), seed=seeds,
)  # fmt: skip
def test_fused_conv_matches_depthwise_causal_conv(batch, L, dim, d_conv, bias, prefix, seed):
    """silu(conv) on the C++ kernel == F.silu(depthwise_causal_conv) on the window [prefix, x], float64, forward and
    the gradients of x (read channels-last from a wider tensor, as from in_proj), weight, bias and prefix."""
    from minijamba import fused

    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, L, 2 * dim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(dim, 1, d_conv, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(dim, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    p = torch.randn(batch, dim, d_conv - 1, generator=g, dtype=torch.float64, requires_grad=True) if prefix else None
    with torch.enable_grad():
        x = xz[..., :dim]  # (batch, L, dim), the stride of a (batch, L, 2·dim) tensor
        out = fused.fused_causal_conv_silu(x, weight[:, 0], b, p)  # (batch, dim, L)
        window = torch.cat([p if prefix else x.new_zeros(batch, dim, d_conv - 1), x.transpose(1, 2)], dim=-1)
        expected = torch.nn.functional.silu(depthwise_causal_conv(window, weight, b))
        assert_close(out, expected, "scan_float64", "conv forward")
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
        leaves = [t for t in (xz, weight, b, p) if t is not None]
        for name, got, want in zip(
            ("x", "weight", "bias", "prefix"),
            torch.autograd.grad(out, leaves, grad_out),
            torch.autograd.grad(expected, leaves, grad_out),
            strict=False,
        ):
            assert_close(got, want, "scan_float64", f"conv grad {name}")


@pytest.mark.parametrize("masked", [False, True])
@settings(max_examples=10, deadline=None)
@given(d_model=st.integers(2, 16), d_state=d_state, d_conv=d_conv, inner_norms=inner_norms, batch=batch,
       L=st.integers(1, 80), seed=seeds, data=st.data())  # fmt: skip
def test_fused_block_matches_readable_block(masked, d_model, d_state, d_conv, inner_norms, batch, L, seed, data):
    """A MambaLM on the fused CPU path (conv + SiLU and the gated scan in C++) == the same weights on the readable torch
    path (depthwise_causal_conv, the chunked scan), float64: logits, the cache after a prompt split in two (so the
    conv continues from a cached window), left padding, and the gradient of every parameter."""
    k = data.draw(st.integers(0, L), label="k")
    config = dict(d_model=d_model, d_state=d_state, d_conv=d_conv, inner_norms=inner_norms, vocab_size=9)
    readable = make_model(seed, **config)
    fast = MambaLM(MambaConfig(**config, scan_impl="cpu")).to(torch.float64)
    fast.load_state_dict(readable.state_dict())
    assert fast.layers[0].mixer.uses_fused_conv(torch.zeros(1, dtype=torch.float64))
    assert not readable.layers[0].mixer.uses_fused_conv(torch.zeros(1, dtype=torch.float64))
    ids = tokens(batch, L, 9, seed)
    mask = None
    if masked:  # left padding: row i starts with i pads
        mask = torch.arange(L)[None, :] >= torch.arange(batch)[:, None].clamp(max=L - 1)
    with torch.enable_grad():
        logits = {}
        for name, model in (("readable", readable), ("fused", fast)):
            model.zero_grad()
            out = model(ids, attention_mask=mask).logits  # (batch, L, vocab)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
            logits[name] = out.detach()
    assert_close(logits["fused"], logits["readable"], "mamba_step_float64", "logits")
    for (name, p_fast), p_readable in zip(fast.named_parameters(), readable.parameters(), strict=True):
        assert_close(p_fast.grad, p_readable.grad, "mamba_step_float64", f"grad {name}")
    caches = {}
    for name, model in (("readable", readable), ("fused", fast)):
        cache = model.new_cache(batch)
        parts = [model(ids[:, :k], cache).logits] if k else []
        if k < L:
            parts.append(model(ids[:, k:], cache).logits)
        caches[name] = (torch.cat(parts, dim=1), cache)
    assert_close(caches["fused"][0], caches["readable"][0], "mamba_step_float64", f"prefill split at {k}: logits")
    states = zip(caches["fused"][1].states, caches["readable"][1].states, strict=True)
    for i, (fused_state, readable_state) in enumerate(states):
        assert_close(fused_state[0], readable_state[0], "mamba_step_float64", f"layer {i} conv_state")
        assert_close(fused_state[1], readable_state[1], "mamba_step_float64", f"layer {i} ssm_state")


@pytest.mark.parametrize("scan_impl", ["chunked", "cpu"])
def test_bfloat16_autocast_runs_the_scan_in_float32(scan_impl):
    """Under autocast the projections are bfloat16 and the conv's output float32 (its weights are): the scan takes
    u's dtype, so a step trains (train.py autocasts on CUDA) and the logits stay near float32's."""
    model = make_model(0, torch.float32, d_model=16, d_state=4, n_layer=2, vocab_size=11, scan_impl=scan_impl)
    ids = tokens(2, 24, 11, 0)
    expected = model(ids).logits
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
        logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert_close(logits.float(), expected, "scan_bfloat16", "autocast logits vs float32")


def held_bytes(cache):
    """Bytes of the storage behind the cache's tensors: more than cache.nbytes if one is a view into a bigger tensor."""
    return sum(t.untyped_storage().nbytes() for t in (t for state in cache.states for t in state))


def test_cache_does_not_grow():
    """The cache is n_layer · batch · d_inner · (d_conv + N) numbers after 1 token or 300: O(1) in the context,
    in what it reports and in the memory it keeps alive."""
    model = make_model(0, torch.float32, d_model=8, d_state=4, d_conv=4, n_layer=2, vocab_size=7)
    batch, d_inner = 2, 16
    expected_bytes = 2 * batch * d_inner * (4 + 4) * 4
    cache = model.new_cache(batch)
    shapes = [(c.shape, s.shape) for c, s in cache.states]
    assert shapes == [((batch, d_inner, 4), (batch, d_inner, 4))] * 2
    assert cache.nbytes == expected_bytes
    model(tokens(batch, 1, 7, 0), cache)
    for length in (1, 50, 300):
        if length > 1:
            model(tokens(batch, length, 7, length), cache)  # a prefill of `length` tokens
        assert held_bytes(cache) == cache.nbytes == expected_bytes
        for t in range(10):
            model.step(torch.tensor([t % 7, 3]), cache)
        assert [(c.shape, s.shape) for c, s in cache.states] == shapes
        assert held_bytes(cache) == cache.nbytes == expected_bytes
    assert cache.seqlen == 1 + 50 + 300 + 30


def test_every_parameter_gets_a_gradient():
    model = make_model(0, torch.float32, d_model=8, d_state=3, n_layer=2, vocab_size=7, inner_norms=True, bias=True)
    with torch.enable_grad():
        torch.nn.functional.cross_entropy(
            model(tokens(2, 9, 7, 0)).logits.flatten(0, 1), tokens(2, 9, 7, 1).flatten()
        ).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_cache_batch_must_match():
    model = make_model(0, d_model=4, vocab_size=5)
    with pytest.raises(ValueError, match="batch"):
        model(tokens(3, 4, 5, 0), model.new_cache(2))
    with pytest.raises(ValueError, match="LMCache"):
        model.step(torch.tensor([1]), None)


# ---------------------------------------------------------------------------------------------------------
# The mixer against Figure 3 written out in NumPy (the official zero padding, the reference scan, the z gate)
# ---------------------------------------------------------------------------------------------------------


def _np(t):
    return t.detach().numpy()


def _rms(x, weight, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * weight


def mixer_ref(mixer, hidden):
    """The Mamba block of Figure 3 in float64 NumPy: (batch, L, d_model) -> (batch, L, d_model)."""
    h = _np(hidden)
    xz = h @ _np(mixer.in_proj.weight).T  # (batch, L, 2·d_inner)
    if mixer.in_proj.bias is not None:
        xz = xz + _np(mixer.in_proj.bias)
    x, z = np.split(xz.transpose(0, 2, 1), 2, axis=1)  # (batch, d_inner, L) each
    K = _np(mixer.conv1d.weight)[:, 0]  # (d_inner, d_conv)
    d_conv, L = K.shape[1], x.shape[-1]
    x_pad = np.pad(x, ((0, 0), (0, 0), (d_conv - 1, 0)))  # the official padding: d_conv - 1 zeros on the left
    conv = sum(K[None, :, j, None] * x_pad[:, :, j : j + L] for j in range(d_conv))  # (batch, d_inner, L)
    if mixer.conv1d.bias is not None:
        conv = conv + _np(mixer.conv1d.bias)[:, None]
    x = ref.silu(conv)
    ssm = mixer.ssm
    R, N = ssm.dt_rank, ssm.d_state
    x_dbl = np.einsum("ed,bdl->bel", _np(ssm.x_proj.weight), x)  # (batch, R + 2N, L)
    dt, B, C = x_dbl[:, :R], x_dbl[:, R : R + N], x_dbl[:, R + N :]
    if ssm.dt_norm is not None:  # Jamba's norms, over R and over N
        dt, B, C = (
            _rms(m.transpose(0, 2, 1), _np(norm.weight), norm.eps).transpose(0, 2, 1)
            for m, norm in ((dt, ssm.dt_norm), (B, ssm.B_norm), (C, ssm.C_norm))
        )
    dt = np.einsum("dr,brl->bdl", _np(ssm.dt_proj.weight), dt)  # (batch, d_inner, L)
    A = -np.exp(_np(ssm.A_log))
    y = ref.selective_scan_ref(
        x, dt, A, B, C, _np(ssm.D), z=z, delta_bias=_np(ssm.dt_proj.bias), delta_softplus=True
    )  # (batch, d_inner, L)
    out = y.transpose(0, 2, 1) @ _np(mixer.out_proj.weight).T  # (batch, L, d_model)
    return out + (_np(mixer.out_proj.bias) if mixer.out_proj.bias is not None else 0)


@given(
    d_model=d_model,
    d_state=d_state,
    d_conv=d_conv,
    inner_norms=inner_norms,
    bias=st.booleans(),
    conv_bias=st.booleans(),
    batch=batch,
    L=st.integers(1, 24),
    seed=seeds,
)
def test_mixer_matches_numpy_reference(d_model, d_state, d_conv, inner_norms, bias, conv_bias, batch, L, seed):
    model = make_model(
        seed, d_model=d_model, d_state=d_state, d_conv=d_conv, inner_norms=inner_norms, bias=bias, conv_bias=conv_bias
    )
    mixer = model.layers[0].mixer
    hidden = torch.randn(batch, L, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out, _ = mixer(hidden)
    assert_close(out, mixer_ref(mixer, hidden), "mamba_vs_reference", "mixer vs NumPy Figure 3")


@pytest.mark.parametrize(("d_conv", "L"), [(1, 5), (4, 1), (4, 9), (3, 2)])
def test_depthwise_causal_conv_is_torch_conv1d(d_conv, L):
    """The written-out conv == torch's conv1d with the official left padding of d_conv - 1 zeros."""
    g = torch.Generator().manual_seed(d_conv * 10 + L)
    x = torch.randn(2, 6, L, dtype=torch.float64, generator=g)
    w, b = torch.randn(6, 1, d_conv, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    window = torch.nn.functional.pad(x, (d_conv - 1, 0))  # (2, 6, d_conv - 1 + L)
    expected = torch.nn.functional.conv1d(x, w, b, padding=d_conv - 1, groups=6)[..., :L]
    assert_close(depthwise_causal_conv(window, w, b), expected, "mamba_vs_reference", "conv vs torch conv1d")


def test_rms_norm():
    from minijamba.mamba import RMSNorm

    norm = RMSNorm(5, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 6.0))
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    assert_close(norm(x), _rms(_np(x), np.arange(1.0, 6.0), 1e-6), "mamba_vs_reference", "RMSNorm")
    assert norm(x).dtype == torch.float64  # computed in float64 here, not rounded through float32


# ---------------------------------------------------------------------------------------------------------
# Hugging Face parity: transformers' MambaForCausalLM <-> our checkpoints
# ---------------------------------------------------------------------------------------------------------


def hf_mamba(seed, **config):
    """A transformers MambaForCausalLM with perturbed weights (no eos, so generate never stops early)."""
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(eos_token_id=None, pad_token_id=None, **config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@needs_transformers
@settings(max_examples=6)
@given(
    d_model=st.integers(4, 24),  # float32: see test_step_matches_forward on RMSNorms over fewer than 4 numbers
    d_state=d_state,
    d_conv=d_conv,
    expand=expand,
    n_layer=n_layer,
    vocab_size=vocab_size,
    dt_rank=st.one_of(st.just("auto"), st.integers(1, 4)),
    flags=st.fixed_dictionaries(
        {k: st.booleans() for k in ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings")}
    ),
    batch=batch,
    L=st.integers(1, 16),
    seed=seeds,
)
def test_hf_checkpoint_loads_with_the_same_logits(
    tmp_path_factory, d_model, d_state, d_conv, expand, n_layer, vocab_size, dt_rank, flags, batch, L, seed
):
    hf = hf_mamba(
        seed, vocab_size=vocab_size, hidden_size=d_model, state_size=d_state, conv_kernel=d_conv, expand=expand,
        num_hidden_layers=n_layer, time_step_rank=dt_rank, **flags,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    model = MambaLM.from_pretrained(path)
    ids = tokens(batch, L, vocab_size, seed)
    with torch.no_grad():
        assert_close(model(ids).logits, hf(ids).logits, "hf_parity", "logits vs transformers")
        ours = model.generate(ids, max_new_tokens=6, temperature=0)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs), f"greedy generations differ:\nours   {ours}\ntheirs {theirs}"


@needs_transformers
@settings(max_examples=4)
@given(d_model=st.integers(4, 24), d_state=d_state, d_conv=d_conv, n_layer=n_layer, tie=st.booleans(), seed=seeds)
def test_save_pretrained_loads_in_transformers(tmp_path_factory, d_model, d_state, d_conv, n_layer, tie, seed):
    config = dict(d_model=d_model, d_state=d_state, d_conv=d_conv, n_layer=n_layer, vocab_size=9, tie_embeddings=tie)
    model = make_model(seed, torch.float32, **config)
    path = tmp_path_factory.mktemp("ours")
    model.save_pretrained(path)
    hf = transformers.MambaForCausalLM.from_pretrained(path).eval()
    ids = tokens(2, 10, 9, seed)
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids).logits, "hf_parity", "transformers on our checkpoint vs ours")


def test_save_load_round_trip_is_exact(tmp_path):
    """Including what HF Mamba lacks (Jamba's inner norms, an untied head); files are replaced atomically."""
    model = make_model(0, torch.float32, d_model=12, d_state=3, n_layer=2, vocab_size=9, inner_norms=True)
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # over an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "backbone.layers.1.mixer.dt_layernorm.weight" in keys and "backbone.layers.0.mixer.A_log" in keys
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_pytorch_model_bin_loads(tmp_path):
    model = make_model(1, torch.float32, d_model=8, vocab_size=5)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    ids = tokens(1, 6, 5, 0)
    assert torch.equal(MambaLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------------------
# from_pretrained refuses bad checkpoints with a clear error
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    make_model(0, torch.float32, d_model=8, d_state=3, n_layer=2, vocab_size=5).save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_unexpected_and_misshapen_keys_are_all_listed(checkpoint):
    def edit(t):
        del t["backbone.layers.1.mixer.D"]
        t["backbone.layers.0.mixer.extra"] = torch.zeros(2)
        t["backbone.norm_f.weight"] = torch.ones(9)

    _edit_weights(checkpoint, edit)
    with pytest.raises(CheckpointError) as info:
        MambaLM.from_pretrained(checkpoint)
    message = str(info.value)
    for expected in (
        "missing keys (1): backbone.layers.1.mixer.D",
        "unexpected keys (1): backbone.layers.0.mixer.extra",
        "backbone.norm_f.weight: checkpoint (9,), model (8,)",
    ):
        assert expected in message, message


class Payload:
    """Unpickling this calls open(marker, "w"): any code could run in its place."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_unrun(checkpoint, tmp_path_factory):
    markers = tmp_path_factory.mktemp("markers")
    (checkpoint / "model.safetensors").unlink()
    torch.save({"backbone.norm_f.weight": Payload(markers / "ours")}, checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        MambaLM.from_pretrained(checkpoint)
    assert not (markers / "ours").exists(), "the payload ran"
    # The payload is live: a plain unpickling runs it.
    torch.save({"x": Payload(markers / "plain")}, markers / "evil.bin")
    torch.load(markers / "evil.bin", weights_only=False)
    assert (markers / "plain").exists()


def test_other_bad_checkpoints(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        MambaLM.from_pretrained(tmp_path / "does-not-exist")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed: import raises ImportError
    with pytest.raises(CheckpointError, match="huggingface_hub is not installed"):
        MambaLM.from_pretrained("state-spaces/mamba-130m-hf")
    (checkpoint / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MambaLM.from_pretrained(checkpoint)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        MambaLM.from_pretrained(checkpoint)
    (checkpoint / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(CheckpointError, match="model_type"):
        MambaLM.from_pretrained(checkpoint)


# ---------------------------------------------------------------------------------------------------------
# Init, config, generation
# ---------------------------------------------------------------------------------------------------------


def test_init_is_the_official_one():
    torch.manual_seed(0)
    config = MambaConfig(d_model=256, n_layer=4, vocab_size=1000, d_state=8, bias=True)
    model = MambaLM(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 0.002
    d_inner, N = config.d_inner, config.d_state
    for layer in model.layers:
        mixer = layer.mixer
        assert torch.equal(mixer.ssm.A_log, torch.log(torch.arange(1.0, N + 1)).repeat(d_inner, 1))
        assert torch.equal(mixer.ssm.D, torch.ones(d_inner))
        dt = torch.nn.functional.softplus(mixer.ssm.dt_proj.bias)
        assert bool((dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all())
        assert torch.equal(mixer.in_proj.bias, torch.zeros(2 * d_inner))  # Linear biases zeroed...
        assert torch.equal(mixer.out_proj.bias, torch.zeros(config.d_model))
        assert bool(mixer.conv1d.bias.abs().sum() > 0)  # ...the conv's is not (it is no Linear)
        bound = d_inner**-0.5 / math.sqrt(config.n_layer)  # kaiming_uniform(a=√5) is U(±1/√fan_in), / √n_layer
        assert 0.95 * bound < mixer.out_proj.weight.abs().max().item() <= bound
        assert torch.equal(layer.norm.weight, torch.ones(config.d_model))
    mixer_params = sum(p.numel() for p in model.layers[0].mixer.parameters())
    assert 1.0 < mixer_params / (3 * config.expand * config.d_model**2) < 1.15  # NOTES: ≈ 3·expand·d_model²


def test_config():
    assert MambaConfig(d_model=17).dt_rank == 2 and MambaConfig(d_model=16).dt_rank == 1
    assert MambaConfig(d_model=16, dt_rank=5).dt_rank == 5
    config = MambaConfig(d_model=24, n_layer=3, vocab_size=50, d_state=5, d_conv=2, inner_norms=True)
    assert MambaConfig.from_hf(config.to_hf()) == config
    assert config.to_hf()["hidden_size"] == 24 and config.to_hf()["intermediate_size"] == 48
    for bad in ({"d_model": 0}, {"n_layer": 1.5}, {"d_state": True}, {"dt_rank": "full"}):
        with pytest.raises(ValueError):
            MambaConfig(**bad)
    with pytest.raises(ValueError, match="inner_norm"):
        from minijamba.s6 import SelectiveSSM

        SelectiveSSM(4, 2, selective=False, inner_norm=torch.nn.Identity)


def test_generate_greedy_is_argmax_of_forward():
    """generate(temperature=0) == re-running forward on the whole sequence and taking the argmax, token by token."""
    model = make_model(3, d_model=8, n_layer=2, vocab_size=9)
    ids = tokens(2, 5, 9, 3)
    out = model.generate(ids, max_new_tokens=7, temperature=0)
    expected = ids
    for _ in range(7):
        expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(model.generate(ids, 7, temperature=0.7, top_k=1, seed=5), expected)  # top-1 is greedy
    assert torch.equal(model.generate(ids, 0), ids)


def test_generate_sampling_is_seeded():
    model = make_model(4, d_model=8, vocab_size=9)
    ids = tokens(3, 4, 9, 4)
    a = model.generate(ids, 20, temperature=1.5, top_k=4, seed=11)
    assert torch.equal(a, model.generate(ids, 20, temperature=1.5, top_k=4, seed=11))
    assert a.shape == (3, 24)
    with pytest.raises(ValueError):
        model.generate(ids, 3, temperature=-1)
    with pytest.raises(ValueError):
        model.generate(ids[0], 3)


def test_sample_next_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=2.0, top_k=2, generator=g)
    assert set(drawn.tolist()) == {1, 3}
    assert set(sample_next(logits, temperature=2.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(sample_next(logits, temperature=0), torch.ones(500, dtype=torch.long))
