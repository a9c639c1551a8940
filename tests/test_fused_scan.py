"""The fused scans of cuda/ against the float64 NumPy reference: the CPU twin, and the CUDA kernels — through
cuda/emulator/ (CUDA's execution model on the CPU) on every machine, and on a GPU where there is one.

Both CPU-side builds happen on first use (minijamba.fused.load); a machine that cannot build them fails these tests
rather than skipping them, so `make test` always checks the kernels it ships. Only the GPU runs skip without one.
"""

import warnings

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


@pytest.fixture(scope="module", params=["cpu", "cuda-emulated"])
def any_extension(request):
    """The CPU twin's build and the emulated CUDA build: one binding, so one set of argument checks."""
    return fused.load(request.param)


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
    with pytest.raises(ValueError, match="impl='cuda-emulated' needs tensors on the cpu device, u is on meta"):
        selective_scan(**args, impl="cuda-emulated")


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
def test_bad_inputs_are_clean_errors(any_extension, name, how):
    """Any one corrupted argument to the raw forward and backward: a RuntimeError naming it, never a crash."""
    args = dict(GOOD)
    args[name] = _corrupt(args[name], how)
    if how == "non-contiguous" and args[name].is_contiguous():
        return  # a (dim,) or single-element tensor: no non-contiguous version of it to test
    positional = [args[k] for k in ARG_NAMES]
    expected = r"^\w+ must" if name == "u" else f"^{name} must"  # a changed u makes another argument mismatch
    with pytest.raises(RuntimeError, match=expected):
        any_extension.forward(*positional, True, True)
    good = [GOOD[k] for k in ARG_NAMES]
    _, _, chunk_states = any_extension.forward(*good, True, True)
    grad_y = torch.ones_like(GOOD["u"])
    with pytest.raises(RuntimeError, match=expected):
        any_extension.backward(*positional, True, chunk_states, grad_y, None)


@pytest.mark.parametrize("name", ["chunk_states", "grad_y", "grad_last_state"])
@pytest.mark.parametrize("how", ["dtype", "non-contiguous", "grow", "extra dim"])
def test_bad_backward_inputs_are_clean_errors(any_extension, name, how):
    good = [GOOD[k] for k in ARG_NAMES]
    y, last, chunk_states = any_extension.forward(*good, True, True)
    extra = dict(chunk_states=chunk_states, grad_y=torch.ones_like(y), grad_last_state=torch.ones_like(last))
    extra[name] = _corrupt(extra[name], how)
    if how == "non-contiguous" and extra[name].is_contiguous():
        return
    with pytest.raises(RuntimeError, match=f"{name} must"):
        any_extension.backward(*good, True, *extra.values())


def test_missing_required_tensor_is_a_type_error(any_extension):
    with pytest.raises(TypeError):
        any_extension.forward(*[None if k == "B" else GOOD[k] for k in ARG_NAMES], True, False)


# ---------------------------------------------------------------------- the CUDA kernels, emulated or on a GPU
#
# One set of test bodies for the kernels of cuda/selective_scan.cu, run through cuda/emulator/ on every machine
# ("cuda-emulated", CPU tensors, every thread schedule the emulator has) and on a GPU where one exists ("cuda").
# The emulator is deterministic for a given schedule; it runs slowly (one fiber per CUDA thread), so the shapes
# stay small except along L, which crosses the kernel's chunk of kCudaThreads · kCudaItems steps.

CUDA_KERNELS = [pytest.param("cuda-emulated", id="emulated"), pytest.param("cuda", marks=needs_gpu, id="gpu")]
KERNEL_CHUNK = fused.kernel_constants()["kCudaThreads"] * fused.kernel_constants()["kCudaItems"]
HALF_TOL = {torch.float16: "scan_float16", torch.bfloat16: "scan_bfloat16"}
# gradcheck on a GPU: the selective and grouped gradients of B and C sum over channels with atomics, so their last
# bits follow the order the blocks finish in; in float64 that order moves a sum of <= dim terms by a few ulps.
GPU_NONDET_TOL = 1e-12


def _schedules():
    return fused.load("cuda-emulated").schedules()


