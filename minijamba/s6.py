"""S6: the selective state space layer at the heart of Mamba, in torch.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", §3.2 and Algorithm 2.
S4 (lesson 01) runs one fixed linear system over the whole sequence. S6 makes three of its parameters functions
of the current input, so the layer can choose, token by token, what to write into its state and what to forget:
    Δ_t = softplus(s_Δ(u_t) + bias)    (s_Δ: a rank-R projection from d_inner channels back to d_inner)
    B_t = s_B(u_t),   C_t = s_C(u_t)    (linear maps from d_inner channels to N numbers, shared by the channels)
    x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t,    y_t = C_t x_t + D u_t
and `minijamba.scan.selective_scan` runs that recurrence (`reference.selective_scan_ref` is its float64 oracle).
With `selective=False` Δ, B and C are plain learnable parameters again: the same code then is an LTI SSM (S4D-Real
with Mamba's discretization), so the paper's S4-vs-S6 comparison is one switch (lesson 02).

Glossary, in the README's notation (code name — meaning; the Mamba paper's letter where it differs):
    d_inner      — the channels the layer runs side by side (the scan's dim; Mamba's expand · d_model; paper D)
    d_state      — N, the state size of each channel
    dt_rank      — R, the rank of the Δ projection (the paper's s_Δ(x) = Broadcast_D(Linear_1(x)) is R = 1);
                   a Mamba block's is auto_dt_rank(d_model)
    u            — the layer's input (batch, d_inner, L) (paper x)
    x, state     — the hidden state (batch, d_inner, N) (paper h)
    y            — the output (batch, d_inner, L)
    delta        — Δ, the step size, (batch, d_inner, L), positive through τ_Δ = softplus
    x_proj       — s_B, s_C and the first half of s_Δ: d_inner -> R + 2N, no bias
    dt_proj      — the second half of s_Δ: R -> d_inner; its bias is Δ's parameter (the "Parameter" in
                   τ_Δ(Parameter + s_Δ(u)))
    dt_bias      — that bias when selective=False: Δ = softplus(dt_bias), one step size per channel
    A_log        — log(-A): A = -exp(A_log), (d_inner, N), real and negative so every mode decays
    B, C         — B, C: (batch, N, L) selective, or (d_inner, N) parameters when selective=False
    D            — the skip connection y += D u, (d_inner,), and nothing else
    dt_norm, B_norm, C_norm — Jamba's norms on Δ's rank-R input, B and C (`inner_norm`; not in the Mamba paper)

Where this differs from the official `mamba_simple.py` (state-spaces/mamba), and why:
  - It is only the SSM: no in_proj, conv1d, SiLU or out_proj. Those make the Mamba block (lesson 04), which passes
    its gate z in (`forward(u, z=...)`); keeping them out lets the lessons put S6 next to S4D alone.
  - dt_rank is an int, 1 by default (the paper's R = 1, §3.2), and has no "auto": Mamba's "auto" is
    ceil(d_model / 16), and this layer never sees d_model. `auto_dt_rank` is that rule, the one meaning of "auto"
    in this package: MambaConfig and JambaConfig apply it and pass the layer an int.
  - Only Mamba's default initialisation ("random" log-uniform Δ, dt_scale 1) is offered.
  - A_log and D are float32 unless the layer is float64, where they follow (the scan needs one dtype, and the
    float64 tests compare with the reference). The official code keeps them float32 under any module dtype.
  - `selective=False` (the LTI switch) and `ssm_parameters` (Δ, B, C for a plot) are additions for the lessons.
  - The scan defaults to "chunked", a torch scan (lesson 03), where the official layer always calls the fused
    CUDA kernel: a reader's layer runs the code the lessons teach, and the fused kernels (scan_impl "cpu",
    "cuda" or "auto"; lesson 07) run where they are asked for, as training does.
  - `inner_norm` is Jamba's addition (Jamba paper §6.4, HF JambaMambaMixer): norms on the rank-R part of Δ, and on
    B and C, right after x_proj, which the Jamba authors found to stop loss spikes at scale. Off by default.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.checks import positive_int, positive_real
from minijamba.scan import IMPL_CHOICES, selective_scan, softplus

__all__ = ["SelectiveSSM", "auto_dt_rank"]


def auto_dt_rank(d_model):
    """Mamba's dt_rank="auto": R = ceil(d_model / 16) for a block of width d_model.

    The rule of state-spaces/mamba's mamba_simple.py (`math.ceil(self.d_model / 16)`), and of Hugging Face's
    MambaConfig (time_step_rank) and JambaConfig (mamba_dt_rank) with their hidden_size; MambaConfig and
    JambaConfig resolve "auto" with it, and check d_model and the result as they check every field."""
    return math.ceil(d_model / 16)


def _inverse_softplus(y):
    """x with softplus(x) = y, i.e. x = log(e^y - 1) = y + log(1 - e^-y); expm1 keeps it exact for tiny y."""
    return y + torch.log(-torch.expm1(-y))


class SelectiveSSM(nn.Module):
    """The S6 layer: (batch, d_inner, L) -> (batch, d_inner, L), with Δ, B, C chosen by the input.

    dt_rank: R, an int, 1 by default (the paper's s_Δ); a Mamba block passes auto_dt_rank(d_model).
    scan_impl: one of minijamba.scan.IMPL_CHOICES, "chunked" (a torch scan) by default; "auto" or a fused kernel's
    name runs the kernels of lesson 07.
    """

    def __init__(
        self,
        d_inner,
        d_state=16,
        dt_rank=1,
        dt_min=1e-3,
        dt_max=1e-1,
        dt_init_floor=1e-4,
        selective=True,
        scan_impl="chunked",
        inner_norm=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        positive_int("d_inner", d_inner)
        positive_int("d_state", d_state)
        if dt_rank == "auto":
            raise ValueError("dt_rank must be an int: Mamba's 'auto' reads d_model, pass auto_dt_rank(d_model)")
        positive_int("dt_rank", dt_rank)
        positive_real("dt_min", dt_min)
        positive_real("dt_max", dt_max)
        if dt_max < dt_min:
            raise ValueError(f"dt_max must be >= dt_min={dt_min!r}, got {dt_max!r}")
        positive_real("dt_init_floor", dt_init_floor)
        if not isinstance(selective, bool):
            raise ValueError(f"selective must be True or False, got {selective!r}")
        if scan_impl not in IMPL_CHOICES:
            raise ValueError(f"scan_impl must be one of {IMPL_CHOICES}, got {scan_impl!r}")
        if inner_norm is not None and not (selective and callable(inner_norm)):
            raise ValueError(f"inner_norm must be None or a size -> module callable (selective only): {inner_norm!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        factory = {"device": device, "dtype": dtype}
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.selective, self.scan_impl = selective, scan_impl

        # Δ's initial value: log-uniform in [dt_min, dt_max], floored, stored through softplus's inverse. Drawn and
        # computed on the CPU, then moved: math on meta tensors (sizing a model without building it) first imports
        # torch's compiler stack, seconds of it, and the CPU's generator makes one seed one init on every device.
        u01 = torch.rand(d_inner, dtype=torch.float64)  # (d_inner,), cast to dtype below
        dt = torch.exp(math.log(dt_min) + u01 * (math.log(dt_max) - math.log(dt_min))).clamp(min=dt_init_floor)
        if selective:
            self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **factory)
            self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
            # Keep s_Δ's contribution O(1) at init, so Δ starts near the sampled dt.
            nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
            with torch.no_grad():
                self.dt_proj.bias.copy_(_inverse_softplus(dt))
            self.dt_proj.bias._no_reinit = True  # a model-wide re-init (zeroing biases) must leave Δ's init alone
        else:
            self.dt_bias = nn.Parameter(_inverse_softplus(dt).to(**factory))  # (d_inner,)
            self.dt_bias._no_reinit = True
            # S4D's choice: B = 1 and C random, scaled so y starts at the scale of u.
            self.B = nn.Parameter(torch.ones(d_inner, d_state, **factory))  # (d_inner, N)
            self.C = nn.Parameter(torch.randn(d_inner, d_state, **factory) / math.sqrt(d_state))  # (d_inner, N)
        # Jamba's optional norms (e.g. inner_norm = partial(RMSNorm, eps=1e-6)), built for the sizes they normalise.
        has_norms = inner_norm is not None
        self.dt_norm = inner_norm(dt_rank) if has_norms else None
        self.B_norm = inner_norm(d_state) if has_norms else None
        self.C_norm = inner_norm(d_state) if has_norms else None

        # S4D-Real: A = -(1, 2, ..., N) in every channel, stored as its log so A stays negative while it learns.
        ssm_dtype = torch.promote_types(dtype, torch.float32)
        A = torch.arange(1, d_state + 1, dtype=ssm_dtype).repeat(d_inner, 1)  # (d_inner, N), on the CPU as Δ
        self.A_log = nn.Parameter(torch.log(A).to(device))
        self.D = nn.Parameter(torch.ones(d_inner, device=device, dtype=ssm_dtype))  # (d_inner,)
        self.A_log._no_weight_decay = True  # decaying A_log would pull A towards -1, D towards 0
        self.D._no_weight_decay = True

    @property
    def delta_bias(self):
        """Δ's learned offset before the softplus, (d_inner,): dt_proj.bias, or dt_bias when selective=False."""
        return self.dt_proj.bias if self.selective else self.dt_bias

    def _projections(self, u):
        """(s_Δ(u) before bias and softplus (batch, d_inner, L), B, C): the part of Δ, B, C that reads u."""
        if not self.selective:  # LTI: nothing reads u; Δ is its bias alone
            return torch.zeros_like(u), self.B, self.C
        x_dbl = self.x_proj(u.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # (batch, L, R|N|N)
        if self.dt_norm is not None:  # Jamba: normalise each before use, over R and over N
            dt, B, C = self.dt_norm(dt), self.B_norm(B), self.C_norm(C)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (batch, d_inner, L); bias added in the scan
        return dt, B.transpose(1, 2), C.transpose(1, 2)  # (batch, N, L) each

    def ssm_parameters(self, u):
        """The Δ, B, C the layer uses on u: (batch, d_inner, L) -> (delta, B, C).

        delta: (batch, d_inner, L), after the softplus. B, C: (batch, N, L) when selective, else (d_inner, N),
        the same at every step. Lesson 02 plots delta along a sequence to watch the layer select.
        """
        self._check_input("u", u, 3)
        dt, B, C = self._projections(u)
        # LTI: one softplus per channel, so Δ is exactly (not just to rounding) the same at every step.
        if not self.selective:
            return softplus(self.dt_bias)[None, :, None].expand(u.shape[0], -1, u.shape[2]), B, C
        return softplus(dt + self.delta_bias[:, None]), B, C

    def forward(self, u, initial_state=None, return_last_state=False, z=None):
        """u: (batch, d_inner, L) -> y (batch, d_inner, L), and the last state (batch, d_inner, N) if asked.

        Start from initial_state (batch, d_inner, N) to continue a sequence: forward on [u1, u2] equals forward
        on u1, then on u2 from u1's last state. As the official code does, Δ's bias and softplus are passed to
        the scan rather than applied here, and so is a Mamba block's gate z (batch, d_inner, L): y · silu(z).
        """
        self._check_input("u", u, 3)
        if z is not None and (not isinstance(z, torch.Tensor) or z.shape != u.shape):
            raise ValueError(f"z must be None or a tensor of u's shape {tuple(u.shape)}, got {getattr(z, 'shape', z)}")
        # Under autocast the projections come out in 16 bits while u (the conv's output, float32 weights) does not:
        # the scan computes in u's dtype, as it would without autocast.
        dt, B, C = (t.to(u.dtype) for t in self._projections(u))
        z = None if z is None else z.to(u.dtype)
        A = -torch.exp(self.A_log)  # (d_inner, N)
        return selective_scan(
            u,
            dt,
            A,
            B,
            C,
            D=self.D,
            z=z,
            delta_bias=self.delta_bias,
            delta_softplus=True,
            return_last_state=return_last_state,
            initial_state=initial_state,
            impl=self.scan_impl,
        )

    def step(self, u_t, state=None):
        """One token in O(1): u_t (batch, d_inner), state (batch, d_inner, N) or None (zeros) -> (y_t, state).

        The recurrence of the scan, once: A_bar = exp(ΔA), x = A_bar x + Δ B u, y = C x + D u.
        """
        self._check_input("u_t", u_t, 2)
        expected = (u_t.shape[0], self.d_inner, self.d_state)
        if state is None:
            state = u_t.new_zeros(expected)
        elif not isinstance(state, torch.Tensor) or tuple(state.shape) != expected:
            raise ValueError(f"state must have shape {expected}, got {getattr(state, 'shape', state)!r}")
        delta, B, C = self.ssm_parameters(u_t[:, :, None])  # (batch, d_inner, 1), (batch, N, 1) | (d_inner, N)
        delta = delta[:, :, 0]  # (batch, d_inner)
        if self.selective:
            B, C = B[:, None, :, 0], C[:, None, :, 0]  # (batch, 1, N): shared by every channel
        A_bar = torch.exp(delta[..., None] * -torch.exp(self.A_log))  # (batch, d_inner, N)
        state = A_bar * state + (delta * u_t)[..., None] * B  # (batch, d_inner, N)
        y_t = (C * state).sum(dim=-1) + self.D * u_t  # (batch, d_inner)
        return y_t, state

    def _check_input(self, name, t, ndim):
        if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.shape[1] != self.d_inner:
            shape = "(batch, d_inner, L)" if ndim == 3 else "(batch, d_inner)"
            raise ValueError(
                f"{name} must be a tensor of shape {shape} with d_inner={self.d_inner}, got {getattr(t, 'shape', t)!r}"
            )
