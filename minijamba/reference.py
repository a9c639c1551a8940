"""The float64 NumPy reference: the oracle every fast path in minijamba is tested against.

No torch here, and nothing clever: each function is the paper's equation written out, in float64, so a reader
can check it line by line and every torch scan, kernel, cache and converter can be compared to it.

Sources: S4 (Gu, Goel & Ré 2022, §2), S4D (Gu et al. 2022, §3-4), Mamba (Gu & Dao 2023, §2 eq. 1-4 and
Algorithm 2). `selective_scan_ref` has the arguments, shapes and semantics of the official Mamba reference
(`selective_scan_ref` in state-spaces/mamba), re-derived here in NumPy. Attention: Vaswani et al. 2017 (§3.2),
grouped-query heads (Ainslie et al. 2023) and rotary embeddings (Su et al. 2021); names in their own section.
Mixture of experts: Jamba (Lieber et al. 2024, §2), the Switch Transformer's loss (Fedus et al. 2021, eq. 4-6);
`moe_ref` writes n_e for the number of experts, h for a token's row and g_e for a chosen expert's weight
(glossary in minijamba/moe.py).

Glossary (code name — symbol in the papers). We use S4's letters: u is the input and x the state
(the Mamba paper writes x for the input and h for the state).
    u        — u(t), u_k: the input signal; (batch, dim, L) in the selective scan
    x        — x(t), x_k: the hidden state, N numbers per channel
    y        — y(t), y_k: the output
    A        — A: the state matrix, (N, N) dense or (..., N) diagonal; (dim, N) in the selective scan
    B, C     — B, C: input and output maps; (N,) or (N, M) for one system
    D        — D: the skip connection y += D u
    delta    — Δ: the step size (the discretization timescale)
    A_bar    — Ā = exp(ΔA), the discrete state matrix
    B_bar    — B̄, the discrete input map
    K        — K̄ = (C B̄, C Ā B̄, ..., C Ā^{L-1} B̄), the SSM convolution kernel
    N        — d_state, the state size
    dim      — D in Mamba's Algorithm 2 (channels; d_inner inside a Mamba block)
    L        — the sequence length
    z        — the gate branch: y *= silu(z)
"""

import math

import numpy as np

__all__ = [
    "expm",
    "discretize_zoh",
    "discretize_bilinear",
    "discretize_euler",
    "discretize_zoh_diag",
    "discretize_bilinear_diag",
    "ssm_kernel",
    "causal_conv",
    "ssm_recurrence",
    "hippo_legs",
    "s4d_lin",
    "s4d_real",
    "softplus",
    "silu",
    "check_selective_scan_shapes",
    "selective_scan_ref",
    "check_attention_shapes",
    "causal_attention_ref",
    "rope_ref",
    "moe_ref",
    "load_balancing_loss_ref",
]


# ----------------------------------------------------------------------------------------------------------
# The matrix exponential (scipy is not a dependency, so we write the classic algorithm ourselves)
# ----------------------------------------------------------------------------------------------------------

_PADE_DEGREE = 6


def _pade_coefficients(q):
    """c_k of the diagonal [q/q] Padé approximant of e^x: c_0 = 1, c_k = c_{k-1} (q-k+1) / ((2q-k+1) k)."""
    c = [1.0]
    for k in range(1, q + 1):
        c.append(c[-1] * (q - k + 1) / ((2 * q - k + 1) * k))
    return c


def expm(M):
    """The matrix exponential e^M of a square matrix, by scaling and squaring with a [6/6] Padé core.

    M: (n, n), real or complex. Golub & Van Loan, Matrix Computations, Algorithm 11.3.1: scale M by 2^-s so that
    ||M / 2^s||_inf <= 1/2, where the [6/6] Padé approximant has relative error below 4e-16, then square s times.
    """
    M = np.asarray(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"expm: M must be a square matrix (n, n), got shape {M.shape}")
    M = M.astype(np.result_type(M.dtype, np.float64))
    norm = np.linalg.norm(M, ord=np.inf)
    s = max(0, math.ceil(math.log2(norm)) + 1) if norm > 0 else 0
    X = M / 2.0**s
    eye = np.eye(M.shape[0], dtype=M.dtype)
    numer, denom, power = np.zeros_like(M), np.zeros_like(M), eye
    for k, c in enumerate(_pade_coefficients(_PADE_DEGREE)):
        numer = numer + c * power
        denom = denom + (-1) ** k * c * power
        power = power @ X
    F = np.linalg.solve(denom, numer)
    for _ in range(s):
        F = F @ F
    return F


