"""The selective scan in torch: three readable implementations of one recurrence, all checked against the oracle.

Mamba §3.3 (Algorithm 2). For every batch element, channel d and state index n, the selective SSM is the
first-order linear recurrence
    x_t = a_t · x_{t-1} + b_t,    a_t = exp(delta_t · A)  (= A_bar),   b_t = delta_t · B_t · u_t  (= B_bar u),
    y_t = C_t · x_t + D · u_t,    then y_t *= silu(z_t).
Because a_t, b_t depend on the input, there is no convolution kernel (lesson 01's trick is gone), but the
recurrence is still associative: composing step 1 then step 2 is again a step,
    (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2),    identity (1, 0),
so it can be computed as a parallel prefix scan. The implementations:
    "sequential"  the plain loop over L: L steps of depth 1. The clarity baseline.
    "parallel"    Hillis–Steele: log2(L) rounds, round k combines each position with the one 2^k before it.
                  O(L log L) work, depth log L; materialises (batch, dim, L, d_state).
    "chunked"     chunks of T steps, parallel inside a chunk, the state carried between chunks. Only one
                  chunk's (batch, dim, T, d_state) tensor exists at a time, and with autograd each chunk is
                  recomputed in the backward pass (activation checkpointing) from its carried-in state, as the
                  official CUDA kernel does with its chunk-boundary states.
    "cpu"         the fused C++ kernel (minijamba.fused, cuda/selective_scan_cpu.cpp; lesson 07): each channel's
                  states stay in registers while L streams through; backward recomputes from chunk-start states.
    "cuda"        the fused CUDA kernel (cuda/selective_scan.cu), for CUDA tensors, where it can be built.
    "cuda-emulated" the same CUDA kernels run on the CPU under CUDA's execution model (cuda/emulator/): slow,
                  for checking the kernels on machines without a GPU; CPU tensors.
    "auto"        the fused kernel for u's device when it builds; otherwise "chunked", with a one-time warning.
                  On a device with no fused kernel (meta, mps), "chunked" without a warning.
                  What training asks for (TrainConfig.scan_impl), as do the benchmarks.
The default is "chunked", one of the torch scans lesson 03 teaches, and so is SelectiveSSM's: a fused kernel runs
only where it is asked for, by name or through "auto". Only then is minijamba.fused imported, whose load() brings
in torch.utils.cpp_extension and compiles the kernels on first use (then caches them).

Glossary, in the README's notation (code name — meaning; the Mamba paper's letter where it differs):
    u            — the input (batch, dim, L) (paper x)
    x            — the hidden state (batch, dim, d_state) (paper h)
    delta        — Δ (batch, dim, L), made positive by softplus
    A            — A (dim, d_state), real and negative;  a = exp(ΔA) = A_bar
    B, C         — B, C: (dim, d_state) time-invariant, (batch, d_state, L) selective, (batch, groups, d_state, L)
    b            — B_bar u = Δ B u (Mamba's Euler rule for B)
    D            — the skip y += D u, (dim,), and nothing else;  z — the gate branch, y *= silu(z)
    dim, d_state — the channels scanned side by side (paper D) and the state size per channel N
Lesson 03 derives the combine, counts the work and depth of each scan, and checks them against the oracle.

Never divide by cumulative products and never form exp(cumsum(delta·A)) differences: both overflow or lose
every digit on long sequences (the failure of a popular pure-PyTorch scan whose sequential and parallel modes
disagree). The Hillis–Steele rounds below only multiply numbers that are each at most 1 in magnitude, and they
carry a − 1 rather than a, so that a decay just below 1 (a long memory) keeps its digits (see `_hillis_steele`).
"""

import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .reference import check_selective_scan_shapes

