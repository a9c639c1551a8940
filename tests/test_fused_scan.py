"""The fused scans of cuda/ against the float64 NumPy reference: the CPU twin here, the CUDA kernel on a GPU.

The CPU twin is built on first use (minijamba.fused.load); a machine that cannot build it fails these tests
rather than skipping them, so `make test` always checks the fused path it ships. The CUDA tests skip without a
GPU; the CUDA source is still compile-checked wherever nvcc is found.
"""

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scan import TOL, bc_kinds, make_inputs, option_sets, reference_of
from tolerances import assert_close

from minijamba import fused, scan
from minijamba.scan import selective_scan

batch_size = st.integers(1, 3)
channels = st.integers(1, 8)
d_state = st.integers(1, 16)
seq_len = st.integers(1, 300)  # crosses the CPU twin's 64-step chunks several times
seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([torch.float32, torch.float64])
GRAD_TOL = {torch.float32: "fused_grad_float32", torch.float64: "scan_float64"}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (make cuda-check on one)")


@pytest.fixture(scope="module")
def extension():
    return fused.load("cpu")


def gradients(args, impl, seed=0):
    """Every input's gradient of a random weighting of (y, last state), computed with impl, in float64."""
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if k in names}
    y, last = selective_scan(**{**args, **leaves}, return_last_state=True, impl=impl)
    g = torch.Generator().manual_seed(seed)
    weights_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    weights_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(y)
    ((y * weights_y).sum() + (last * weights_last).sum()).backward()
    return {k: leaves[k].grad for k in names}


# ---------------------------------------------------------------------------------------------- CPU twin


@given(dtype=dtypes, batch=batch_size, dim=channels, N=d_state, L=seq_len, seed=seeds, b_kind=bc_kinds,
       c_kind=bc_kinds, options=option_sets)  # fmt: skip
