"""How far each selective scan's float32 answer is from float64, at a Mamba layer's size, and how that grows with L.

python -m minijamba.bench accuracy [--regime official] [--lengths 512,1024,2048,4096] [--impls ...]

Float32 keeps 24 bits: each rounding moves a number by at most eps = 2^-24 ≈ 6e-8 of itself. A scan does L steps
and its backward sums over L, so its error grows with L, and how fast depends on the algorithm: errors that fall
at random add up like a random walk, ~sqrt(n)·eps after n roundings, while a rounding that always goes the same
way adds up like n·eps. Here every implementation scans the same inputs (float32 numbers, so that both
precisions see exactly the same ones) at batch 2, dim 512, N 16 by default, and the table reports, for the output
y, the last state and the gradient of every input, the error measure of tests/tolerances.py:
    max |float32 result − float64 result| / max |float64 result|.
The float64 y and last state come from the NumPy reference (minijamba.reference.selective_scan_ref); the float64
gradients from the CPU twin in float64, the fastest float64 route, which tests/test_fused_scan.py ties to autograd
through the sequential scan (rtol 1e-10) and tests/test_scan_accuracy.py to the chunked scan at L = 2048. The
gradients are those of a loss Σ w·y + Σ w'·last_state with w, w' ~ N(0, 1), as a training step would send back.
Any impl of minijamba.scan can be measured: "cuda" on a GPU, "cuda-emulated" (the same kernels on this CPU) here.

The last column fits error ∝ L^p over the lengths measured (the largest error of any output, per impl): p ≈ 0.5
is the random walk, p ≈ 1 a bias. tests/tolerances.py's float32 rows are stated from these numbers.

Regimes (u, B, C, D, z and the initial state are N(0, 1) in both; softplus on delta + delta_bias in both):
    official  the scales of state-spaces/mamba's tests/ops/test_selective_scan.py: A = −0.5·U(0, 1),
              delta = 0.5·U(0, 1), delta_bias = 0.5·U(0, 1). Some channels have |A| ≪ 1, so a = e^(ΔA) ≈ 1:
              a memory as long as the sequence, the state a sum of L terms, the hardest case for float32.
    tests     the distributions of tests/test_scan.py's make_inputs: A = −e^N(0, 1), delta and delta_bias
              ~ N(0, 1). |A| rarely falls below 0.03, so memories last tens of steps, and the forward's
              errors are smaller than in the official regime.
"""

import math
import time

import numpy as np
import torch

from .. import fused
from ..reference import selective_scan_ref
from ..scan import FUSED_DEVICES, FUSED_IMPLS, IMPLS, selective_scan
from .measure import describe_machine, int_list, pos_float, pos_int
from .scan import _estimated_bytes, checked_impls

REGIMES = ("official", "tests")
INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
OUTPUTS = ("y", "last_state", *(f"d{name}" for name in INPUTS))
SHORT = {"last_state": "last", "ddelta_bias": "dbias", "dinitial_state": "dx0"}  # table headers


def scan_inputs(regime, batch, dim, N, L, time_invariant=False, initial_state=True, seed=0):
    """The scan's arguments in `regime`, with D, z, delta_bias and softplus on: float64 tensors that hold float32
    numbers, so that a float32 copy is exact. B and C are (batch, N, L), or (dim, N) when time_invariant."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float().double()

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64).float().double()

    bc_shape = (dim, N) if time_invariant else (batch, N, L)
    args = dict(u=randn(batch, dim, L), B=randn(*bc_shape), C=randn(*bc_shape), D=randn(dim), z=randn(batch, dim, L))
    if regime == "official":
        args.update(delta=0.5 * rand(batch, dim, L), A=-0.5 * rand(dim, N), delta_bias=0.5 * rand(dim))
    else:
        args.update(delta=randn(batch, dim, L), A=-randn(dim, N).exp().float().double(), delta_bias=randn(dim))
    if initial_state:
        args["initial_state"] = randn(batch, dim, N)
    return {**{k: args[k] for k in INPUTS if k in args}, "delta_softplus": True}


def loss_weights(args, seed=1):
    """w (batch, dim, L) and w' (batch, dim, N) ~ N(0, 1), float32 numbers held in float64."""
    g = torch.Generator().manual_seed(seed)
    batch, dim, L = args["u"].shape
    N = args["A"].shape[1]
    shapes = ((batch, dim, L), (batch, dim, N))
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64).float().double() for shape in shapes)