# ----------------------------------------------------------------------------------------------------------
# Discretization: from x'(t) = A x(t) + B u(t), y = C x + D u to x_k = A_bar x_{k-1} + B_bar u_k, y_k = C x_k
# ----------------------------------------------------------------------------------------------------------


def _as_system(A, B):
    """Validate a dense system: A (N, N), B (N,) or (N, M). Returns float arrays and B as a matrix."""
    A = np.asarray(A)
    B = np.asarray(B)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix (N, N), got shape {A.shape}")
    if B.ndim not in (1, 2) or B.shape[0] != A.shape[0]:
        raise ValueError(f"B must have shape (N,) or (N, M) with N = {A.shape[0]}, got {B.shape}")
    dtype = np.result_type(A.dtype, B.dtype, np.float64)
    return A.astype(dtype), B.reshape(A.shape[0], -1).astype(dtype), B.ndim


def _check_delta(delta):
    if not np.isscalar(delta) or not delta > 0:
        raise ValueError(f"delta must be a positive scalar step size, got {delta!r}")
    return float(delta)


def discretize_zoh(A, B, delta):
    """Zero-order hold, exact for an input held constant over each step (Mamba paper eq. 4).

    A: (N, N), B: (N,) or (N, M), delta > 0 -> (A_bar (N, N), B_bar shaped like B), with
        A_bar = exp(ΔA),   B_bar = (ΔA)^{-1} (exp(ΔA) - I) ΔB = ∫_0^Δ exp(sA) ds · B.
    We never invert A: one exponential of the block matrix gives both, and works for singular A,
        expm([[A, B], [0, 0]] Δ) = [[A_bar, B_bar], [0, I]].
    """
    A, B, b_ndim = _as_system(A, B)
    delta = _check_delta(delta)
    N, M = B.shape
    block = np.zeros((N + M, N + M), dtype=A.dtype)
    block[:N, :N] = A
    block[:N, N:] = B
    E = expm(block * delta)
    A_bar, B_bar = E[:N, :N], E[:N, N:]
    return A_bar, B_bar if b_ndim == 2 else B_bar[:, 0]


def discretize_bilinear(A, B, delta):
    """The bilinear (Tustin) rule S4 uses: A_bar = (I - Δ/2 A)^{-1}(I + Δ/2 A), B_bar = (I - Δ/2 A)^{-1} ΔB.

    A second-order accurate rational approximation of exp(ΔA): it agrees with ZOH to O(Δ^3) per step.
    """
    A, B, b_ndim = _as_system(A, B)
    delta = _check_delta(delta)
    eye = np.eye(A.shape[0])
    left = eye - delta / 2 * A
    A_bar = np.linalg.solve(left, eye + delta / 2 * A)
    B_bar = np.linalg.solve(left, delta * B)
    return A_bar, B_bar if b_ndim == 2 else B_bar[:, 0]


def discretize_euler(A, B, delta):
    """Forward Euler: A_bar = I + ΔA, B_bar = ΔB. First order: it agrees with ZOH only to O(Δ^2) per step.

    Mamba keeps ZOH for A but uses exactly this Euler rule for B (B_bar u = Δ B u), see `selective_scan_ref`.
    """
    A, B, b_ndim = _as_system(A, B)
    delta = _check_delta(delta)
    A_bar = np.eye(A.shape[0]) + delta * A
    B_bar = delta * B
    return A_bar, B_bar if b_ndim == 2 else B_bar[:, 0]


def _phi1(w):
    """(e^w - 1) / w with its limit 1 at w = 0, accurate for tiny |w| (expm1 avoids the cancellation)."""
    w = np.asarray(w)
    small = w == 0
    return np.where(small, 1.0, np.expm1(w) / np.where(small, 1.0, w))