def test_cpu_matches_the_reference(extension, dtype, batch, dim, N, L, seed, b_kind, c_kind, options):
    args = make_inputs(seed, batch, dim, N, L, dtype, b_kind, c_kind, options)
    y, last = selective_scan(**args, return_last_state=True, impl="cpu")
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert y.dtype == dtype and last.dtype == dtype
    assert_close(y, y_ref, TOL[dtype], "cpu y")
    assert_close(last, last_ref, TOL[dtype], "cpu last state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_long_sequence_matches_the_reference(extension, dtype):
    """L = 4096 with Mamba's delta range, every option on: the float32 tolerance is claimed up to here."""
    args = make_inputs(1, 2, 4, 16, 4096, dtype, options={"D", "z", "delta_bias", "delta_softplus", "initial_state"})
    y, last = selective_scan(**args, return_last_state=True, impl="cpu")
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert_close(y, y_ref, TOL[dtype], "cpu y")
    assert_close(last, last_ref, TOL[dtype], "cpu last state")


@settings(max_examples=max(10, settings().max_examples // 3))
@given(dtype=dtypes, batch=batch_size, dim=channels, N=d_state, L=st.integers(1, 200), seed=seeds,
       b_kind=bc_kinds, c_kind=bc_kinds, options=option_sets)  # fmt: skip
def test_cpu_gradients_match_the_sequential_scan(extension, dtype, batch, dim, N, L, seed, b_kind, c_kind, options):
    """Every gradient == autograd through the sequential torch scan in float64 (itself checked by gradcheck)."""
    args = make_inputs(seed, batch, dim, N, L, dtype, b_kind, c_kind, options)
    expected = gradients({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}, "sequential")
    for name, grad in gradients(args, "cpu").items():
        assert grad.dtype == dtype
        assert_close(grad, expected[name], GRAD_TOL[dtype], f"cpu grad {name}")


@settings(max_examples=10)
@given(b_kind=bc_kinds, c_kind=bc_kinds, seed=seeds, L=st.sampled_from([1, 2, 9, 63, 64, 65, 130]))
def test_cpu_gradcheck(extension, b_kind, c_kind, seed, L):
    """Analytic gradients == finite differences in float64, with L on both sides of the 64-step chunks."""
    args = make_inputs(seed, 1, 2, 2, L, torch.float64, b_kind, c_kind, {"D", "z", "delta_bias", "initial_state"})
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        kwargs = dict(zip(names, tensors, strict=True))
        return selective_scan(**kwargs, delta_softplus=True, return_last_state=True, impl="cpu")

    assert torch.autograd.gradcheck(f, tuple(args[k].requires_grad_() for k in names))


def test_cpu_takes_non_contiguous_inputs(extension):
    """selective_scan makes its inputs contiguous for the kernel: a transposed u gives the same answer."""
    args = make_inputs(2, 2, 3, 4, 70, options={"D", "z"})
    u_t = args["u"].transpose(0, 2).contiguous().transpose(0, 2)  # same values, other strides
    assert not u_t.is_contiguous()
    assert torch.equal(selective_scan(**{**args, "u": u_t}, impl="cpu"), selective_scan(**args, impl="cpu"))


def test_cpu_saves_no_states_without_autograd(extension):
    """Under no_grad the forward keeps nothing for a backward: its extra memory is y and the last state."""
    args = make_inputs(0, 1, 2, 3, 100)
    with torch.no_grad():
        _, _, chunk_states = extension.forward(*[args[k] for k in ("u", "delta", "A", "B", "C")], *[None] * 4,
                                               False, False)  # fmt: skip
    assert chunk_states.numel() == 0


def _chunks_saved(extension, L, device="cpu"):
    """How many chunk-start states the built kernel's forward saves for a sequence of L steps."""
    args = {k: v.to(device) for k, v in make_inputs(0, 1, 2, 3, L).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        _, _, chunk_states = extension.forward(*[args[k] for k in ("u", "delta", "A", "B", "C")], *[None] * 4,
                                               False, True)  # fmt: skip
    return chunk_states.shape[2]  # (batch, dim, n_chunks, d_state)


def test_kernel_constants_are_the_compiled_ones(extension):
    """The sizes lesson 07 reads from the sources are the built twin's: it saves one state every kCpuChunk steps."""
    k = fused.kernel_constants()
    assert k["kWarp"] == 32 and k["kCudaThreads"] % k["kWarp"] == 0 and k["kCudaItems"] >= 1, k
    for L in (1, k["kCpuChunk"], k["kCpuChunk"] + 1, 3 * k["kCpuChunk"] + 5):
        assert _chunks_saved(extension, L) == -(-L // k["kCpuChunk"]), L


def test_exp_float32_is_within_one_ulp(extension):
    """cpu_math.h's exp (the float32 twin's) vs float64 exp rounded to float32, over the whole float range."""
    x = torch.linspace(-110, 90, 2_000_001, dtype=torch.float32)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 88.72, 88.73, -87.4, -103.9, float("inf"), -float("inf")])])
    got = extension.cpu_math_float32(x, "exp").numpy().astype(np.float64)
    exact = np.exp(x.numpy().astype(np.float64))
    finite = exact <= np.finfo(np.float32).max  # beyond it, float32's exp is inf
    ulp = np.spacing(exact[finite].astype(np.float32)).astype(np.float64)
    ulps = np.abs(got[finite] - exact[finite]) / ulp
    print(f"max error {ulps.max():.3f} ulp")
    assert ulps.max() <= 1.0
    assert np.all(np.isposinf(got[~finite]))
    assert np.isnan(extension.cpu_math_float32(torch.tensor([float("nan")]), "exp").item())


def test_log1p_float32_is_within_one_ulp(extension):
    """cpu_math.h's log1p (the float32 twin's softplus) vs float64 log1p, from -1 to the largest float."""
    tiny_negative = -np.logspace(-45, -1e-7, 500_001)
    y = np.concatenate([np.linspace(-1, 1, 2_000_001), np.logspace(-45, 38.5, 500_001), tiny_negative])
    y = torch.from_numpy(y.astype(np.float32))
    y = torch.cat([y[y > -1], torch.tensor([0.0, 1e-30, 3.4e38])])
    got = extension.cpu_math_float32(y, "log1p").numpy().astype(np.float64)
    exact = np.log1p(y.numpy().astype(np.float64))
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    print(f"max error {ulps.max():.3f} ulp")
    assert ulps.max() <= 1.0
    specials = extension.cpu_math_float32(torch.tensor([-1.0, float("inf"), -1.5, float("nan")]), "log1p")
    assert specials[0] == -float("inf") and specials[1] == float("inf") and specials[2:].isnan().all()


def test_auto_uses_the_cpu_twin(extension):
    args = make_inputs(3, 2, 3, 4, 50, torch.float32, options={"D", "z"})
    assert torch.equal(selective_scan(**args, impl="auto"), selective_scan(**args, impl="cpu"))


def test_auto_falls_back_with_one_warning_when_the_build_fails(monkeypatch):
    monkeypatch.setitem(fused._built, "cpu", fused.BuildError("no compiler here"))
    monkeypatch.setattr(scan, "_warned", set())
    args = make_inputs(3, 2, 3, 4, 50, options={"D", "z"})
    with pytest.warns(UserWarning, match="chunked torch scan instead of the fused one: no compiler here"):
        y = selective_scan(**args, impl="auto")
    assert torch.equal(y, selective_scan(**args, impl="chunked"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_scan(**args, impl="auto")  # once per process
    with pytest.raises(fused.BuildError, match="no compiler here"):
        selective_scan(**args, impl="cpu")  # asked for by name: an error, never a silent fallback


def test_fused_impl_needs_its_device():
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in make_inputs(0, 1, 2, 3, 5).items()}
    with pytest.raises(ValueError, match="impl='cpu' needs tensors on the cpu device, u is on meta"):
        selective_scan(**args, impl="cpu")
    with pytest.raises(ValueError, match="impl='cuda' needs tensors on the cuda device"):
        selective_scan(**make_inputs(0, 1, 2, 3, 5), impl="cuda")


def test_cuda_build_says_why_it_cannot(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: the CUDA extension can be built here")
    monkeypatch.delitem(fused._built, "cuda", raising=False)
    with pytest.raises(fused.BuildError, match="needs a CUDA build of torch"):
        fused.load("cuda")


# --------------------------------------------------------------------- bad inputs to the raw entry points

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
GOOD = make_inputs(0, 2, 3, 4, 70, torch.float32, "selective", "grouped", {"D", "z", "delta_bias", "initial_state"})


def _corrupt(t, how):
    if how == "dtype":
        return t.double()
    if how == "int":
        return t.to(torch.int32)
    if how == "device":
        return t.to("meta")
    if how == "non-contiguous":
        return torch.stack([t, t], dim=-1)[..., 0] if t.dim() > 0 else t
    if how == "grow":
        return torch.cat([t, t[:1]]) if t.dim() > 0 else t
    if how == "extra dim":
        return t[None]
    if how == "empty L":
        return t[..., :0]
    raise ValueError(how)


@given(name=st.sampled_from(ARG_NAMES), how=st.sampled_from(
    ["dtype", "int", "device", "non-contiguous", "grow", "extra dim", "empty L"]))  # fmt: skip
def test_bad_inputs_are_clean_errors(extension, name, how):
    """Any one corrupted argument to the raw forward and backward: a RuntimeError naming it, never a crash."""
    args = dict(GOOD)
    args[name] = _corrupt(args[name], how)
    if how == "non-contiguous" and args[name].is_contiguous():
        return  # a (dim,) or single-element tensor: no non-contiguous version of it to test
    positional = [args[k] for k in ARG_NAMES]
    expected = r"^\w+ must" if name == "u" else f"^{name} must"  # a changed u makes another argument mismatch
    with pytest.raises(RuntimeError, match=expected):
        extension.forward(*positional, True, True)
    good = [GOOD[k] for k in ARG_NAMES]
    _, _, chunk_states = extension.forward(*good, True, True)
    grad_y = torch.ones_like(GOOD["u"])
    with pytest.raises(RuntimeError, match=expected):
        extension.backward(*positional, True, chunk_states, grad_y, None)


@pytest.mark.parametrize("name", ["chunk_states", "grad_y", "grad_last_state"])
@pytest.mark.parametrize("how", ["dtype", "non-contiguous", "grow", "extra dim"])
def test_bad_backward_inputs_are_clean_errors(extension, name, how):
    good = [GOOD[k] for k in ARG_NAMES]
    y, last, chunk_states = extension.forward(*good, True, True)
    extra = dict(chunk_states=chunk_states, grad_y=torch.ones_like(y), grad_last_state=torch.ones_like(last))
    extra[name] = _corrupt(extra[name], how)
    if how == "non-contiguous" and extra[name].is_contiguous():
        return
    with pytest.raises(RuntimeError, match=f"{name} must"):
        extension.backward(*good, True, *extra.values())


def test_missing_required_tensor_is_a_type_error(extension):
    with pytest.raises(TypeError):
        extension.forward(*[None if k == "B" else GOOD[k] for k in ARG_NAMES], True, False)


# ------------------------------------------------------------------------------------------ CUDA kernel


@needs_gpu
@settings(max_examples=max(10, settings().max_examples // 3))
@given(dtype=dtypes, batch=batch_size, dim=channels, N=d_state, L=st.integers(1, 1500), seed=seeds,
       b_kind=bc_kinds, c_kind=bc_kinds, options=option_sets)  # fmt: skip
def test_cuda_matches_the_reference(dtype, batch, dim, N, L, seed, b_kind, c_kind, options):
    """Forward and every gradient, with L crossing the kernel's 512-step chunks."""
    args = make_inputs(seed, batch, dim, N, L, dtype, b_kind, c_kind, options)
    on_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    y, last = selective_scan(**on_gpu, return_last_state=True, impl="cuda")
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert_close(y, y_ref, TOL[dtype], "cuda y")
    assert_close(last, last_ref, TOL[dtype], "cuda last state")
    expected = gradients({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}, "sequential")
    for name, grad in gradients(on_gpu, "cuda").items():
        assert_close(grad, expected[name], GRAD_TOL[dtype], f"cuda grad {name}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_long_sequence_matches_the_reference(dtype):
    args = make_inputs(1, 2, 4, 16, 4096, dtype, options={"D", "z", "delta_bias", "delta_softplus", "initial_state"})
    y, last = selective_scan(**{k: v.cuda() for k, v in args.items() if isinstance(v, torch.Tensor)},
                             delta_softplus=True, return_last_state=True, impl="cuda")  # fmt: skip
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert_close(y, y_ref, TOL[dtype], "cuda y")
    assert_close(last, last_ref, TOL[dtype], "cuda last state")


@needs_gpu
@settings(max_examples=5)
@given(b_kind=bc_kinds, seed=seeds, L=st.sampled_from([1, 9, 511, 512, 513]))
def test_cuda_gradcheck(b_kind, seed, L):
    args = make_inputs(seed, 1, 2, 2, L, torch.float64, b_kind, "selective", {"D", "z", "delta_bias"})
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        kwargs = dict(zip(names, tensors, strict=True))
        return selective_scan(**kwargs, delta_softplus=True, return_last_state=True, impl="cuda")

    assert torch.autograd.gradcheck(f, tuple(args[k].cuda().requires_grad_() for k in names))


@needs_gpu
def test_cuda_kernel_constants_are_the_compiled_ones():
    """The CUDA forward saves one state every kCudaThreads · kCudaItems steps (its chunk), as the sources say."""
    k = fused.kernel_constants()
    chunk = k["kCudaThreads"] * k["kCudaItems"]
    for L in (1, chunk, chunk + 1, 2 * chunk + 3):
        assert _chunks_saved(fused.load("cuda"), L, "cuda") == -(-L // chunk), L


# ----------------------------------------------------------------------------------- nvcc compile check


def _nvcc():
    found = shutil.which("nvcc")
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return found or (str(home) if home.exists() else None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not on PATH nor at $CUDA_HOME/bin/nvcc")
def test_cuda_source_compiles_cleanly(tmp_path):
    """nvcc -c for sm_80 and sm_90, warnings as errors; prints each kernel's registers and spills."""
    command = [_nvcc(), "-std=c++17", "-O3", "-Xptxas", "-v", "-Werror", "all-warnings", "-c"]
    command += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    command += [str(fused.CUDA_DIR / "selective_scan.cu"), "-o", str(tmp_path / "selective_scan.o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?Used (\d+) registers", done.stderr, re.S)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    for (kernel, arch, registers), (stores, loads) in zip(report, spills, strict=True):
        direction, dtype = re.search(r"(forward|backward)_kernelI([fd])", kernel).groups()
        name = f"{direction} {dict(f='float', d='double')[dtype]}"
        print(f"{arch} {name:16s} {registers:>4} registers, spills: {stores} B stored, {loads} B loaded")
    assert len(report) == 8, done.stderr  # forward and backward, float and double, two architectures