def _on(impl, args):
    device = scan.FUSED_DEVICES[impl]
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@st.composite
def kernel_shapes(draw):
    """(batch, dim, N, L): N up to the kernel's 256 (more states than threads), L across one and two chunks."""
    N = draw(st.sampled_from([1, 2, 3, 8, 16, 17, 33, 129, 256]))
    batch, dim = (1, draw(st.integers(1, 2))) if N > 32 else (draw(st.integers(1, 2)), draw(st.integers(1, 3)))
    L = draw(st.one_of(st.integers(1, 40), st.integers(KERNEL_CHUNK - 2, KERNEL_CHUNK + 2),
                       st.integers(1, 2 * KERNEL_CHUNK + 60)))  # fmt: skip
    if N > 32:
        L = min(L, KERNEL_CHUNK + 60)
    return batch, dim, N, L


def _set_schedule(impl, name, seed):
    if impl == "cuda-emulated":
        fused.load("cuda-emulated").set_schedule(name, seed)


@pytest.mark.parametrize("impl", CUDA_KERNELS)
@settings(max_examples=max(12, settings().max_examples // 5))
@given(dtype=dtypes, shape=kernel_shapes(), seed=seeds, b_kind=bc_kinds, c_kind=bc_kinds, options=option_sets,
       schedule_pick=st.integers(0, 2**16))  # fmt: skip
def test_cuda_kernels_match_the_reference(impl, dtype, shape, seed, b_kind, c_kind, options, schedule_pick):
    """Forward, last state and every gradient against the reference, under a schedule the example picks."""
    batch, dim, N, L = shape
    if impl == "cuda-emulated":
        names = _schedules()
        _set_schedule(impl, names[schedule_pick % len(names)], schedule_pick)
    try:
        args = make_inputs(seed, batch, dim, N, L, dtype, b_kind, c_kind, options)
        y, last = selective_scan(**_on(impl, args), return_last_state=True, impl=impl)
        y_ref, last_ref = reference_of(args, return_last_state=True)
        assert_close(y, y_ref, TOL[dtype], f"{impl} y")
        assert_close(last, last_ref, TOL[dtype], f"{impl} last state")
        double = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        expected = gradients(double, "sequential")
        for name, grad in gradients(_on(impl, args), impl).items():
            assert grad.dtype == dtype
            assert_close(grad, expected[name], GRAD_TOL[dtype], f"{impl} grad {name}")
    finally:
        _set_schedule(impl, "forward", 0)


@pytest.mark.parametrize("impl", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernels_long_sequence(impl, dtype):
    """L over two chunks and a remainder, every option on, forward and gradients."""
    L = 2 * KERNEL_CHUNK + 5
    args = make_inputs(1, 1, 2, 16, L, dtype, options={"D", "z", "delta_bias", "delta_softplus", "initial_state"})
    y, last = selective_scan(**_on(impl, args), return_last_state=True, impl=impl)
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert_close(y, y_ref, TOL[dtype], f"{impl} y")
    assert_close(last, last_ref, TOL[dtype], f"{impl} last state")
    expected = gradients({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}, "sequential")
    for name, grad in gradients(_on(impl, args), impl).items():
        assert_close(grad, expected[name], GRAD_TOL[dtype], f"{impl} grad {name}")


def _half_inputs(seed, dtype, L, b_kind, c_kind, options):
    """Scan arguments with u, delta, z, B, C in 16 bits and A, D, delta_bias, initial_state in float32."""
    args = make_inputs(seed, 2, 3, 8, L, torch.float32, b_kind, c_kind, options)
    return {k: v.to(dtype) if k in ("u", "delta", "z", "B", "C") else v for k, v in args.items()}


@pytest.mark.parametrize("impl", CUDA_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=6)
@given(seed=seeds, L=st.sampled_from([1, 37, KERNEL_CHUNK + 3]), b_kind=bc_kinds, c_kind=bc_kinds,
       options=option_sets)  # fmt: skip
def test_cuda_kernels_take_16_bit_inputs(impl, dtype, seed, L, b_kind, c_kind, options):
    """fp16 and bf16 in, float32 inside, at the official kernel's tolerances; the reference sees the same
    16-bit numbers in float64, so what is measured is the kernel's own rounding."""
    args = _half_inputs(seed, dtype, L, b_kind, c_kind, options)
    y, last = selective_scan(**_on(impl, args), return_last_state=True, impl=impl)
    assert y.dtype == dtype and last.dtype == torch.float32
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert_close(y.float(), y_ref, HALF_TOL[dtype], f"{impl} {dtype} y")
    assert_close(last, last_ref, HALF_TOL[dtype], f"{impl} {dtype} last state")
    expected = gradients({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}, "sequential")
    for name, grad in gradients(_on(impl, args), impl).items():
        assert grad.dtype == args[name].dtype, name
        assert_close(grad.float(), expected[name], HALF_TOL[dtype], f"{impl} {dtype} grad {name}")


@pytest.mark.parametrize("impl", CUDA_KERNELS)
@settings(max_examples=6)
@given(b_kind=bc_kinds, c_kind=bc_kinds, seed=seeds, L=st.sampled_from([1, 9, KERNEL_CHUNK - 1, KERNEL_CHUNK + 1]))
def test_cuda_kernels_gradcheck(impl, b_kind, c_kind, seed, L):
    """Finite differences in float64 (fast mode past one chunk: the emulator is slow), initial_state included."""
    args = make_inputs(seed, 1, 2, 2, L, torch.float64, b_kind, c_kind, {"D", "z", "delta_bias", "initial_state"})
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        kwargs = dict(zip(names, tensors, strict=True))
        return selective_scan(**kwargs, delta_softplus=True, return_last_state=True, impl=impl)

    inputs = tuple(v.requires_grad_() for v in _on(impl, {k: args[k] for k in names}).values())
    nondet_tol = GPU_NONDET_TOL if impl == "cuda" else 0.0  # the emulator repeats a schedule bit for bit
    assert torch.autograd.gradcheck(f, inputs, nondet_tol=nondet_tol, fast_mode=L > 64)


@pytest.mark.parametrize("b_kind", ["invariant", "selective"])
def test_emulated_reductions_do_not_depend_on_the_schedule(b_kind):
    """The gradients reduced inside a block (A, D, delta_bias, time-invariant B and C) come out bit for bit the
    same whatever order the threads and blocks run in: a GPU gives them deterministically, and gradcheck can
    pass there. Only the selective B and C gradients, summed over channels by atomics, may differ in last bits."""
    options = {"D", "z", "delta_bias", "initial_state"}
    args = make_inputs(5, 2, 3, 4, KERNEL_CHUNK + 9, torch.float32, b_kind, b_kind, options)
    runs = []
    for name in _schedules():
        _set_schedule("cuda-emulated", name, 7)
        try:
            runs.append((name, gradients(args, "cuda-emulated")))
        finally:
            _set_schedule("cuda-emulated", "forward", 0)
    deterministic = ["A", "D", "delta_bias", "u", "delta", "z", "initial_state"]
    deterministic += ["B", "C"] if b_kind == "invariant" else []
    (first, base), *others = runs
    for name, grads in others:
        for key in deterministic:
            assert torch.equal(grads[key], base[key]), f"grad {key}: schedule {name} != {first}"
        for key in ("B", "C"):
            assert_close(grads[key], base[key], GRAD_TOL[torch.float32], f"grad {key}: {name} vs {first}")


@pytest.mark.parametrize("impl", CUDA_KERNELS)
def test_cuda_kernels_save_a_state_every_chunk(impl):
    """The CUDA forward saves one state every kCudaThreads · kCudaItems steps, as the sources say (lesson 07)."""
    extension = fused.load(impl)
    for L in (1, KERNEL_CHUNK, KERNEL_CHUNK + 1, 2 * KERNEL_CHUNK + 3):
        assert _chunks_saved(extension, L, scan.FUSED_DEVICES[impl]) == -(-L // KERNEL_CHUNK), L


@pytest.mark.parametrize("impl", CUDA_KERNELS)
def test_cuda_kernels_check_the_launch_limits(impl):
    """gridDim.y is the batch (at most 65535) and the states live in shared memory (N <= 256): checked before
    the launch, naming the argument."""
    device = scan.FUSED_DEVICES[impl]
    big = make_inputs(0, 1, 1, 2, 1)
    wide = {k: (v.expand(65536, *v.shape[1:]).contiguous() if k in ("u", "delta") else v) for k, v in big.items()}
    wide["B"], wide["C"] = big["B"].expand(65536, -1, -1).contiguous(), big["C"].expand(65536, -1, -1).contiguous()
    with pytest.raises(RuntimeError, match="batch"):
        selective_scan(**_on(impl, wide), impl=impl)
    too_many_states = make_inputs(0, 1, 1, 257, 3)
    with pytest.raises(RuntimeError, match="N <= 256"):
        selective_scan(**{k: v.to(device) for k, v in too_many_states.items()}, impl=impl)


def test_emulator_refuses_an_unknown_schedule():
    with pytest.raises(ValueError, match="forward"):
        fused.load("cuda-emulated").set_schedule("backwards", 0)
