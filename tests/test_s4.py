"""Property tests of the torch S4D layer (minijamba.s4) against the float64 NumPy reference and itself.

The ladder: the layer's discretization and kernel equal the reference's, channel by channel; its convolution
mode equals its recurrent mode (float64 and float32) and its step loop; it is causal; and gradients reach
every parameter, the same in both modes.
"""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import reference as ref
from minijamba.s4 import S4D

d_model = st.integers(1, 4)
d_state = st.integers(1, 16)
seq_len = st.integers(1, 64)
batch_size = st.integers(1, 3)
seeds = st.integers(0, 2**32 - 1)
inits = st.sampled_from(["lin", "real"])
discretizations = st.sampled_from(["zoh", "bilinear"])


@st.composite
def dt_range(draw):
    """(dt_min, dt_max) with 1e-4 <= dt_min < dt_max <= 1: from slow channels to Δ|A| well past 2."""
    dt_min = draw(st.floats(1e-4, 0.5))
    dt_max = draw(st.floats(dt_min * 1.01, 1.0))
    return dt_min, dt_max


def make_layer(H, N, init, discretization, dt, seed, dtype=torch.float64):
    """An S4D layer whose A is moved off its structured init (every channel alike) to a random stable A."""
    layer = S4D(H, N, init, discretization, dt_min=dt[0], dt_max=dt[1], dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        layer.log_A_real.add_(0.5 * torch.randn(H, N, generator=gen, dtype=dtype))  # Re A stays < 0
        if init == "lin":
            layer.A_imag.add_(torch.randn(H, N, generator=gen, dtype=dtype))
    return layer


def random_input(batch, H, L, seed, dtype=torch.float64):
    return torch.randn(batch, H, L, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype)


def as_numpy(layer):
    """The layer's continuous system as float64 NumPy: A, B, C (H, N), delta, D (H,)."""
    with torch.no_grad():
        return tuple(t.numpy() for t in (layer.A(), layer.B, layer.C(), layer.delta(), layer.D))


def conj_factor(init):
    """2 for S4D-Lin (N complex modes stand for N conjugate pairs), 1 for S4D-Real; not read off the layer."""
    return 2.0 if init == "lin" else 1.0


def reference_discrete(layer):
    A, B, _, delta, _ = as_numpy(layer)
    diag = ref.discretize_zoh_diag if layer.discretization == "zoh" else ref.discretize_bilinear_diag
    return diag(A, B, delta[:, None])


# ---------------------------------------------------------------------------------------------------------
# The layer against the NumPy reference
# ---------------------------------------------------------------------------------------------------------


@given(H=d_model, N=d_state, L=seq_len, init=inits, disc=discretizations, dt=dt_range(), seed=seeds)
def test_discrete_and_kernel_match_reference(H, N, L, init, disc, dt, seed):
    layer = make_layer(H, N, init, disc, dt, seed)
    A_bar_ref, B_bar_ref = reference_discrete(layer)
    A_bar, B_bar = layer.discrete()
    assert_close(A_bar, A_bar_ref, "s4d_vs_reference", "A_bar")
    assert_close(B_bar, B_bar_ref, "s4d_vs_reference", "B_bar")

    C = as_numpy(layer)[2]
    K_ref = np.stack([ref.ssm_kernel(A_bar_ref[h], B_bar_ref[h], C[h], L) for h in range(H)])  # (H, L)
    assert_close(layer.kernel(L), conj_factor(init) * K_ref.real, "s4d_vs_reference", "kernel")


@given(
    H=d_model,
    N=d_state,
    L=seq_len,
    batch=batch_size,
    init=inits,
    disc=discretizations,
    dt=dt_range(),
    seed=seeds,
)
def test_forward_matches_reference_recurrence(H, N, L, batch, init, disc, dt, seed):
    """Both modes against y = c · Re(reference recurrence) + D u, channel by channel."""
    layer = make_layer(H, N, init, disc, dt, seed)
    u = random_input(batch, H, L, seed)
    A_bar, B_bar = reference_discrete(layer)
    _, _, C, _, D = as_numpy(layer)
    u_np = u.numpy()
    y_ref = np.stack(
        [ref.ssm_recurrence(A_bar[h], B_bar[h], C[h], u_np[:, h]).real for h in range(H)], axis=1
    )  # (batch, H, L)
    y_ref = conj_factor(init) * y_ref + D[:, None] * u_np
    with torch.no_grad():
        assert_close(layer(u, mode="recurrent"), y_ref, "s4d_vs_reference", "recurrent vs reference")
        assert_close(layer(u, mode="conv"), y_ref, "s4d_modes_float64", "conv vs reference")


@given(N=d_state, L=seq_len, disc=discretizations, dt=dt_range(), seed=seeds)
def test_lin_conj_factor_is_the_conjugate_pair(N, L, disc, dt, seed):
    """2·Re(sum over N modes) is the kernel of the 2N-state system that holds each mode and its conjugate."""
    layer = make_layer(1, N, "lin", disc, dt, seed)
    A_bar, B_bar = reference_discrete(layer)
    C = as_numpy(layer)[2]
    pairs = [np.concatenate([v[0], v[0].conj()]) for v in (A_bar, B_bar, C)]  # (2N,) each
    K_pairs = ref.ssm_kernel(*pairs, L)
    assert_close(K_pairs.imag, np.zeros(L), "s4d_vs_reference", "imaginary part of the paired kernel")
    assert_close(layer.kernel(L)[0], K_pairs.real, "s4d_vs_reference", "kernel vs conjugate pairs")


@pytest.mark.parametrize("init", ["lin", "real"])
def test_init_is_the_reference_init(init):
    """At init, every channel's A is reference.s4d_lin / s4d_real, and Δ lies in [dt_min, dt_max]."""
    layer = S4D(3, 8, init=init, dt_min=1e-3, dt_max=1e-1, dtype=torch.float64, seed=0)
    A_ref = ref.s4d_lin(8) if init == "lin" else ref.s4d_real(8)
    assert_close(layer.A(), np.broadcast_to(A_ref, (3, 8)), "s4d_vs_reference", "A at init")
    assert layer.A().is_complex() == (init == "lin") == layer.C().is_complex()
    assert ((1e-3 <= layer.delta()) & (layer.delta() <= 1e-1)).all()
    assert "B" in dict(layer.named_buffers()) and "B" not in dict(layer.named_parameters())
    assert torch.equal(layer.B, torch.ones(3, 8, dtype=torch.float64))
    twin = S4D(3, 8, init=init, dtype=torch.float64, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), twin.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Convolution mode == recurrent mode == step loop; causality
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "kind"), [(torch.float64, "s4d_modes_float64"), (torch.float32, "s4d_modes_float32")]
)
@given(
    H=d_model,
    N=d_state,
    L=seq_len,
    batch=batch_size,
    init=inits,
    disc=discretizations,
    dt=dt_range(),
    seed=seeds,
)
def test_conv_mode_equals_recurrent_mode(dtype, kind, H, N, L, batch, init, disc, dt, seed):
    layer = make_layer(H, N, init, disc, dt, seed, dtype=dtype)
    u = random_input(batch, H, L, seed, dtype=dtype)
    with torch.no_grad():
        y_conv, y_rec = layer(u, mode="conv"), layer(u, mode="recurrent")
    assert y_conv.dtype == y_rec.dtype == dtype and y_conv.shape == (batch, H, L)
    assert_close(y_conv, y_rec, kind, f"conv vs recurrent ({dtype})")


