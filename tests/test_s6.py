"""Tests of the S6 layer: forward against the float64 reference, step against forward, state hand-over, init.

The reference is fed the layer's own Δ, B, C (from `ssm_parameters`), A and D, so these tests check how the layer
wires them into the scan; the scan itself is tested against the reference in test_scan.py.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import fused
from minijamba import reference as ref
from minijamba.jamba import JambaConfig
from minijamba.mamba import MambaConfig
from minijamba.s6 import SelectiveSSM, auto_dt_rank

batch = st.integers(1, 3)
d_inner = st.integers(1, 8)
d_state = st.integers(1, 8)
seq_len = st.integers(1, 24)
seeds = st.integers(0, 2**31 - 1)
selective = st.booleans()

TOL = {torch.float64: "scan_float64", torch.float32: "scan_float32"}


def make_layer(d_inner, d_state, selective, seed, dtype=torch.float64, **kwargs):
    """A layer with every parameter moved off its init, so a swapped A, B, C or D cannot hide behind ones."""
    torch.manual_seed(seed)
    layer = SelectiveSSM(d_inner, d_state, selective=selective, **kwargs).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def inputs(batch, d_inner, L, seed, dtype=torch.float64):
    return torch.randn(batch, d_inner, L, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def as_numpy(t):
    return t.detach().numpy()


@given(batch=batch, d_inner=d_inner, d_state=d_state, L=seq_len, selective=selective, seed=seeds)
def test_forward_matches_reference(batch, d_inner, d_state, L, selective, seed):
    layer = make_layer(d_inner, d_state, selective, seed)
    u = inputs(batch, d_inner, L, seed)
    y, last = layer(u, return_last_state=True)
    delta, B, C = layer.ssm_parameters(u)
    A = -torch.exp(layer.A_log)
    y_ref, last_ref = ref.selective_scan_ref(
        *(as_numpy(t) for t in (u, delta, A, B, C, layer.D)), return_last_state=True
    )
    assert_close(y, y_ref, "scan_float64", "y vs reference")
    assert_close(last, last_ref, "scan_float64", "last state vs reference")


@given(batch=batch, d_inner=d_inner, d_state=d_state, L=seq_len, selective=selective, seed=seeds)
def test_ssm_parameters(batch, d_inner, d_state, L, selective, seed):
    """Δ > 0 always; selective B, C are (batch, N, L); the LTI Δ, B, C ignore u."""
    layer = make_layer(d_inner, d_state, selective, seed)
    u = inputs(batch, d_inner, L, seed)
    delta, B, C = layer.ssm_parameters(u)
    assert delta.shape == (batch, d_inner, L) and bool((delta > 0).all())
    if selective:
        assert B.shape == C.shape == (batch, d_state, L)
    else:
        assert B.shape == C.shape == (d_inner, d_state)
        delta2, B2, C2 = layer.ssm_parameters(3 * u + 1)
        assert torch.equal(delta, delta2) and torch.equal(B, B2) and torch.equal(C, C2)
        assert torch.equal(delta, delta[:1, :, :1].expand_as(delta)), "one Δ per channel, exactly"


@given(batch=batch, d_inner=d_inner, d_state=d_state, L=seq_len, seed=seeds)
def test_ssm_parameters_are_the_papers_projections(batch, d_inner, d_state, L, seed):
    """Algorithm 2 written out in NumPy from the weights: s_B(u) = W_B u, s_C(u) = W_C u, and
    Δ = softplus(W_up W_down u + bias), W_down the first dt_rank rows of x_proj, W_up = dt_proj."""
    layer = make_layer(d_inner, d_state, True, seed)
    u = inputs(batch, d_inner, L, seed)
    R, W = layer.dt_rank, as_numpy(layer.x_proj.weight)  # (R + 2N, d_inner)
    W_down, W_B, W_C = W[:R], W[R : R + d_state], W[R + d_state :]
    u_np = as_numpy(u)
    low_rank = np.einsum("rd,bdl->brl", W_down, u_np)  # (batch, R, L)
    dt = np.einsum("dr,brl->bdl", as_numpy(layer.dt_proj.weight), low_rank) + as_numpy(layer.dt_proj.bias)[:, None]
    delta, B, C = layer.ssm_parameters(u)
    assert_close(delta, ref.softplus(dt), "scan_float64", "delta")
    assert_close(B, np.einsum("nd,bdl->bnl", W_B, u_np), "scan_float64", "B")
    assert_close(C, np.einsum("nd,bdl->bnl", W_C, u_np), "scan_float64", "C")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(batch=batch, d_inner=d_inner, d_state=d_state, L=seq_len, selective=selective, seed=seeds)
def test_step_matches_forward(dtype, batch, d_inner, d_state, L, selective, seed):
    layer = make_layer(d_inner, d_state, selective, seed, dtype)
    u = inputs(batch, d_inner, L, seed, dtype)
    y, last = layer(u, return_last_state=True)
    state, ys = None, []
    for t in range(L):
        y_t, state = layer.step(u[:, :, t], state)  # (batch, d_inner), (batch, d_inner, N)
        ys.append(y_t)
    assert_close(torch.stack(ys, dim=-1), y, TOL[dtype], "step-by-step y vs forward")
    assert_close(state, last, TOL[dtype], "step-by-step state vs forward")


@given(
    batch=batch,
    d_inner=d_inner,
    d_state=d_state,
    L=st.integers(2, 24),
    selective=selective,
    seed=seeds,
    data=st.data(),
)
def test_initial_state_continues_a_run(batch, d_inner, d_state, L, selective, seed, data):
    """forward on u equals forward on u[:k], then on u[k:] from the state u[:k] ended in."""
    k = data.draw(st.integers(1, L - 1), label="k")
    layer = make_layer(d_inner, d_state, selective, seed)
    u = inputs(batch, d_inner, L, seed)
    y, last = layer(u, return_last_state=True)
    y1, state = layer(u[:, :, :k], return_last_state=True)
    y2, last2 = layer(u[:, :, k:], initial_state=state, return_last_state=True)
    assert_close(torch.cat([y1, y2], dim=-1), y, "scan_float64", "split run vs whole run")
    assert_close(last2, last, "scan_float64", "split run's last state")


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize("scan_impl", ["sequential", "chunked", "cpu"])
def test_gradcheck(selective, scan_impl):
    """Gradients with respect to the input and the initial state, in float64 on a tiny layer: through a torch
    scan (chunked is the layer's default) and through the fused CPU twin, which training's "auto" picks."""
    if scan_impl == "cpu":
        try:
            fused.load("cpu")
        except fused.BuildError as error:
            pytest.skip(f"the fused CPU scan cannot be built here: {error}")
    layer = make_layer(3, 2, selective, seed=0, scan_impl=scan_impl)
    u = inputs(2, 3, 5, seed=1).requires_grad_()
    x0 = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, x0: layer(u, initial_state=x0, return_last_state=True), (u, x0))


@pytest.mark.parametrize("selective", [True, False])
def test_every_parameter_gets_a_gradient(selective):
    layer = make_layer(6, 4, selective, seed=0)
    layer(inputs(2, 6, 7, seed=1)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# ---------------------------------------------------------------------------------------------------------
# Initialisation (Mamba's, see NOTES.md) and argument checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("selective", [True, False])
@pytest.mark.parametrize(("dt_min", "dt_max", "dt_init_floor"), [(1e-3, 1e-1, 1e-4), (1e-6, 1e-4, 1e-5)])
def test_init(selective, dt_min, dt_max, dt_init_floor):
    torch.manual_seed(0)
    d_inner, N = 200, 5
    layer = SelectiveSSM(d_inner, N, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, selective=selective)
    bias = layer.dt_proj.bias if selective else layer.dt_bias
    dt = torch.nn.functional.softplus(bias.double())  # (d_inner,)
    low = max(dt_min, dt_init_floor)
    assert bool((dt >= low * (1 - 1e-5)).all() and (dt <= dt_max * (1 + 1e-5)).all()), (dt.min(), dt.max())
    assert bias._no_reinit is True
    assert torch.equal(layer.A_log, torch.log(torch.arange(1.0, N + 1)).repeat(d_inner, 1))
    assert torch.equal(layer.D, torch.ones(d_inner))
    assert layer.A_log._no_weight_decay is True and layer.D._no_weight_decay is True
    if selective:
        bound = layer.dt_rank**-0.5
        assert bool((layer.dt_proj.weight.abs() <= bound).all())
        assert layer.x_proj.weight.shape == (layer.dt_rank + 2 * N, d_inner) and layer.x_proj.bias is None


def test_dt_rank_is_an_int_and_auto_has_one_meaning():
    """The layer's dt_rank is an int, 1 by default (the paper's R); "auto" is Mamba's ceil(d_model / 16) wherever
    it is accepted: auto_dt_rank, which both model configs apply."""
    assert SelectiveSSM(64, 2).dt_rank == 1
    assert SelectiveSSM(8, 2, dt_rank=3).dt_proj.weight.shape == (8, 3)
    assert [auto_dt_rank(d_model) for d_model in (1, 16, 17, 768, 4096)] == [1, 1, 2, 48, 256]
    for d_model in (8, 16, 17, 768):
        assert auto_dt_rank(d_model) == math.ceil(d_model / 16)
        assert MambaConfig(d_model=d_model).dt_rank == auto_dt_rank(d_model)
        assert JambaConfig(hidden_size=4 * d_model).mamba_dt_rank == auto_dt_rank(4 * d_model)
    with pytest.raises(ValueError, match=r"dt_rank must be an int: .* auto_dt_rank\(d_model\)"):
        SelectiveSSM(8, 2, dt_rank="auto")


def test_the_default_scan_is_the_chunked_torch_scan():
    assert SelectiveSSM(4, 2).scan_impl == "chunked"


def test_float32_ssm_parameters_under_float64():
    """A_log and D stay float32 in a float32 layer, and follow a float64 one (the scan needs one dtype)."""
    assert SelectiveSSM(4, 2).A_log.dtype == torch.float32
    assert SelectiveSSM(4, 2, dtype=torch.float64).A_log.dtype == torch.float64
    assert SelectiveSSM(4, 2, dtype=torch.float64).D.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"d_inner": 0}, "d_inner"),
        ({"d_inner": 2.0}, "d_inner"),
        ({"d_state": 0}, "d_state"),
        ({"dt_rank": 0}, "dt_rank"),
        ({"dt_rank": "full"}, "dt_rank"),
        ({"dt_rank": "auto"}, "dt_rank"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_max": -1.0}, "dt_max"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_max"),
        ({"dt_init_floor": -1e-4}, "dt_init_floor"),
        ({"selective": 1}, "selective"),
        ({"scan_impl": "cuda-magic"}, "scan_impl"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SelectiveSSM(**{"d_inner": 4, **kwargs})


def test_bad_inputs_raise():
    layer = SelectiveSSM(4, 2)
    with pytest.raises(ValueError, match="u"):
        layer(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="u"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="u_t"):
        layer.step(torch.randn(2, 4, 1), None)
    with pytest.raises(ValueError, match="state"):
        layer.step(torch.randn(2, 4), torch.zeros(2, 4, 3))