def discretize_zoh_diag(A, B, delta):
    """ZOH for a diagonal A in closed form: A_bar = exp(ΔA), B_bar = (exp(ΔA) - 1)/A · B.

    A, B: (..., N) (real or complex), delta broadcastable to them. Written as Δ·phi1(ΔA)·B with
    phi1(w) = (e^w - 1)/w so the A -> 0 limit (B_bar -> ΔB) is exact rather than 0/0.
    """
    A, B, delta = np.asarray(A), np.asarray(B), np.asarray(delta, dtype=np.float64)
    if np.any(delta <= 0):
        raise ValueError("delta must be positive")
    dA = delta * A
    return np.exp(dA), delta * _phi1(dA) * B


def discretize_bilinear_diag(A, B, delta):
    """Bilinear for a diagonal A: A_bar = (1 + ΔA/2)/(1 - ΔA/2), B_bar = ΔB/(1 - ΔA/2). Shapes as above."""
    A, B, delta = np.asarray(A), np.asarray(B), np.asarray(delta, dtype=np.float64)
    if np.any(delta <= 0):
        raise ValueError("delta must be positive")
    left = 1 - delta * A / 2
    return (1 + delta * A / 2) / left, delta * B / left


# ----------------------------------------------------------------------------------------------------------
# Two ways to run a linear time-invariant SSM: a recurrence (inference) and a convolution (training)
# ----------------------------------------------------------------------------------------------------------


def _check_kernel_inputs(A_bar, B_bar, C):
    A_bar, B_bar, C = np.asarray(A_bar), np.asarray(B_bar), np.asarray(C)
    if A_bar.ndim not in (1, 2) or (A_bar.ndim == 2 and A_bar.shape[0] != A_bar.shape[1]):
        raise ValueError(f"A_bar must be (N, N) dense or (N,) diagonal, got shape {A_bar.shape}")
    N = A_bar.shape[0]
    if B_bar.shape != (N,):
        raise ValueError(f"B_bar must have shape ({N},), got {B_bar.shape}")
    if C.shape != (N,):
        raise ValueError(f"C must have shape ({N},), got {C.shape}")
    return A_bar, B_bar, C


def _apply(A_bar, x):
    """A_bar @ x for a dense (N, N) or diagonal (N,) A_bar; x: (..., N)."""
    return A_bar * x if A_bar.ndim == 1 else x @ A_bar.T


def ssm_kernel(A_bar, B_bar, C, L):
    """The SSM convolution kernel K = (C B_bar, C A_bar B_bar, ..., C A_bar^{L-1} B_bar): (L,).

    A_bar: (N, N) or (N,) diagonal; B_bar, C: (N,). Powers are built one step at a time (O(L N^2)), the
    slow, obviously-correct way; S4's fast kernel algorithms are what this checks.
    """
    A_bar, B_bar, C = _check_kernel_inputs(A_bar, B_bar, C)
    if not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L must be a positive integer, got {L!r}")
    K = np.empty(L, dtype=np.result_type(A_bar, B_bar, C, np.float64))
    v = B_bar.astype(K.dtype)  # A_bar^k B_bar
    for k in range(L):
        K[k] = C @ v
        v = _apply(A_bar, v)
    return K


def causal_conv(u, K):
    """y_k = sum_{j<=k} K_j u_{k-j}, by FFT. u: (..., L), K: (..., L) broadcastable -> y: (..., L).

    Both are zero-padded to 2L so the FFT's circular convolution never wraps the end of the sequence back
    onto its start (which would break causality).
    """
    u, K = np.asarray(u, dtype=np.float64), np.asarray(K)
    if np.iscomplexobj(K):
        raise ValueError("K must be real (take the real part of a complex kernel first)")
    L = u.shape[-1]
    if K.shape[-1] != L:
        raise ValueError(f"K must have the same length as u (last axis {L}), got {K.shape[-1]}")
    n = 2 * L
    return np.fft.irfft(np.fft.rfft(u, n=n) * np.fft.rfft(K, n=n), n=n)[..., :L]