def scan_outputs(args, impl, dtype, weights):
    """{name: CPU tensor} of OUTPUTS, for impl run in dtype (on the GPU for "cuda"): y, the last state and the
    gradient of every input tensor for the loss Σ w·y + Σ w'·last_state."""
    device = FUSED_DEVICES.get(impl, "cpu")
    tensors = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    leaves = {k: v.to(device, dtype, copy=True).requires_grad_() for k, v in tensors.items()}
    y, last = selective_scan(**{**args, **leaves}, return_last_state=True, impl=impl)
    w_y, w_last = (w.to(device, dtype) for w in weights)
    ((y * w_y).sum() + (last * w_last).sum()).backward()
    outputs = {"y": y.detach(), "last_state": last.detach(), **{f"d{k}": v.grad for k, v in leaves.items()}}
    return {k: v.cpu() for k, v in outputs.items()}


def expected_outputs(args, weights):
    """The float64 answers: y and the last state from the NumPy reference, the gradients from the CPU twin."""
    numpy_args = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    y, last = selective_scan_ref(**numpy_args, return_last_state=True)
    grads = scan_outputs(args, "cpu", torch.float64, weights)
    return {**grads, "y": torch.from_numpy(y), "last_state": torch.from_numpy(last)}


def relative_errors(got, expected):
    """{name: max |got − expected| / max |expected|} for every output both have, in float64."""
    errors = {}
    for name, e in expected.items():
        g = got[name].detach().double()
        errors[name] = float((g - e).abs().max() / e.abs().max())
    return errors


def growth_exponent(lengths, errors):
    """p of the least-squares fit error ≈ c · L^p on a log-log scale (nan with fewer than two finite points)."""
    pairs = [(math.log(L), math.log(e)) for L, e in zip(lengths, errors, strict=True) if e > 0 and math.isfinite(e)]
    if len(pairs) < 2:
        return math.nan
    x, y = np.array(pairs).T
    return float(np.polyfit(x, y, 1)[0])


def add_arguments(parser):
    parser.add_argument("--regime", choices=REGIMES, default="official")
    parser.add_argument("--batch", type=pos_int, default=2)
    parser.add_argument("--dim", type=pos_int, default=512, help="channels (d_inner)")
    parser.add_argument("--d-state", type=pos_int, default=16)
    parser.add_argument("--lengths", type=int_list, default="512,1024,2048,4096", help="comma-separated L values")
    choices = [*IMPLS, *FUSED_IMPLS]
    parser.add_argument("--impls", default="sequential,parallel,chunked,cpu", help=f"comma-separated, from {choices}")
    parser.add_argument("--time-invariant", action="store_true", help="B and C of shape (dim, N)")
    parser.add_argument("--max-gb", type=pos_float, default=4.0, help="skip runs estimated to need more memory")


def run(args):
    lengths = args.lengths
    impls = checked_impls(args.impls)
    for impl in [i for i in impls if i in FUSED_IMPLS]:
        fused.load(impl)  # a failed build says why here, before any time is spent
    bc = "(dim, N)" if args.time_invariant else "(batch, N, L)"
    print(f"float32 vs float64, regime {args.regime}: batch {args.batch}, dim {args.dim}, d_state {args.d_state}, "
          f"B and C {bc}, every option on")  # fmt: skip
    print(f"machine: {describe_machine()}")
    print("error = max |float32 - float64| / max |float64|, per output; p: fit of max error ∝ L^p")
    columns = [SHORT.get(name, name) for name in OUTPUTS]
    header = f"{'impl':>13} {'L':>5} {'s':>5} | " + " ".join(f"{c:>7}" for c in columns) + " |    p"
    print(header)
    print("-" * len(header))
    table = {}
    for impl in impls:
        tiny = scan_inputs(args.regime, 1, 2, 2, 8, args.time_invariant)
        scan_outputs(tiny, impl, torch.float32, loss_weights(tiny))  # the first call of a kind is slow: warm up
        worst = []
        for L in lengths:
            scan_args = scan_inputs(args.regime, args.batch, args.dim, args.d_state, L, args.time_invariant)
            weights = loss_weights(scan_args)
            if _estimated_bytes(impl, args.batch, args.dim, args.d_state, L, True) > args.max_gb * 2**30:
                print(f"{impl:>13} {L:>5}   skipped: predicted to need more than --max-gb {args.max_gb:g} GB")
                worst.append(math.nan)
                continue
            start = time.perf_counter()
            got = scan_outputs(scan_args, impl, torch.float32, weights)
            seconds = time.perf_counter() - start
            errors = relative_errors(got, expected_outputs(scan_args, weights))
            table[impl, L] = errors
            worst.append(max(errors.values()))
            cells = " ".join(f"{errors[name]:7.1e}" if name in errors else f"{'-':>7}" for name in OUTPUTS)
            p = f"{growth_exponent(lengths, worst):4.2f}" if L == lengths[-1] else ""  # on the impl's last row
            print(f"{impl:>13} {L:>5} {seconds:5.1f} | {cells} | {p}", flush=True)
    return table
