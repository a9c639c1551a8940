"""Every torch selective scan against the float64 NumPy reference, its gradients, and its edge cases."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import reference as ref
from minijamba.scan import IMPLS, selective_scan

impls = st.sampled_from(sorted(IMPLS))
batch_size = st.integers(1, 3)
channels = st.integers(1, 8)
d_state = st.integers(1, 16)
seq_len = st.integers(1, 300)
seeds = st.integers(0, 2**32 - 1)
bc_kinds = st.sampled_from(["invariant", "selective", "grouped"])
dtypes = st.sampled_from([torch.float32, torch.float64])
TOL = {torch.float32: "scan_float32", torch.float64: "scan_float64"}


def make_inputs(seed, batch, dim, N, L, dtype=torch.float64, b_kind="selective", c_kind="selective", options=()):
    """Random scan arguments in the regime Mamba runs in: A = -exp(.) < 0 and a positive step delta.

    With delta_softplus, delta and delta_bias are drawn of either sign (softplus makes the step positive);
    without, |N(0, 1)|. A
    negative step would make |A_bar| > 1 and the state grow like e^L: true maths, but no float32 test.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    groups = next(G for G in (3, 2, 1) if dim % G == 0)

    def bc(kind):
        return {"invariant": (dim, N), "selective": (batch, N, L), "grouped": (batch, groups, N, L)}[kind]

    args = dict(
        u=randn(batch, dim, L),
        delta=randn(batch, dim, L) if "delta_softplus" in options else randn(batch, dim, L).abs(),
        A=-torch.exp(randn(dim, N)),
        B=randn(*bc(b_kind)),
        C=randn(*bc(c_kind)),
    )
    if "D" in options:
        args["D"] = randn(dim)
    if "z" in options:
        args["z"] = randn(batch, dim, L)
    if "delta_bias" in options:
        args["delta_bias"] = randn(dim) if "delta_softplus" in options else randn(dim).abs()
    if "delta_softplus" in options:
        args["delta_softplus"] = True
    if "initial_state" in options:
        args["initial_state"] = randn(batch, dim, N)
    return args