@given(
    H=d_model,
    N=d_state,
    L=seq_len,
    batch=batch_size,
    init=inits,
    disc=discretizations,
    dt=dt_range(),
    seed=seeds,
)
def test_step_loop_equals_recurrent_mode_and_reference_state(H, N, L, batch, init, disc, dt, seed):
    """Stepping by hand gives forward(mode="recurrent"), and the last state is the reference's x_L."""
    layer = make_layer(H, N, init, disc, dt, seed)
    u = random_input(batch, H, L, seed)
    with torch.no_grad():
        state = layer.initial_state(batch)
        assert state.shape == (batch, H, N) and state.is_complex() == (init == "lin") and not state.any()
        ys = []
        for t in range(L):
            y_t, state = layer.step(u[:, :, t], state)
            ys.append(y_t)
        assert torch.equal(torch.stack(ys, dim=-1), layer(u, mode="recurrent"))
    A_bar, B_bar = reference_discrete(layer)
    C = as_numpy(layer)[2]
    u_np = u.numpy()
    x_ref = np.empty((batch, H, N), dtype=np.complex128)
    for h in range(H):
        _, x_ref[:, h] = ref.ssm_recurrence(A_bar[h], B_bar[h], C[h], u_np[:, h], return_last_state=True)
    assert_close(state, x_ref, "s4d_vs_reference", "last state")


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@given(
    H=d_model,
    N=d_state,
    L=seq_len,
    batch=batch_size,
    init=inits,
    disc=discretizations,
    seed=seeds,
    data=st.data(),
)
def test_causality(mode, H, N, L, batch, init, disc, seed, data):
    """Changing u[..., t] leaves y[..., :t] unchanged (exactly for the recurrence, to rounding for FFTs)."""
    t = data.draw(st.integers(0, L - 1), label="t")
    layer = make_layer(H, N, init, disc, (1e-3, 1e-1), seed)
    u = random_input(batch, H, L, seed)
    u_changed = u.clone()
    u_changed[..., t] += 1.0 + torch.rand(batch, H, dtype=u.dtype)
    with torch.no_grad():
        y, y_changed = layer(u, mode=mode), layer(u_changed, mode=mode)
    if mode == "recurrent":
        assert torch.equal(y_changed[..., :t], y[..., :t])
    else:
        assert_close(y_changed[..., :t], y[..., :t], "s4d_modes_float64", "y before the change")
    assert not torch.allclose(y_changed[..., t], y[..., t]), "the change at t must reach y[..., t]"


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


