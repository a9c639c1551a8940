"""Property tests of the float64 NumPy reference: discretization, kernel, recurrence, convolution, selective scan.

The reference is the oracle for everything else, so it is checked against independent routes to the same
numbers: scipy's expm (when installed), the textbook ZOH formula with A^{-1}, closed forms for diagonal A,
convergence orders, and explicit scalar loops.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import reference as ref

d_state = st.integers(1, 16)
seeds = st.integers(0, 2**32 - 1)
log10_delta = st.floats(-3.0, 1.0)  # delta from 1e-3 to 10: four decades
seq_len = st.integers(1, 64)


def stable_matrix(rng, N, scale=1.0):
    """A random dense A whose eigenvalues all have negative real part.

    Its symmetric part -(G Gᵀ/N + I/2) is negative definite, and adding a skew-symmetric part keeps every
    eigenvalue's real part below that part's largest eigenvalue, hence < 0.
    """
    G = rng.normal(size=(N, N))
    S = rng.normal(size=(N, N))
    return scale * (-(G @ G.T / N + 0.5 * np.eye(N)) + (S - S.T) / 2)


# ---------------------------------------------------------------------------------------------------------
# expm and discretization
# ---------------------------------------------------------------------------------------------------------


@given(N=d_state, seed=seeds, scale=st.floats(1e-3, 30.0))
def test_expm_matches_scipy(N, seed, scale):
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy (test extra) gives an independent expm")
    M = np.random.default_rng(seed).normal(size=(N, N)) * scale / np.sqrt(N)
    assert_close(ref.expm(M), scipy_linalg.expm(M), "discretize", "expm vs scipy")


@given(N=d_state, seed=seeds)
def test_expm_identities(N, seed):
    """e^0 = I, e^M e^{-M} = I, and e^diag(v) = diag(e^v)."""
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(N, N))
    assert np.array_equal(ref.expm(np.zeros((N, N))), np.eye(N))
    assert_close(ref.expm(M) @ ref.expm(-M), np.eye(N), "discretize", "e^M e^-M")
    v = rng.normal(size=N) * 5
    assert_close(ref.expm(np.diag(v)), np.diag(np.exp(v)), "discretize", "e^diag")


@given(N=d_state, seed=seeds, log_delta=log10_delta)
def test_zoh_block_matrix_equals_textbook_formula(N, seed, log_delta):
    """expm([[A, B], [0, 0]]Δ) == (exp(ΔA), A^{-1}(exp(ΔA) - I) B), the form of Mamba eq. 4 (A invertible)."""
    rng = np.random.default_rng(seed)
    A, B, delta = stable_matrix(rng, N), rng.normal(size=N), 10.0**log_delta
    A_bar, B_bar = ref.discretize_zoh(A, B, delta)
    A_bar_direct = ref.expm(delta * A)
    assert_close(A_bar, A_bar_direct, "discretize", "A_bar")
    assert_close(B_bar, np.linalg.solve(A, (A_bar_direct - np.eye(N)) @ B), "discretize", "B_bar")


@given(N=d_state, seed=seeds, log_delta=log10_delta, with_zero=st.booleans())
def test_zoh_dense_equals_diagonal_closed_form(N, seed, log_delta, with_zero):
    """For diagonal A the block-matrix route equals exp(ΔA), (exp(ΔA) - 1)/A · B, including the A -> 0 limit."""
    rng = np.random.default_rng(seed)
    a = -np.exp(rng.uniform(-3, 2, size=N))
    if with_zero:
        a[rng.integers(N)] = 0.0  # a singular A: B_bar must tend to ΔB there, not 0/0
    B, delta = rng.normal(size=N), 10.0**log_delta
    A_bar, B_bar = ref.discretize_zoh(np.diag(a), B, delta)
    A_bar_diag, B_bar_diag = ref.discretize_zoh_diag(a, B, delta)
    assert_close(A_bar, np.diag(A_bar_diag), "discretize", "A_bar")
    assert_close(B_bar, B_bar_diag, "discretize", "B_bar")


@given(N=d_state, seed=seeds, log_delta=log10_delta)
def test_bilinear_dense_equals_diagonal(N, seed, log_delta):
    rng = np.random.default_rng(seed)
    a, B, delta = -np.exp(rng.uniform(-3, 2, size=N)), rng.normal(size=N), 10.0**log_delta
    A_bar, B_bar = ref.discretize_bilinear(np.diag(a), B, delta)
    A_bar_diag, B_bar_diag = ref.discretize_bilinear_diag(a, B, delta)
    assert_close(A_bar, np.diag(A_bar_diag), "discretize", "A_bar")
    assert_close(B_bar, B_bar_diag, "discretize", "B_bar")


def test_zoh_diag_tiny_A_is_accurate():
    """phi1 via expm1 keeps B_bar accurate when ΔA is tiny (the naive (e^w - 1)/w loses every digit)."""
    a = np.array([-1e-12, -1e-300, 0.0])
    _, B_bar = ref.discretize_zoh_diag(a, np.ones(3), 0.5)
    assert_close(B_bar, np.full(3, 0.5), "discretize", "B_bar near A = 0")


@given(N=d_state, seed=seeds)
def test_local_error_orders(N, seed):
    """Per step, bilinear differs from ZOH by O(Δ^3) and Euler by O(Δ^2): halving Δ divides the gap by 8 and 4.

    Δ is chosen so Δ·||A|| = 1e-2, deep in the asymptotic regime (the next term is 100x smaller) yet far above
    float64 rounding (the bilinear gap is ~1e-7 relative there).
    """
    rng = np.random.default_rng(seed)
    A, B = stable_matrix(rng, N), rng.normal(size=N)
    h = 1e-2 / np.linalg.norm(A, 2)

    def gaps(rule, delta):
        A_zoh, B_zoh = ref.discretize_zoh(A, B, delta)
        A_rule, B_rule = rule(A, B, delta)
        return np.linalg.norm(A_rule - A_zoh), np.linalg.norm(B_rule - B_zoh)

    for rule, order in ((ref.discretize_bilinear, 3), (ref.discretize_euler, 2)):
        for gap_h, gap_half in zip(gaps(rule, h), gaps(rule, h / 2), strict=True):
            if gap_h < 1e-13:  # the leading error term vanishes for this system (e.g. N = 1 and A B-aligned)
                continue
            slope = np.log2(gap_h / gap_half)
            assert abs(slope - order) < 0.1, f"{rule.__name__}: local order {slope:.3f}, expected {order}"


@pytest.mark.parametrize("rule", [ref.discretize_zoh, ref.discretize_bilinear, ref.discretize_euler])
def test_discretize_rejects_bad_input(rule):
    with pytest.raises(ValueError, match="A must be a square"):
        rule(np.ones((2, 3)), np.ones(2), 0.1)
    with pytest.raises(ValueError, match="B must have shape"):
        rule(np.eye(2), np.ones(3), 0.1)
    with pytest.raises(ValueError, match="delta must be a positive"):
        rule(np.eye(2), np.ones(2), -0.1)


# ---------------------------------------------------------------------------------------------------------
# LTI: recurrence == convolution
# ---------------------------------------------------------------------------------------------------------


def random_lti(rng, N, diagonal):
    delta = 10.0 ** rng.uniform(-3, 0)
    if diagonal:
        return ref.discretize_zoh_diag(-np.exp(rng.uniform(-2, 2, size=N)), rng.normal(size=N), delta)
    return ref.discretize_zoh(stable_matrix(rng, N), rng.normal(size=N), delta)


@given(N=d_state, L=seq_len, seed=seeds, diagonal=st.booleans(), batch=st.integers(1, 3))
def test_recurrence_equals_convolution(N, L, seed, diagonal, batch):
    rng = np.random.default_rng(seed)
    A_bar, B_bar = random_lti(rng, N, diagonal)
    C, u = rng.normal(size=N), rng.normal(size=(batch, L))
    y_rec = ref.ssm_recurrence(A_bar, B_bar, C, u)
    y_conv = ref.causal_conv(u, ref.ssm_kernel(A_bar, B_bar, C, L))
    assert_close(y_conv, y_rec, "conv_vs_recurrence")


@given(N=d_state, L=st.integers(2, 64), seed=seeds, data=st.data())
def test_recurrence_is_causal_and_linear(N, L, seed, data):
    rng = np.random.default_rng(seed)
    A_bar, B_bar = random_lti(rng, N, diagonal=False)
    C, u, v = rng.normal(size=N), rng.normal(size=L), rng.normal(size=L)
    t = data.draw(st.integers(0, L - 1), label="t")
    y = ref.ssm_recurrence(A_bar, B_bar, C, u)
    u_changed = u.copy()
    u_changed[t:] += rng.normal(size=L - t)
    assert np.array_equal(ref.ssm_recurrence(A_bar, B_bar, C, u_changed)[:t], y[:t]), "future leaked into past"
    alpha, beta = rng.normal(size=2)
    y_mix = ref.ssm_recurrence(A_bar, B_bar, C, alpha * u + beta * v)
    assert_close(y_mix, alpha * y + beta * ref.ssm_recurrence(A_bar, B_bar, C, v), "conv_vs_recurrence")


@given(N=d_state, L=seq_len, seed=seeds)
def test_recurrence_from_a_state_continues_a_run(N, L, seed):
    """Running u[:k] then u[k:] from the state it left equals running u whole."""
    rng = np.random.default_rng(seed)
    A_bar, B_bar = random_lti(rng, N, diagonal=True)
    C, u = rng.normal(size=N), rng.normal(size=L)
    k = int(rng.integers(0, L + 1))
    y_first, x_k = ref.ssm_recurrence(A_bar, B_bar, C, u[:k], return_last_state=True)
    y_rest = ref.ssm_recurrence(A_bar, B_bar, C, u[k:], x0=x_k)
    assert_close(np.concatenate([y_first, y_rest]), ref.ssm_recurrence(A_bar, B_bar, C, u), "conv_vs_recurrence")


def test_hippo_legs_and_s4d_inits():
    A, B = ref.hippo_legs(3)
    s3, s5 = np.sqrt(3), np.sqrt(5)
    assert np.allclose(A, [[-1, 0, 0], [-s3, -2, 0], [-s5, -s3 * s5, -3]])
    assert np.allclose(B, [1, s3, s5])
    assert np.allclose(ref.s4d_lin(3), [-0.5, -0.5 + 1j * np.pi, -0.5 + 2j * np.pi])
    assert np.array_equal(ref.s4d_real(3), [-1.0, -2.0, -3.0])


# ---------------------------------------------------------------------------------------------------------
# The selective scan
# ---------------------------------------------------------------------------------------------------------

batch_size = st.integers(1, 3)
channels = st.integers(1, 6)


@given(batch=batch_size, dim=channels, N=d_state, L=seq_len, seed=seeds, gate=st.booleans())
def test_selective_scan_with_fixed_parameters_is_the_lti_convolution(batch, dim, N, L, seed, gate):
    """Constant delta and time-invariant B, C make the selective scan an S4D: per channel, y = K * u + D u."""
    rng = np.random.default_rng(seed)
    A = -np.exp(rng.uniform(-2, 2, size=(dim, N)))
    B, C, D = rng.normal(size=(dim, N)), rng.normal(size=(dim, N)), rng.normal(size=dim)
    delta_per_channel = 10.0 ** rng.uniform(-3, 0, size=dim)
    u = rng.normal(size=(batch, dim, L))
    z = rng.normal(size=(batch, dim, L)) if gate else None
    delta = np.broadcast_to(delta_per_channel[:, None], (batch, dim, L))
    y = ref.selective_scan_ref(u, delta, A, B, C, D=D, z=z)

    expected = np.empty_like(u)
    for d in range(dim):
        A_bar = np.exp(delta_per_channel[d] * A[d])
        B_bar = delta_per_channel[d] * B[d]  # Mamba's Euler rule for B
        expected[:, d] = ref.causal_conv(u[:, d], ref.ssm_kernel(A_bar, B_bar, C[d], L)) + D[d] * u[:, d]
    if gate:
        expected *= z / (1 + np.exp(-z))
    assert_close(y, expected, "conv_vs_recurrence")


def selective_inputs(rng, batch, dim, N, L, b_kind, c_kind, groups):
    def make(kind):
        if kind == "invariant":
            return rng.normal(size=(dim, N))
        if kind == "selective":
            return rng.normal(size=(batch, N, L))
        return rng.normal(size=(batch, groups, N, L))

    return dict(
        u=rng.normal(size=(batch, dim, L)),
        delta=rng.normal(size=(batch, dim, L)),
        A=-np.exp(rng.normal(size=(dim, N))),
        B=make(b_kind),
        C=make(c_kind),
    )


def scalar_loop(u, delta, A, B, C, group_of):
    """The selective scan as nested scalar loops: an independent, slow re-derivation of the last state and y."""
    batch, dim, L = u.shape
    N = A.shape[1]

    def at(M, b, d, n, t):
        if M.ndim == 2:
            return M[d, n]
        if M.ndim == 3:
            return M[b, n, t]
        return M[b, group_of(M, d), n, t]

    x = np.zeros((batch, dim, N))
    y = np.zeros((batch, dim, L))
    for b in range(batch):
        for d in range(dim):
            for t in range(L):
                dt = np.log1p(np.exp(delta[b, d, t]))  # softplus
                for n in range(N):
                    x[b, d, n] = np.exp(dt * A[d, n]) * x[b, d, n] + dt * at(B, b, d, n, t) * u[b, d, t]
                    y[b, d, t] += at(C, b, d, n, t) * x[b, d, n]
    return y, x


kinds = st.sampled_from(["invariant", "selective", "grouped"])


@given(
    batch=batch_size,
    groups=st.integers(1, 3),
    channels_per_group=st.integers(1, 3),
    N=st.integers(1, 5),
    L=st.integers(1, 12),
    seed=seeds,
    b_kind=kinds,
    c_kind=kinds,
)
def test_selective_scan_equals_scalar_loop(batch, groups, channels_per_group, N, L, seed, b_kind, c_kind):
    rng = np.random.default_rng(seed)
    dim = groups * channels_per_group
    args = selective_inputs(rng, batch, dim, N, L, b_kind, c_kind, groups)
    y, last = ref.selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    y_loop, last_loop = scalar_loop(**args, group_of=lambda M, d: d // (dim // M.shape[1]))
    assert_close(y, y_loop, "conv_vs_recurrence", "y")
    assert_close(last, last_loop, "conv_vs_recurrence", "last state")


@given(batch=batch_size, dim=channels, N=d_state, L=seq_len, seed=seeds)
def test_selective_scan_bias_skip_and_gate(batch, dim, N, L, seed):
    """delta_bias, D and z do what the docstring says, composed on the plain scan."""
    rng = np.random.default_rng(seed)
    args = selective_inputs(rng, batch, dim, N, L, "selective", "selective", 1)
    delta_bias, D, z = rng.normal(size=dim), rng.normal(size=dim), rng.normal(size=(batch, dim, L))
    y = ref.selective_scan_ref(**args, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)
    shifted = dict(args, delta=ref.softplus(args["delta"] + delta_bias[:, None]))
    plain = ref.selective_scan_ref(**shifted)
    assert_close(y, (plain + D[:, None] * args["u"]) * ref.silu(z), "conv_vs_recurrence")


def test_grouped_with_one_group_equals_selective():
    rng = np.random.default_rng(0)
    args = selective_inputs(rng, 2, 4, 3, 10, "selective", "selective", 1)
    grouped = dict(args, B=args["B"][:, None], C=args["C"][:, None])
    assert np.array_equal(ref.selective_scan_ref(**args), ref.selective_scan_ref(**grouped))


BAD_SHAPES = {
    "u": dict(u=np.zeros((2, 3))),
    "delta": dict(delta=np.zeros((2, 3, 5))),
    "A": dict(A=np.zeros((4, 2))),
    "B": dict(B=np.zeros((2, 2, 5))),
    "C": dict(C=np.zeros((2, 2, 2, 4))),
    "D": dict(D=np.zeros(4)),
    "z": dict(z=np.zeros((2, 3, 3))),
    "delta_bias": dict(delta_bias=np.zeros((3, 1))),
}


@pytest.mark.parametrize("name", sorted(BAD_SHAPES))
def test_selective_scan_rejects_bad_shapes(name):
    rng = np.random.default_rng(0)
    good = selective_inputs(rng, 2, 3, 2, 4, "selective", "selective", 1)
    with pytest.raises(ValueError, match=rf"^{name} must"):
        ref.selective_scan_ref(**{**good, **BAD_SHAPES[name]})


def test_selective_scan_rejects_groups_not_dividing_dim():
    rng = np.random.default_rng(0)
    good = selective_inputs(rng, 1, 3, 2, 4, "selective", "selective", 1)
    with pytest.raises(ValueError, match="^B must.*groups dividing dim=3"):
        ref.selective_scan_ref(**{**good, "B": np.zeros((1, 2, 2, 4))})
