"""Benchmark the selective-scan implementations: forward and forward+backward time, and peak extra memory, vs L.

The shape is a Mamba layer's (batch 2, d_inner 512, d_state 16, fp32) with every option on (selective B and C,
D, z, delta_bias, softplus), as a Mamba block calls it. Forward runs under torch.no_grad (inference);
forward+backward runs with gradients for every input (training).
"""

import math

import torch

from ..scan import DEFAULT_CHUNK, IMPLS, selective_scan
from ..teaching import save_figure
from .measure import best_time, describe_machine, peak_extra_bytes


def add_arguments(parser):
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512, help="channels (d_inner)")
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192", help="comma-separated L values")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {list(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip runs estimated to need more memory")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="skip runs predicted to take longer")
    parser.add_argument("--no-figure", action="store_true")


def _inputs(batch, dim, N, L, requires_grad):
    g = torch.Generator().manual_seed(0)
    t = dict(
        u=torch.randn(batch, dim, L, generator=g),
        delta=torch.randn(batch, dim, L, generator=g) - 2,  # softplus(-2) ≈ 0.13: Mamba's typical step size
        A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(batch, N, L, generator=g),
        C=torch.randn(batch, N, L, generator=g),
        D=torch.ones(dim),
        z=torch.randn(batch, dim, L, generator=g),
        delta_bias=torch.zeros(dim),
    )
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def _estimated_bytes(impl, batch, dim, N, L, backward):
    """A rough upper bound of the big (batch, dim, L|T, N) tensors an impl holds, to skip runs that won't fit."""
    state = batch * dim * N * 4
    steps = {"parallel": L, "chunked": DEFAULT_CHUNK}.get(impl, 1)
    rounds = max(1, math.ceil(math.log2(steps)))
    held = 4 * steps * state  # a, b and their products during one round
    if backward and impl == "parallel":
        held += 2 * rounds * L * state  # autograd keeps every Hillis-Steele round
    elif backward:
        held += 3 * L * state if impl == "sequential" else 0
    return held


def _measure(impl, batch, dim, N, L, backward, repeats):
    args = _inputs(batch, dim, N, L, requires_grad=backward)

    def forward():
        with torch.no_grad():
            selective_scan(**args, delta_softplus=True, impl=impl)

    def forward_backward():
        y = selective_scan(**args, delta_softplus=True, impl=impl)
        y.backward(torch.ones_like(y))

    fn = forward_backward if backward else forward
    return best_time(fn, repeats=repeats), peak_extra_bytes(fn)


def run(args):
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = args.impls.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    print(f"selective scan, batch {args.batch}, dim {args.dim}, d_state {args.d_state}, fp32")
    print(f"machine: {describe_machine()}")
    header = f"{'impl':>10} {'L':>6} | {'fwd ms':>9} {'fwd MB':>8} | {'fwd+bwd ms':>10} {'fwd+bwd MB':>10}"
    print(header)
    print("-" * len(header))
    results, last = {}, {}  # last[impl, backward] = (L, seconds) of the previous length, to predict the next
    for impl in impls:
        for L in lengths:
            row = []
            for backward in (False, True):
                need = _estimated_bytes(impl, args.batch, args.dim, args.d_state, L, backward)
                prev_L, prev_s = last.get((impl, backward), (L, 0.0))
                if need > args.max_gb * 2**30 or prev_s * L / prev_L > args.max_seconds:
                    row.append((math.nan, math.nan))
                    continue
                seconds, peak = _measure(impl, args.batch, args.dim, args.d_state, L, backward, args.repeats)
                last[impl, backward] = (L, seconds)
                row.append((seconds * 1e3, peak / 2**20))
            results[impl, L] = row
            (f_ms, f_mb), (b_ms, b_mb) = row
            print(f"{impl:>10} {L:>6} | {f_ms:9.1f} {f_mb:8.1f} | {b_ms:10.1f} {b_mb:10.1f}", flush=True)
    print("nan: skipped, predicted to need more than --max-gb of memory or --max-seconds per run")
    if not args.no_figure:
        print(f"wrote {_plot(results, impls, lengths, args)}")
    return results


def _plot(results, impls, lengths, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("forward time (ms)", 0, 0), ("forward+backward time (ms)", 1, 0), ("fwd+bwd peak extra MB", 1, 1)]
    for ax, (title, mode, column) in zip(axes, panels, strict=True):
        for impl in impls:
            ax.loglog(lengths, [results[impl, L][mode][column] for L in lengths], "o-", label=impl)
        ax.set_title(title)
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"selective scan on CPU: batch {args.batch}, dim {args.dim}, d_state {args.d_state}, fp32")
    return save_figure(fig, "bench_scan_cpu")