def reference_of(args, **extra):
    """Run the NumPy oracle on the same numbers, in float64."""
    np_args = {k: v.double().numpy() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return ref.selective_scan_ref(**np_args, **extra)


option_sets = st.sets(st.sampled_from(["D", "z", "delta_bias", "delta_softplus", "initial_state"]))


@given(
    impl=impls,
    dtype=dtypes,
    batch=batch_size,
    dim=channels,
    N=d_state,
    L=seq_len,
    seed=seeds,
    b_kind=bc_kinds,
    c_kind=bc_kinds,
    options=option_sets,
)
def test_every_impl_matches_the_reference(impl, dtype, batch, dim, N, L, seed, b_kind, c_kind, options):
    args = make_inputs(seed, batch, dim, N, L, dtype, b_kind, c_kind, options)
    y, last = selective_scan(**args, return_last_state=True, impl=impl)
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert y.dtype == dtype and last.dtype == dtype
    assert_close(y, y_ref, TOL[dtype], f"{impl} y")
    assert_close(last, last_ref, TOL[dtype], f"{impl} last state")


@pytest.mark.parametrize("impl", ["parallel", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_sequence_matches_the_reference(impl, dtype):
    """L = 4096 with Mamba's delta range: where cumulative-product scans lose their digits, ours must not."""
    args = make_inputs(1, 1, 4, 16, 4096, dtype, options={"D", "z", "delta_bias", "delta_softplus"})
    y, last = selective_scan(**args, return_last_state=True, impl=impl)
    y_ref, last_ref = reference_of(args, return_last_state=True)
    assert_close(y, y_ref, TOL[dtype], f"{impl} y")
    assert_close(last, last_ref, TOL[dtype], f"{impl} last state")


@settings(max_examples=10)
@given(impl=impls, b_kind=bc_kinds, c_kind=bc_kinds, seed=seeds, L=st.integers(1, 9))
def test_gradcheck(impl, b_kind, c_kind, seed, L):
    """Analytic gradients == finite differences, float64, for every input that takes a gradient."""
    args = make_inputs(seed, 2, 2, 3, L, torch.float64, b_kind, c_kind, {"D", "z", "delta_bias", "initial_state"})
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        return selective_scan(
            **dict(zip(names, tensors, strict=True)), delta_softplus=True, return_last_state=True, impl=impl
        )

    inputs = tuple(args[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs)


@given(impl=impls, dtype=dtypes, L=st.integers(2, 200), seed=seeds, b_kind=bc_kinds, data=st.data())
def test_split_scan_continues_from_the_last_state(impl, dtype, L, seed, b_kind, data):
    """Scanning [u1, u2] == scanning u1, then u2 from u1's last state (the basis of O(1) inference)."""
    args = make_inputs(seed, 2, 3, 4, L, dtype, b_kind, "selective", {"D", "delta_bias", "delta_softplus"})
    k = data.draw(st.integers(1, L - 1), label="k")

    def part(sl):
        cut = {
            n: v[..., sl] if n in ("u", "delta") or (n in ("B", "C") and v.dim() > 2) else v for n, v in args.items()
        }
        return cut

    y, last = selective_scan(**args, return_last_state=True, impl=impl)
    y1, state = selective_scan(**part(slice(0, k)), return_last_state=True, impl=impl)
    y2, last2 = selective_scan(**part(slice(k, L)), initial_state=state, return_last_state=True, impl=impl)
    assert_close(torch.cat([y1, y2], dim=-1), y, TOL[dtype], "split y")
    assert_close(last2, last, TOL[dtype], "split last state")


@given(impl=impls, L=st.integers(2, 100), seed=seeds, data=st.data())
def test_causality(impl, L, seed, data):
    """Changing the input at step t leaves every output before t untouched."""
    args = make_inputs(seed, 1, 3, 4, L, options={"z", "D"})
    t = data.draw(st.integers(1, L - 1), label="t")
    y = selective_scan(**args, impl=impl)
    for name in ("u", "delta", "z", "B", "C"):
        changed = {**args, name: args[name].clone()}
        changed[name][..., t:] += 1.0
        assert torch.equal(selective_scan(**changed, impl=impl)[..., :t], y[..., :t]), f"{name} leaked backwards"


def test_chunked_is_finite_at_extremes():
    """delta up to 10 before softplus, A down to -100, L = 65 536: no NaN or inf, forward or backward."""
    L = 65_536
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, L, generator=g)
    delta = torch.empty(1, 2, L).uniform_(-10, 10, generator=g).requires_grad_()
    A = (-torch.logspace(-3, 2, 8)).expand(2, 8).contiguous().requires_grad_()
    B, C = torch.randn(1, 8, L, generator=g), torch.randn(1, 8, L, generator=g)
    y, last = selective_scan(u, delta, A, B, C, delta_softplus=True, return_last_state=True, impl="chunked")
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    (y.square().mean() + last.sum()).backward()
    assert torch.isfinite(delta.grad).all() and torch.isfinite(A.grad).all()


def test_the_default_is_the_chunked_torch_scan():
    args = make_inputs(3, 2, 3, 4, 50, options={"D", "z", "initial_state"})
    assert torch.equal(selective_scan(**args), selective_scan(**args, impl="chunked"))


def test_the_torch_scans_never_import_the_extension_machinery():
    """Importing the scan, the layers and the models built on it, and running an S6 layer with its default scan,
    leaves minijamba.fused (and torch.utils.cpp_extension, which may compile) unimported. In a fresh process, as
    this one may have imported them for another test."""
    program = """
import sys
import torch
import minijamba.scan, minijamba.s6, minijamba.mamba, minijamba.jamba
from minijamba.scan import FUSED_IMPLS
from minijamba.s6 import SelectiveSSM
assert FUSED_IMPLS == ("cpu", "cuda", "cuda-emulated")
SelectiveSSM(4, 2)(torch.randn(1, 4, 3)).sum().backward()
for name in ("minijamba.fused", "torch.utils.cpp_extension"):
    assert name not in sys.modules, name
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_auto_is_a_checked_impl():
    args = make_inputs(3, 2, 3, 4, 50, options={"D", "z"})
    assert_close(selective_scan(**args, impl="auto"), reference_of(args), "scan_float64")


GOOD = make_inputs(0, 2, 3, 4, 5, options={"D", "z", "delta_bias", "initial_state"})
BAD = {
    "impl": ({}, dict(impl="fast")),
    "u": (dict(u=torch.zeros(2, 3)), {}),
    "delta": (dict(delta=torch.zeros(2, 3, 6)), {}),
    "A": (dict(A=torch.zeros(3, 4, 1)), {}),
    "B": (dict(B=torch.zeros(2, 5, 5)), {}),
    "C": (dict(C=torch.zeros(2, 2, 4, 5)), {}),
    "D": (dict(D=torch.zeros(4, dtype=torch.float64)), {}),
    "z": (dict(z=torch.zeros(2, 3, 4, dtype=torch.float64)), {}),
    "delta_bias": (dict(delta_bias=torch.zeros(2, dtype=torch.float64)), {}),
    "initial_state": (dict(initial_state=torch.zeros(2, 3, 5, dtype=torch.float64)), {}),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_shapes_name_the_argument(name):
    tensors, kwargs = BAD[name]
    tensors = {k: v.double() for k, v in tensors.items()}
    with pytest.raises(ValueError, match=rf"^{name} must"):
        selective_scan(**{**GOOD, **tensors}, **kwargs)


@pytest.mark.parametrize("name", ["delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_bad_dtypes_name_the_argument(name):
    with pytest.raises(ValueError, match=rf"^{name} must have u's dtype"):
        selective_scan(**{**GOOD, name: GOOD[name].float()})


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="^u must be float32 or float64"):
        selective_scan(**{**GOOD, "u": GOOD["u"].to(torch.int64)})
    with pytest.raises(ValueError, match="^u must be a torch.Tensor"):
        selective_scan(**{**GOOD, "u": GOOD["u"].numpy()})
    with pytest.raises(ValueError, match="^B must be a torch.Tensor"):
        selective_scan(**{**GOOD, "B": None})
    with pytest.raises(ValueError, match=r"^u must have shape \(batch, dim, L\) with L >= 1"):
        empty = {k: v[..., :0] if k in ("u", "delta", "z") else v for k, v in GOOD.items()}
        selective_scan(**empty)