def ssm_recurrence(A_bar, B_bar, C, u, x0=None, return_last_state=False):
    """Run x_k = A_bar x_{k-1} + B_bar u_k, y_k = C x_k step by step. O(L) Python loop — reference only.

    A_bar: (N, N) or (N,) diagonal; B_bar, C: (N,); u: (..., L); x0: (..., N) or None (zeros).
    Returns y: (..., L), and the last state x_L: (..., N) when return_last_state.
    """
    A_bar, B_bar, C = _check_kernel_inputs(A_bar, B_bar, C)
    u = np.asarray(u, dtype=np.float64)
    dtype = np.result_type(A_bar, B_bar, C, u)
    x = np.zeros(u.shape[:-1] + B_bar.shape, dtype=dtype)
    if x0 is not None:
        x0 = np.asarray(x0)
        if x0.shape != x.shape:
            raise ValueError(f"x0 must have shape {x.shape}, got {x0.shape}")
        x = x + x0
    y = np.empty(u.shape, dtype=dtype)
    for k in range(u.shape[-1]):
        x = _apply(A_bar, x) + B_bar * u[..., k, None]  # (..., N)
        y[..., k] = x @ C
    return (y, x) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------
# Initialisations: HiPPO-LegS (S4) and its diagonal descendants S4D-Lin, S4D-Real
# ----------------------------------------------------------------------------------------------------------


def hippo_legs(N):
    """The HiPPO-LegS matrices (S4 eq. 2): A: (N, N), B: (N,).

    A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k;  B_n = sqrt(2n+1).
    Its state holds the Legendre coefficients of the input's whole history.
    """
    q = np.sqrt(2 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(N) + 1.0)
    return A, q.copy()


def s4d_lin(N):
    """S4D-Lin diagonal A: a_n = -1/2 + i π n, n = 0..N-1 (complex; S4D §4)."""
    return -0.5 + 1j * np.pi * np.arange(N)


def s4d_real(N):
    """S4D-Real diagonal A: a_n = -(n + 1), n = 0..N-1 (real). Mamba's A_log init is log of these."""
    return -(np.arange(N) + 1.0)


# ----------------------------------------------------------------------------------------------------------
# The selective scan (Mamba, Algorithm 2): delta, B, C depend on the input, so the system is time-varying
# ----------------------------------------------------------------------------------------------------------


def softplus(x):
    """log(1 + e^x), computed stably. (The official kernel returns x itself above 20; we keep the exact value.)"""
    return np.logaddexp(0.0, x)


def silu(x):
    """x · sigmoid(x), the gate Mamba applies to z."""
    return x * 0.5 * (1.0 + np.tanh(x / 2))  # sigmoid(x) = (1 + tanh(x/2)) / 2, no overflow


def check_selective_scan_shapes(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None):
    """Validate the selective scan's shapes (NumPy arrays or torch tensors); ValueError names the bad argument."""
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, dim, L), got {u.shape}")
    batch, dim, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {u.shape}, got {delta.shape}")
    if A.ndim != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, N), got {A.shape}")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.ndim == 2:
            ok = M.shape == (dim, N)
        elif M.ndim == 3:
            ok = M.shape == (batch, N, L)
        elif M.ndim == 4:
            ok = M.shape[0] == batch and M.shape[2:] == (N, L) and M.shape[1] >= 1 and dim % M.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (dim, N)=({dim}, {N}) time-invariant, (batch, N, L)=({batch}, {N}, {L}) "
                f"selective, or (batch, groups, N, L) with groups dividing dim={dim}; got {M.shape}"
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise ValueError(f"{name} must have shape (dim,)=({dim},), got {v.shape}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {u.shape}, got {z.shape}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ValueError(
            f"initial_state must have shape (batch, dim, N)=({batch}, {dim}, {N}), got {initial_state.shape}"
        )


