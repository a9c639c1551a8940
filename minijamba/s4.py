"""S4D: the diagonal structured state space layer, a linear time-invariant (LTI) SSM, in torch.

Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization of Diagonal State Space Models":
§2-3 (the diagonal SSM, its ZOH and bilinear discretizations, the Vandermonde kernel), §4 (S4D-Lin, S4D-Real).
Each of the H channels is its own single-input single-output SSM with a diagonal A of N states,
    x'(t) = A x(t) + B u(t),   y(t) = C x(t) + D u(t),
run either as one long convolution y = K * u + D u (training: parallel over L) or as the recurrence
x_k = A_bar x_{k-1} + B_bar u_k, y_k = C x_k + D u_k (inference: O(1) per token). `minijamba.reference` is the
float64 oracle both are tested against.

Glossary (code name — symbol in the paper):
    d_model, H     — H, the number of channels (independent SSMs)
    d_state, N     — N, the state size of each channel
    u              — u, the input, (batch, H, L)
    x, state       — x, the hidden state, (batch, H, N)
    y              — y, the output, (batch, H, L)
    A()            — A = diag(a_1..a_N), one row per channel: (H, N)
    log_A_real     — log(-Re A): Re A = -exp(log_A_real) < 0 keeps every mode decaying
    A_imag         — Im A (S4D-Lin only)
    B              — B, fixed to ones: S4D absorbs B into C, since only the product C_n B_n reaches y
    C()            — C, (H, N); complex C_real + i C_imag for S4D-Lin, real C_real for S4D-Real
    D              — D, the skip connection, (H,)
    delta()        — Δ = exp(log_dt), the step size of each channel, (H,)
    A_bar, B_bar   — Ā, B̄, the discretized A and B
    K              — K̄ = (C B̄, C Ā B̄, ..., C Ā^{L-1} B̄), the convolution kernel, (H, L)
    conj_factor    — the 2 of 2·Re(...): N complex states stand for 2N real ones (1 for S4D-Real)

Where this differs from the official minimal S4D (state-spaces/s4, models/s4/s4d.py), and why:
  - d_state counts complex states: official S4D with N makes N/2 complex modes; here d_state=N makes N, the
    same N as reference.s4d_lin(N), so a lesson can compare the two without halving.
  - S4D-Real and the bilinear rule are options, as in the paper's ablations (the minimal code has neither).
  - C is two real (H, N) tensors, C_real and C_imag, rather than one view_as_real (H, N, 2) tensor: every
    parameter then has the shape the glossary says and reads like log_A_real / A_imag, and the optimizer still
    sees plain real tensors, which is why the official code stores a real view in the first place.
  - B_bar uses expm1(ΔA)/A, not (exp(ΔA) - 1)/A: the same number, without cancellation when |ΔA| is tiny.
  - The layer is the bare SSM: no GELU, dropout, or output Conv1d + GLU (the blocks around it live elsewhere),
    and no per-parameter learning rates or weight-decay settings.
  - It adds `step` and `forward(mode="recurrent")`, the RNN view the minimal code leaves out.
"""

import math
from numbers import Real

import torch
from torch import nn

from minijamba import reference
from minijamba.checks import positive_int

__all__ = ["S4D"]