__all__ = ["selective_scan", "resolve_impl", "IMPLS", "FUSED_IMPLS", "FUSED_DEVICES", "IMPL_CHOICES", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64


def softplus(x):
    """log(1 + e^x), exact at every x (F.softplus returns x itself above 20; the reference does not)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _per_step(M, dim, t0, t1):
    """B or C for steps t0..t1-1 as (batch or 1, dim or 1, T or 1, d_state), ready to broadcast."""
    if M.dim() == 2:  # (dim, N): the same at every step
        return M[None, :, None, :]  # (1, dim, 1, N)
    if M.dim() == 3:  # (batch, N, L): one per step, shared by all channels
        return M[:, None, :, t0:t1].transpose(-1, -2)  # (batch, 1, T, N)
    groups = M.shape[1]  # (batch, G, N, L): channel d reads group d // (dim // G)
    return M[..., t0:t1].repeat_interleave(dim // groups, dim=1).transpose(-1, -2)  # (batch, dim, T, N)


def _coefficients(u, delta, A, B, t0, t1, exp=torch.exp):
    """a = exp(delta·A) and b = delta·B·u for steps t0..t1-1: each (batch, dim, T, d_state).
    With exp=torch.expm1 the first is a − 1 = expm1(delta·A) instead."""
    dt = delta[:, :, t0:t1, None]  # (batch, dim, T, 1)
    a = exp(dt * A[:, None, :])  # (batch, dim, T, N)
    b = (dt * u[:, :, t0:t1, None]) * _per_step(B, u.shape[1], t0, t1)  # (batch, dim, T, N)
    return a, b


def _readout(x, C, t0, t1):
    """y_t = C_t · x_t for a run of states x: (batch, dim, T, N) -> (batch, dim, T)."""
    return (x * _per_step(C, x.shape[1], t0, t1)).sum(-1)


def _scan_sequential(u, delta, A, B, C, x):
    """The loop over L, one step at a time. O(L) Python steps — the clarity baseline."""
    ys = []
    for t in range(u.shape[-1]):
        a, b = _coefficients(u, delta, A, B, t, t + 1)  # (batch, dim, 1, N)
        x = a[:, :, 0] * x + b[:, :, 0]  # (batch, dim, N)
        ys.append(_readout(x[:, :, None], C, t, t + 1))  # (batch, dim, 1)
    return torch.cat(ys, dim=-1), x


def _hillis_steele(alpha, b):
    """Inclusive prefix scan of the pairs (a, b) = (1 + alpha, b) along dim 2: returns (a_1⋯a_t − 1, x_t with x_0 = 0).

    Round with offset k: position t absorbs the pair k steps before it, (a, b)[t-k] ∘ (a, b)[t]; positions
    t < k absorb the identity (1, 0) instead (the padding). After rounds k = 1, 2, 4, ... position t summarises
    steps max(1, t-2k+1)..t, so log2(L) rounds finish. Out of place, so autograd can see every round.

    Why alpha = a − 1 and not a: a long memory has a = e^(ΔA) just below 1, 1 − m·2^-24 in float32 with m a whole
    number. The product of two of them is 1 − (m + m')·2^-24 + m·m'·2^-48, and float32 rounds the last term away
    while it is under half a unit: always downwards, so these roundings add up like n·eps, not sqrt(n)·eps, and
    a scan whose rounds multiply the a's is biased, its float32 error growing like L. Combining a − 1 instead,
    (a1·a2) − 1 = alpha2 + alpha1·a2, keeps that term: every rounding is relative to alpha, not to 1, and the
    error no longer grows with L (python -m minijamba.bench accuracy measures it; tests/test_scan_accuracy.py
    checks the scans against the loop on such decays). The price is paid where it costs nothing: a product far
    below 1 is exact to eps absolutely rather than relatively, and what it multiplies is that small.
    """
    L, k = alpha.shape[2], 1
    while k < L:
        alpha_before = F.pad(alpha[:, :, :-k], (0, 0, k, 0), value=0.0)  # (batch, dim, L, N): a[t-k] − 1, or 0
        b_before = F.pad(b[:, :, :-k], (0, 0, k, 0), value=0.0)  # b[t-k], or 0
        a = 1 + alpha
        alpha, b = torch.addcmul(alpha, alpha_before, a), torch.addcmul(b, a, b_before)
        k *= 2
    return alpha, b


def _scan_chunk(u, delta, A, B, C, x0, t0, t1):
    """Steps t0..t1-1 from state x0: (y (batch, dim, T), last state (batch, dim, N))."""
    alpha, b = _coefficients(u, delta, A, B, t0, t1, exp=torch.expm1)
    alpha_prefix, x = _hillis_steele(alpha, b)
    x0 = x0[:, :, None]  # (batch, dim, 1, N)
    x = x0 + torch.addcmul(x, alpha_prefix, x0)  # (batch, dim, T, N): x_t = (a_1⋯a_t) x_0 + scan of b
    # The last state as a copy: a view would keep the whole (batch, dim, T, N) chunk alive in an inference cache.
    return _readout(x, C, t0, t1), x[:, :, -1].clone()


def _scan_parallel(u, delta, A, B, C, x0):
    return _scan_chunk(u, delta, A, B, C, x0, 0, u.shape[-1])


def _scan_chunked(u, delta, A, B, C, x0, chunk=DEFAULT_CHUNK):
    ys, x = [], x0
    for t0 in range(0, u.shape[-1], chunk):
        t1 = min(t0 + chunk, u.shape[-1])
        if torch.is_grad_enabled():  # keep only x at chunk boundaries; recompute the chunk in backward
            y, x = checkpoint(_scan_chunk, u, delta, A, B, C, x, t0, t1, use_reentrant=False)
        else:
            y, x = _scan_chunk(u, delta, A, B, C, x, t0, t1)
        ys.append(y)
    return torch.cat(ys, dim=-1), x


IMPLS = {"sequential": _scan_sequential, "parallel": _scan_parallel, "chunked": _scan_chunked}
# The kernels of cuda/ (minijamba.fused), named after what runs them, and the device each one's tensors live on.
# Here rather than in fused.py, so that naming and checking a fused impl never imports the extension machinery.
FUSED_DEVICES = {"cpu": "cpu", "cuda": "cuda", "cuda-emulated": "cpu"}
FUSED_IMPLS = tuple(FUSED_DEVICES)
IMPL_CHOICES = ("auto", *IMPLS, *FUSED_IMPLS)  # every value of selective_scan's impl (and SelectiveSSM's scan_impl)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Parameters and states: float32 when u is 16-bit (16 bits cannot carry a state through thousands of steps, nor
# hold A's and D's small learned updates), u's dtype otherwise. The sequences delta, z, B, C have u's dtype.
_STATE_ARGUMENTS = ("A", "D", "delta_bias", "initial_state")
_warned = set()  # the kinds whose failed build "auto" has already warned about


def resolve_impl(impl, u):
    """The implementation that runs for `impl` on u: "auto" resolved as selective_scan resolves it, any other as is."""
    return _auto_impl(u) if impl == "auto" else impl


def _auto_impl(u):
    """The fused kernel for u's device if it builds, else "chunked" (warning once per process and kind)."""
    from . import fused  # here, not at the top: only a fused impl or "auto" loads the extension machinery

    if u.device.type not in ("cpu", "cuda"):  # meta (shapes only), mps: no kernel to build, nothing to warn about
        return "chunked"
    kind = u.device.type
    try:
        fused.load(kind)
        return kind
    except fused.BuildError as error:
        if kind not in _warned:
            _warned.add(kind)
            warnings.warn(
                f"selective_scan: using the chunked torch scan instead of the fused one: {error}", stacklevel=4
            )
        return "chunked"


def _check_tensors(u, tensors, impl):
    if impl not in IMPL_CHOICES:
        raise ValueError(f"impl must be one of {IMPL_CHOICES}, got {impl!r}")
    if u.dtype not in (torch.float32, torch.float64, *SIXTEEN_BIT):
        raise ValueError(f"u must be float32 or float64, or float16 or bfloat16 (computed in float32), got {u.dtype}")
    for name, t in tensors.items():
        if t is None and name not in ("delta", "A", "B", "C"):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if u.dtype in SIXTEEN_BIT and name in _STATE_ARGUMENTS:
            if t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 when u is {u.dtype} (its states are float32), got {t.dtype}")
        elif t.dtype != u.dtype:
            raise ValueError(f"{name} must have u's dtype {u.dtype}, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} must be on u's device {u.device}, got {t.device}")
    if u.dim() != 3 or u.shape[-1] == 0:
        raise ValueError(f"u must have shape (batch, dim, L) with L >= 1, got {tuple(u.shape)}")


def selective_scan(
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
    impl="chunked",
):
    """The selective scan, with the arguments and semantics of `reference.selective_scan_ref`.

    u, delta, z: (batch, dim, L);  A: (dim, N);  D, delta_bias: (dim,);  initial_state: (batch, dim, N);
    B, C: (dim, N) time-invariant, (batch, N, L) selective, or (batch, groups, N, L) grouped.
    Returns y: (batch, dim, L), and the last state (batch, dim, N) when return_last_state; a scan of [u1, u2]
    equals a scan of u1 and then of u2 from its last state. float32 or float64; differentiable in everything.
    u may also be float16 or bfloat16, as in the official kernel: then delta, z, B, C and y are 16-bit, while A, D,
    delta_bias, initial_state and the last state are float32, and every scan computes in float32.
    impl: one of IMPL_CHOICES (the module docstring says what each is); the default is the chunked torch scan.
    """
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"u must be a torch.Tensor, got {type(u).__name__}")
    tensors = dict(delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    _check_tensors(u, tensors, impl)
    check_selective_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if A.shape[1] == 0:  # the torch scans would return D·u; the fused kernels have no state to loop over
        raise ValueError(f"A must be (dim, N) with d_state N >= 1, got {tuple(A.shape)}")
    if impl in FUSED_IMPLS and u.device.type != FUSED_DEVICES[impl]:
        raise ValueError(f"impl={impl!r} needs tensors on the {FUSED_DEVICES[impl]} device, u is on {u.device}")

    impl = resolve_impl(impl, u)
    if impl in FUSED_IMPLS:
        from . import fused  # here, not at the top: see _auto_impl

        y, last_state = fused.fused_selective_scan(
            impl, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
        return (y, last_state) if return_last_state else y
    dtype = u.dtype
    if dtype in SIXTEEN_BIT:  # computed in float32 like the kernels; only y is rounded back to 16 bits
        u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
        z = None if z is None else z.float()
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = softplus(delta)
    x0 = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state
    y, last_state = IMPLS[impl](u, delta, A, B, C, x0)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    y = y.to(dtype)
    return (y, last_state) if return_last_state else y
