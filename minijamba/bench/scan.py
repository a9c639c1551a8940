"""Benchmark the selective-scan implementations: forward and forward+backward time, and peak extra memory, vs L.

The shape is a Mamba layer's (batch 2, d_inner 512, d_state 16, fp32) with every option on (selective B and C,
D, z, delta_bias, softplus), as a Mamba block calls it. Forward runs under torch.no_grad (inference);
forward+backward runs with gradients for every input (training).

Rows: the torch scans (minijamba.scan.IMPLS), the fused CPU twin ("cpu") and, where a GPU is present, the CUDA
kernel ("cuda"). A CUDA row also reports its forward against the bandwidth floor (Mamba §3.3.2: the scan is
memory-bound): the bytes that must move, u, delta, z, B, C in and y out, divided by the device's measured
copy bandwidth, as a percentage of the measured forward time.

The CPU twin's rows are put against its compute floor (`compute_floor`): the decays e^(dt·A) and the two
multiply-adds per (step, state) that no forward can skip, timed on data that stays in L1 at the twin's own vector
width and thread count (cuda/selective_scan_cpu.cpp, floor_task), times the shape's batch · dim · L · N updates.
A summary then gives the twin's forward as a multiple of that floor, its backward as a multiple of its forward,
and the torch scans' times as multiples of the twin's.

Lesson 07 uses the pieces: `inputs` (the benchmark's scan inputs), `scan_call` and `time_impls` (interleaved
best-of-rounds timings, for ratios on a shared machine), `floor_bytes` and `unfused_bytes` (the bytes a fused and
a tensor-op scan move), `copy_bandwidth` (of the CPU or the GPU).
"""

import math
import time

import torch

from ..plotting import save_figure
from ..scan import DEFAULT_CHUNK, FUSED_DEVICES, FUSED_IMPLS, IMPLS, selective_scan
from .measure import (
    best_time,
    describe_machine,
    int_list,
    peak_extra_bytes,
    pos_float,
    pos_int,
)