def _per_channel(M, dim):
    """B or C as (batch or 1, dim, N, L or 1): every channel's own matrix at every step."""
    if M.ndim == 2:  # (dim, N): the same B for every step (an LTI B, as in S4)
        return M[None, :, :, None]
    if M.ndim == 3:  # (batch, N, L): selective, shared by all channels
        return M[:, None]
    groups = M.shape[1]  # (batch, groups, N, L): channel d uses group d // (dim // groups)
    return np.repeat(M, dim // groups, axis=1)


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    initial_state=None,
):
    """The selective scan of Mamba (Algorithm 2), in float64. O(L) Python loop — reference only.

    u, delta, z: (batch, dim, L);  A: (dim, N);  D, delta_bias: (dim,);
    B, C: (dim, N) time-invariant, (batch, N, L) selective, or (batch, groups, N, L) grouped.
    initial_state: (batch, dim, N), the state before step 1 (zeros if None; an addition to the official
    reference, so a scan can continue where another stopped).

    For each channel d and step t (state x: (batch, dim, N)):
        delta  <- softplus(delta + delta_bias)         (each step only if asked)
        A_bar  =  exp(delta_t · A)                      ZOH for A
        x_t    =  A_bar · x_{t-1} + delta_t · B_t · u_t  Euler for B: B_bar u ≈ Δ B u, as Mamba's kernel does
        y_t    =  C_t · x_t + D · u_t,  then  y_t *= silu(z_t)
    Returns y: (batch, dim, L), and the last state x_L: (batch, dim, N) when return_last_state.
    """
    u, delta, A, B, C = (np.asarray(t, dtype=np.float64) for t in (u, delta, A, B, C))
    D, z, delta_bias, initial_state = (
        None if t is None else np.asarray(t, dtype=np.float64) for t in (D, z, delta_bias, initial_state)
    )
    check_selective_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape

    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = softplus(delta)
    B_full, C_full = _per_channel(B, dim), _per_channel(C, dim)  # (batch|1, dim, N, L|1)

    x = np.zeros((batch, dim, A.shape[1])) if initial_state is None else initial_state.copy()
    y = np.empty((batch, dim, L))
    for t in range(L):
        B_t = B_full[..., min(t, B_full.shape[-1] - 1)]  # (batch|1, dim, N)
        C_t = C_full[..., min(t, C_full.shape[-1] - 1)]
        A_bar = np.exp(delta[:, :, t, None] * A)  # (batch, dim, N)
        x = A_bar * x + (delta[:, :, t] * u[:, :, t])[..., None] * B_t
        y[:, :, t] = np.sum(C_t * x, axis=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * silu(z)
    return (y, x) if return_last_state else y


# ----------------------------------------------------------------------------------------------------------
# Causal self-attention (Vaswani et al. 2017, §3.2) with grouped-query heads (Ainslie et al. 2023), and RoPE
# ----------------------------------------------------------------------------------------------------------


def check_attention_shapes(q, k, v):
    """Validate causal attention's shapes (NumPy arrays or torch tensors); ValueError names the bad argument."""
    if q.ndim != 4 or q.shape[2] < 1:
        raise ValueError(f"q must have shape (batch, heads, Lq, head_dim) with Lq >= 1, got {tuple(q.shape)}")
    batch, heads, Lq, head_dim = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape (batch={batch}, kv_heads, Lk, head_dim={head_dim}), got {tuple(k.shape)}")
    kv_heads, Lk = k.shape[1], k.shape[2]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k has {kv_heads} kv heads; they must divide q's {heads} heads")
    if Lk < Lq:
        raise ValueError(f"k must have Lk >= Lq = {Lq} positions (the queries are the last Lq of them), got Lk = {Lk}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")


def causal_attention_ref(q, k, v, scale=None):
    """softmax(Q Kᵀ · scale + causal mask) V in float64, the queries being the last Lq of the Lk positions.

    q: (batch, heads, Lq, head_dim);  k, v: (batch, kv_heads, Lk, head_dim) with Lk >= Lq and kv_heads dividing
    heads;  scale: 1/sqrt(head_dim) if None. Query i sits at position Lk - Lq + i and reads keys 0..Lk - Lq + i,
    so Lq = Lk is a fresh sequence and Lq < Lk a prefill that continues a cache of Lk - Lq tokens. Grouped-query
    attention: query head h reads kv head h // (heads // kv_heads). Returns (batch, heads, Lq, head_dim).
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    check_attention_shapes(q, k, v)
    heads, Lq, head_dim = q.shape[1:]
    Lk = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (batch, heads, Lk, head_dim)
    scores = q @ k.swapaxes(-1, -2) * scale  # (batch, heads, Lq, Lk)
    visible = np.arange(Lk)[None, :] <= np.arange(Lk - Lq, Lk)[:, None]  # (Lq, Lk): key j at or before the query
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))  # max-subtracted: no overflow; masked -> exactly 0
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights @ v  # (batch, heads, Lq, head_dim)


def rope_ref(x, positions, theta=10000.0):
    """Rotary position embedding (Su et al. 2021, RoFormer §3.2) in the rotate-half layout of HF / Llama.

    x: (..., L, head_dim) with head_dim = d even; positions: (L,) absolute positions. Channels i and i + d/2 of the
    token at position p are rotated together by the angle p · theta^(-2i/d), for i < d/2:
        out_i = x_i cos - x_{i+d/2} sin,   out_{i+d/2} = x_{i+d/2} cos + x_i sin.
    Rotations compose: a query at p dotted with a key at s then depends on p - s only. Returns x's shape.
    """
    x, positions = np.asarray(x, dtype=np.float64), np.asarray(positions, dtype=np.float64)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must have shape (..., L, head_dim) with head_dim even, got {x.shape}")
    if positions.shape != (x.shape[-2],):
        raise ValueError(f"positions must have shape (L,) = ({x.shape[-2]},), got {positions.shape}")
    half = x.shape[-1] // 2
    angle = positions[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])  # (L, d/2)
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]  # (..., L, d/2) each
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # (..., L, d)


# ----------------------------------------------------------------------------------------------------------
# Mixture of experts (Jamba §2, Switch Transformer eq. 1-6): every expert on every token, masked to the top-k
# ----------------------------------------------------------------------------------------------------------


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))  # shifted: no overflow, same ratios
    return e / e.sum(axis=-1, keepdims=True)


def _top_k_mask(probs, top_k):
    """1 at each row's top_k largest entries, 0 elsewhere: (tokens, n_e)."""
    mask = np.zeros_like(probs)
    np.put_along_axis(mask, np.argsort(-probs, axis=-1, kind="stable")[:, :top_k], 1.0, axis=-1)
    return mask


def moe_ref(h, router_weight, gate_w, up_w, down_w, top_k, normalize_top_k=False):
    """A top-k mixture of SwiGLU experts, dense: out = Σ_e g_e · down_e(silu(gate_e h) · up_e h).

    h: (tokens, hidden); router_weight: (n_e, hidden); gate_w, up_w: (n_e, inter, hidden); down_w: (n_e, hidden, inter).
    p = softmax(h router_weightᵀ); g_e = p_e for the top_k experts of each token and 0 for the others, divided by
    their sum if normalize_top_k (Mixtral; Jamba keeps the raw p_e). Every expert runs on every token, the
    obviously-correct way: O(n_e) the work of a sparse dispatch — reference only. Returns (tokens, hidden).
    """
    h, router_weight, gate_w, up_w, down_w = (
        np.asarray(t, dtype=np.float64) for t in (h, router_weight, gate_w, up_w, down_w)
    )
    probs = _softmax(h @ router_weight.T)  # (tokens, n_e)
    g = probs * _top_k_mask(probs, top_k)  # (tokens, n_e)
    if normalize_top_k:
        g = g / g.sum(axis=-1, keepdims=True)
    inner = silu(np.einsum("eih,th->tei", gate_w, h)) * np.einsum("eih,th->tei", up_w, h)  # (tokens, n_e, inter)
    experts = np.einsum("ehi,tei->teh", down_w, inner)  # (tokens, n_e, hidden): every expert's answer
    return np.einsum("te,teh->th", g, experts)


def load_balancing_loss_ref(router_logits, num_experts, top_k, mask=None):
    """The Switch Transformer's load-balancing loss (eq. 4-6) with top-k counts, several layers pooled.

    router_logits: a list of (tokens, n_e) arrays, one per layer; mask: (tokens,) of 0/1 (padding 0) or None.
        f_e = (top-k assignments to e) / tokens,  P_e = mean_tokens p_e,  loss = n_e · Σ_e f_e P_e
    where the counts, probability sums and token counts add up over all layers before f and P are formed.
    """
    counts, prob_sums, rows = np.zeros(num_experts), np.zeros(num_experts), 0.0
    for logits in router_logits:
        probs = _softmax(np.asarray(logits, dtype=np.float64))  # (tokens, n_e)
        m = np.ones(probs.shape[0]) if mask is None else np.asarray(mask, dtype=np.float64).reshape(-1)  # (tokens,)
        counts += m @ _top_k_mask(probs, top_k)
        prob_sums += m @ probs
        rows += m.sum()
    return num_experts * np.sum((counts / rows) * (prob_sums / rows))