def parameter_grads(layer, u, mode):
    layer.zero_grad()
    weights = torch.linspace(-1, 1, u.shape[-1], dtype=u.dtype)  # a loss that depends on every position
    (layer(u, mode=mode) * weights).square().sum().backward()
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("init", ["lin", "real"])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_gradients_reach_every_parameter_and_agree_across_modes(dtype, init, disc):
    layer = make_layer(3, 5, init, disc, (1e-2, 5e-1), seed=7, dtype=dtype)
    expected = {"log_dt", "log_A_real", "C_real", "D"} | ({"A_imag", "C_imag"} if init == "lin" else set())
    assert {name for name, _ in layer.named_parameters()} == expected
    u = random_input(2, 3, 12, seed=7, dtype=dtype)
    grads = {mode: parameter_grads(layer, u, mode) for mode in ("conv", "recurrent")}
    kind = "s4d_modes_float64" if dtype == torch.float64 else "s4d_modes_float32"
    for name, g in grads["conv"].items():
        assert g.dtype == dtype and torch.isfinite(g).all() and (g != 0).all(), f"{name}: {g}"
        assert_close(g, grads["recurrent"][name], kind, f"d loss / d {name}, conv vs recurrent")


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@pytest.mark.parametrize("init", ["lin", "real"])
@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_gradcheck_parameters(mode, init, disc):
    """Analytic gradients (complex exp, log, expm1, FFT) equal finite differences, float64, tiny shapes."""
    layer = make_layer(2, 3, init, disc, (1e-2, 5e-1), seed=3)
    u = random_input(1, 2, 5, seed=3)
    names = [name for name, _ in layer.named_parameters()]

    def f(*params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (u,), {"mode": mode})

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradcheck(f, params)


# ---------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 0}, "d_model"),
        ({"d_model": 2.0}, "d_model"),
        ({"d_state": 0}, "d_state"),
        ({"d_state": True}, "d_state"),
        ({"init": "hippo"}, "init"),
        ({"discretization": "euler"}, "discretization"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_min": -1e-3}, "dt_min"),
        ({"dt_min": 1e-2, "dt_max": 1e-2}, "dt_max"),
        ({"dt_min": 1e-1, "dt_max": 1e-3}, "dt_max"),
        ({"dt_min": float("nan")}, "dt_min"),
        ({"dt_max": float("inf")}, "dt_max"),
        ({"dtype": torch.float16}, "dtype"),
        ({"dtype": torch.complex64}, "dtype"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"d_model": 2, "d_state": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        S4D(**args)


def test_bad_call_arguments():
    layer = S4D(2, 4, seed=0)
    u = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="mode"):
        layer(u, mode="scan")
    with pytest.raises(ValueError, match="u must"):
        layer(u[0])
    with pytest.raises(ValueError, match="u must have d_model=2"):
        layer(torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="u must"):
        layer(torch.randn(1, 2, 0))
    for L in (0, 2.0):
        with pytest.raises(ValueError, match="L must"):
            layer.kernel(L)
    with pytest.raises(ValueError, match="batch"):
        layer.initial_state(0)
    state = layer.initial_state(1)
    with pytest.raises(ValueError, match="u_t"):
        layer.step(torch.randn(1, 3), state)
    with pytest.raises(ValueError, match="state"):
        layer.step(torch.randn(1, 2), layer.initial_state(2))