def available_impls():
    """The torch scans, the CPU twin, and the CUDA kernel where a GPU is present."""
    return [*IMPLS, "cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def add_arguments(parser):
    parser.add_argument("--batch", type=pos_int, default=2)
    parser.add_argument("--dim", type=pos_int, default=512, help="channels (d_inner)")
    parser.add_argument("--d-state", type=pos_int, default=16)
    parser.add_argument(
        "--lengths", type=int_list, default="256,512,1024,2048,4096,8192", help="comma-separated L values"
    )
    choices = [*IMPLS, *FUSED_IMPLS]
    parser.add_argument("--impls", default=",".join(available_impls()), help=f"comma-separated, from {choices}")
    parser.add_argument("--repeats", type=pos_int, default=3)
    parser.add_argument("--max-gb", type=pos_float, default=4.0, help="skip runs estimated to need more memory")
    parser.add_argument("--max-seconds", type=pos_float, default=5.0, help="skip runs predicted to take longer")
    parser.add_argument("--no-figure", action="store_true")


def inputs(batch, dim, N, L, requires_grad=False, device="cpu"):
    """A Mamba layer's scan inputs, seeded, with every option on: u, delta, A, B, C, D, z, delta_bias."""
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
    return {k: v.to(device).requires_grad_(requires_grad) for k, v in t.items()}


def scan_call(impl, args, backward):
    """A no-argument function that runs one scan of `impl` on `args`: the forward under no_grad, or the forward and
    a backward of sum(y). On a GPU it waits for the kernels to finish, so that wall-clock time is their time."""
    synchronize = torch.cuda.synchronize if args["u"].is_cuda else lambda: None

    def forward():
        with torch.no_grad():
            selective_scan(**args, delta_softplus=True, impl=impl)
        synchronize()

    def forward_backward():
        y = selective_scan(**args, delta_softplus=True, impl=impl)
        y.backward(torch.ones_like(y))
        synchronize()

    return forward_backward if backward else forward


def device_of(impl, device="cpu"):
    """Where impl's inputs live: a fused kernel's on its device (FUSED_DEVICES), the torch scans' on `device`."""
    return FUSED_DEVICES.get(impl, device)


def time_impls(impls, batch, dim, N, L, backward, rounds=3, device="cpu"):
    """{impl: seconds}, the fastest of `rounds` timed calls of each impl's scan at one shape, after one warm-up.

    Each round calls every impl once, so a change of load on a shared machine while it measures touches all of
    them alike: compare the results with each other, as ratios. The torch scans run on `device`."""
    calls = {i: scan_call(i, inputs(batch, dim, N, L, backward, device_of(i, device)), backward) for i in impls}
    best = dict.fromkeys(impls, math.inf)
    for round_ in range(rounds + 1):
        for impl, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ > 0:  # round 0 warms up: the allocator, the caches, a first build
                best[impl] = min(best[impl], time.perf_counter() - start)
    return best


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
    device = device_of(impl)
    fn = scan_call(impl, inputs(batch, dim, N, L, requires_grad=backward, device=device), backward)
    seconds = best_time(fn, repeats=repeats)
    if device == "cpu":
        return seconds, peak_extra_bytes(fn)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    return seconds, torch.cuda.max_memory_allocated() - before


def copy_bandwidth(device="cuda", mib=1024):
    """Measured bytes per second of a large copy on `device` (each byte read once and written once)."""
    src = torch.empty(mib * 2**18, device=device)  # mib MiB of float32
    dst = torch.empty_like(src)
    synchronize = torch.cuda.synchronize if src.is_cuda else lambda: None
    seconds = best_time(lambda: (dst.copy_(src), synchronize()), repeats=5)
    return 2 * src.numel() * 4 / seconds


def compute_floor(N, updates_per_thread=2**24):
    """Seconds per (step, state) update of the CPU twin's unskippable forward arithmetic, on all of torch's threads
    at once: e^(dt·A) and two multiply-adds each, in L1 (see the module docstring). A shape's floor is its
    batch · dim · L · N updates times this."""
    from ..fused import load

    extension, threads = load("cpu"), torch.get_num_threads()
    steps = max(1, updates_per_thread // N)
    seconds = best_time(lambda: extension.scan_floor(steps, N, threads), repeats=3)
    return seconds / (steps * N * threads)


def floor_bytes(batch, dim, N, L):
    """Bytes a fused forward must move: u, delta, z (batch, dim, L) and B, C (batch, N, L) in, y out, fp32."""
    return 4 * (4 * batch * dim * L + 2 * batch * N * L)


def unfused_bytes(batch, dim, N, L):
    """Bytes a scan built from tensor operations moves at least: floor_bytes, plus a = exp(delta·A), b = delta·B·u
    and the states x as (batch, dim, L, N) fp32 tensors, each written once and read back once (Mamba §3.3.2)."""
    return floor_bytes(batch, dim, N, L) + 3 * 2 * 4 * batch * dim * L * N


def checked_impls(text):
    """The impls named by a comma-separated --impls, each a scan minijamba has, "cuda" only where there is a GPU."""
    impls = text.split(",")
    unknown = [i for i in impls if i not in IMPLS and i not in FUSED_IMPLS]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {[*IMPLS, *FUSED_IMPLS]}")
    if "cuda" in impls and not torch.cuda.is_available():
        raise SystemExit("--impls: cuda needs a GPU, and torch sees none here (cuda-emulated runs its kernels here)")
    return impls


def run(args):
    lengths = args.lengths
    impls = checked_impls(args.impls)
    bandwidth = copy_bandwidth() if "cuda" in impls else None
    if bandwidth:
        print(f"GPU: {torch.cuda.get_device_name()}, measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
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
            line = f"{impl:>10} {L:>6} | {f_ms:9.1f} {f_mb:8.1f} | {b_ms:10.1f} {b_mb:10.1f}"
            if impl == "cuda":
                floor_ms = floor_bytes(args.batch, args.dim, args.d_state, L) / bandwidth * 1e3
                line += f" | bandwidth floor {floor_ms:.3f} ms = {floor_ms / f_ms:.0%} of fwd"
            print(line, flush=True)
    print("nan: skipped, predicted to need more than --max-gb of memory or --max-seconds per run")
    if "cpu" in impls:
        _print_twin_summary(results, impls, lengths, args)
    if not args.no_figure:
        print(f"wrote {_plot(results, impls, lengths, args)}")
    return results


def _print_twin_summary(results, impls, lengths, args):
    """The CPU twin against its compute floor, its backward against its forward, the torch scans against it."""
    per_update = compute_floor(args.d_state)
    threads = torch.get_num_threads()
    print(f"\nCPU twin's compute floor: {per_update * 1e9 * threads:.2f} ns per (step, state) update per thread "
          f"({threads} threads): e^(dt·A) and two multiply-adds, in L1")  # fmt: skip
    others = [i for i in impls if i in IMPLS]
    header = f"{'L':>6} | {'floor ms':>8} | {'fwd/floor':>9} | {'bwd/fwd':>7}" + "".join(
        f" | {i + ' fwd/cpu':>16}" for i in others
    )
    print(header)
    for L in lengths:
        (f_ms, _), (fb_ms, _) = results["cpu", L]
        floor_ms = per_update * args.batch * args.dim * L * args.d_state * 1e3
        line = f"{L:>6} | {floor_ms:8.1f} | {f_ms / floor_ms:9.2f} | {(fb_ms - f_ms) / f_ms:7.2f}"
        line += "".join(f" | {results[i, L][0][0] / f_ms:16.1f}" for i in others)
        print(line)
    print("bwd = fwd+bwd - fwd. Goals (issue 17): fwd/floor <= 2, bwd/fwd <= 2, chunked fwd/cpu >= 30")


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
    fig.suptitle(f"selective scan: batch {args.batch}, dim {args.dim}, d_state {args.d_state}, fp32")
    return save_figure(fig, "bench_scan_cpu")