_INITS = ("lin", "real")
_DISCRETIZATIONS = ("zoh", "bilinear")
_MODES = ("conv", "recurrent")
_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def _is_finite_number(x):
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _shape(x):
    """A tensor's shape for an error message, or the value itself when it is not a tensor."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else repr(x)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class S4D(nn.Module):
    """H independent diagonal SSMs of N states: (batch, H, L) -> (batch, H, L)."""

    def __init__(
        self,
        d_model,
        d_state=64,
        init="lin",
        discretization="zoh",
        dt_min=1e-3,
        dt_max=1e-1,
        dtype=None,
        seed=None,
    ):
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_state", d_state)
        _check_choice("init", init, _INITS)
        _check_choice("discretization", discretization, _DISCRETIZATIONS)
        if not (_is_finite_number(dt_min) and dt_min > 0):
            raise ValueError(f"dt_min must be a positive finite number, got {dt_min!r}")
        if not (_is_finite_number(dt_max) and dt_max > dt_min):
            raise ValueError(f"dt_max must be a finite number greater than dt_min={dt_min!r}, got {dt_max!r}")
        dtype = torch.float32 if dtype is None else dtype
        _check_choice("dtype", dtype, tuple(_COMPLEX))

        H, N = self.d_model, self.d_state = d_model, d_state
        self.init, self.discretization = init, discretization
        self.conj_factor = 2.0 if init == "lin" else 1.0
        gen = None if seed is None else torch.Generator().manual_seed(seed)

        # Δ log-uniform in [dt_min, dt_max]: each channel watches the input at its own timescale.
        u01 = torch.rand(H, generator=gen, dtype=dtype)  # (H,)
        self.log_dt = nn.Parameter(math.log(dt_min) + u01 * (math.log(dt_max) - math.log(dt_min)))

        A0 = reference.s4d_lin(N) if init == "lin" else reference.s4d_real(N)  # (N,) NumPy
        log_A_real = torch.log(torch.as_tensor(-A0.real, dtype=dtype))  # (N,)
        self.log_A_real = nn.Parameter(log_A_real.repeat(H, 1))  # (H, N)
        self.register_buffer("B", torch.ones(H, N, dtype=dtype))  # (H, N)
        if init == "lin":
            self.A_imag = nn.Parameter(torch.as_tensor(A0.imag, dtype=dtype).repeat(H, 1))  # (H, N)
            # C ~ complex standard normal (E|C|^2 = 1), like torch.randn(..., dtype=cfloat) in official S4D.
            self.C_real = nn.Parameter(torch.randn(H, N, generator=gen, dtype=dtype) / math.sqrt(2))
            self.C_imag = nn.Parameter(torch.randn(H, N, generator=gen, dtype=dtype) / math.sqrt(2))
        else:
            self.C_real = nn.Parameter(torch.randn(H, N, generator=gen, dtype=dtype))
        self.D = nn.Parameter(torch.randn(H, generator=gen, dtype=dtype))

    # ------------------------------------------------------------------------------------------------------
    # The continuous system, its discretization and its kernel
    # ------------------------------------------------------------------------------------------------------

    def A(self):
        """The diagonal of A, (H, N): complex -exp(log_A_real) + i A_imag for "lin", real for "real"."""
        if self.init == "lin":
            return torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return -torch.exp(self.log_A_real)

    def C(self):
        """C, (H, N): complex C_real + i C_imag for "lin", real C_real for "real"."""
        if self.init == "lin":
            return torch.complex(self.C_real, self.C_imag)
        return self.C_real

    def delta(self):
        """The step size Δ of each channel, (H,)."""
        return torch.exp(self.log_dt)

    def discrete(self):
        """(A_bar, B_bar), each (H, N): zero-order hold or bilinear, elementwise since A is diagonal."""
        A = self.A()  # (H, N)
        dA = self.delta()[:, None] * A  # (H, N)
        if self.discretization == "zoh":
            return torch.exp(dA), torch.expm1(dA) / A * self.B  # expm1: exact as |ΔA| -> 0
        left = 1 - dA / 2
        return (1 + dA / 2) / left, self.delta()[:, None] * self.B / left

    def kernel(self, L):
        """K, (H, L): K[h, k] = conj_factor · Re(sum_n C[h, n] B_bar[h, n] A_bar[h, n]^k).

        The powers come from one vectorised exp over an (H, N, L) grid, A_bar^k = exp(k log A_bar) (a
        Vandermonde matrix), as the official S4D does: parallel in k, where a running product would be a loop.
        For ZOH log A_bar = ΔA exactly, so no log is taken. For bilinear we take the complex log, which also
        covers a real A_bar < 0 (log|a| + iπ, once Δ|A| > 2); an integer power A_bar^k does not depend on
        the branch of the log.
        """
        positive_int("L", L)
        A_bar, B_bar = self.discrete()  # (H, N) each
        if self.discretization == "zoh":
            log_A_bar = self.delta()[:, None] * self.A()  # (H, N)
        else:
            log_A_bar = torch.log(A_bar.to(_COMPLEX[self.log_dt.dtype]))  # (H, N)
        k = torch.arange(L, device=A_bar.device, dtype=self.log_dt.dtype)  # (L,)
        powers = torch.exp(log_A_bar[..., None] * k)  # (H, N, L): A_bar^k
        K = ((self.C() * B_bar)[..., None] * powers).sum(dim=1)  # (H, L)
        return self.conj_factor * K.real

    # ------------------------------------------------------------------------------------------------------
    # Running it: convolution (parallel) or recurrence (one step at a time)
    # ------------------------------------------------------------------------------------------------------

    def forward(self, u, mode="conv"):
        """y = K * u + D u: (batch, H, L) -> (batch, H, L). mode: "conv" (FFT) or "recurrent" (step loop)."""
        _check_choice("mode", mode, _MODES)
        if not isinstance(u, torch.Tensor) or u.ndim != 3:
            raise ValueError(f"u must be a tensor of shape (batch, d_model, L), got {_shape(u)}")
        batch, H, L = u.shape
        if H != self.d_model:
            raise ValueError(f"u must have d_model={self.d_model} channels on axis 1, got {H}")
        if L < 1:
            raise ValueError("u must have a sequence length L >= 1, got 0")
        if mode == "recurrent":  # O(L) Python loop: the RNN view, for inference and for checking "conv"
            state = self.initial_state(batch)  # (batch, H, N)
            ys = []
            for t in range(L):
                y_t, state = self.step(u[:, :, t], state)  # (batch, H)
                ys.append(y_t)
            return torch.stack(ys, dim=-1)  # (batch, H, L)
        # Zero-pad both to 2L: the FFT's product is a circular convolution, and without the padding the
        # end of the sequence would wrap around onto its start (breaking causality).
        K_f = torch.fft.rfft(self.kernel(L), n=2 * L)  # (H, L + 1)
        u_f = torch.fft.rfft(u, n=2 * L)  # (batch, H, L + 1)
        y = torch.fft.irfft(u_f * K_f, n=2 * L)[..., :L]  # (batch, H, L)
        return y + self.D[:, None] * u

    def initial_state(self, batch):
        """x_0 = 0: (batch, H, N), complex for "lin"."""
        positive_int("batch", batch)
        dtype = _COMPLEX[self.log_dt.dtype] if self.init == "lin" else self.log_dt.dtype
        return torch.zeros(batch, self.d_model, self.d_state, dtype=dtype, device=self.log_dt.device)

    def step(self, u_t, state):
        """One token: x = A_bar x + B_bar u_t, y_t = conj_factor · Re(C x) + D u_t. u_t: (batch, H).

        Returns (y_t, x). O(H N) whatever the position in the sequence; A_bar and B_bar are recomputed at each
        call to keep the step self-contained, which is O(H N) too.
        """
        if not isinstance(u_t, torch.Tensor) or u_t.ndim != 2 or u_t.shape[1] != self.d_model:
            raise ValueError(f"u_t must have shape (batch, d_model={self.d_model}), got {_shape(u_t)}")
        expected = (u_t.shape[0], self.d_model, self.d_state)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
            raise ValueError(f"state must have shape {expected}, got {_shape(state)}")
        A_bar, B_bar = self.discrete()  # (H, N) each
        state = A_bar * state + B_bar * u_t[..., None]  # (batch, H, N)
        y_t = self.conj_factor * (self.C() * state).sum(dim=-1).real + self.D * u_t  # (batch, H)
        return y_t, state
