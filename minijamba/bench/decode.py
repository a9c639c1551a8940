"""Benchmark decoding: per-token latency and cache bytes vs context length (Mamba §3.4, constant-time inference).

A Transformer's decode step reads a KV cache that grows with the context T; a Mamba step reads a fixed state
(conv_state and ssm_state per layer), so its time and memory per token should not depend on T at all, the claim
the Falcon Mamba article measures. Here a MambaLM prefills contexts of 128 .. 16384 tokens (once, in chunks: a
forward with a cache continues it) and model.step is timed at each length. Goal: latency at 16K within 10% of
latency at 128. The attention-only model of equal parameter count joins this table with the hybrid; until then
the table has Mamba alone.
"""

import time

import torch

from ..mamba import MambaCache, MambaConfig, MambaLM
from ..teaching import save_figure
from .measure import best_time, describe_machine


def add_arguments(parser):
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--lengths", default="128,256,512,1024,2048,4096,8192,16384", help="comma-separated contexts")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk length (bounds prefill memory)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per context and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all contexts; the best step is reported")
    # Batch-1 decoding is small matmuls: a second OpenMP thread only adds synchronisation, and on a shared 2-core
    # machine with another busy process it made steps 40x slower (measured: 88 ms vs 2.2 ms per token).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-figure", action="store_true")


def _copy(cache):
    """An independent copy: timing steps on it leaves the snapshot it came from at its context length."""
    return MambaCache([c.clone() for c in cache.conv_states], [s.clone() for s in cache.ssm_states], cache.seqlen)


def _prefill_snapshots(model, ids, lengths, chunk):
    """One pass over the longest context, in chunks, keeping a copy of the cache at every length (each copy is the
    whole state, a few hundred KB, whatever the length). Returns ({T: cache after T tokens}, seconds)."""
    cache, snapshots = model.new_cache(1), {}
    start = time.perf_counter()
    for T in lengths:
        for t0 in range(cache.seqlen, T, chunk):  # continue the previous length's cache up to T
            model(ids[:, t0 : min(t0 + chunk, T)], cache)
        snapshots[T] = _copy(cache)
    return snapshots, time.perf_counter() - start


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    torch.manual_seed(0)
    config = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab_size)
    model = MambaLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    size = f"d_model {config.d_model}, {config.n_layer} layers, {n_params / 1e6:.2f}M parameters"
    print(f"decode, batch 1, fp32: MambaLM {size}")
    print(f"machine: {describe_machine()}")

    ids = torch.randint(0, config.vocab_size, (1, lengths[-1] + 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        snapshots, prefill_seconds = _prefill_snapshots(model, ids, lengths, args.chunk)
        print(f"prefilled {lengths[-1]} tokens in chunks of {args.chunk}: {prefill_seconds:.1f} s")
        best = dict.fromkeys(lengths, float("inf"))
        for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every length alike
            for T in lengths:
                cache = _copy(snapshots[T])
                seconds = best_time(lambda cache=cache, T=T: model.step(ids[:, T], cache), repeats=args.repeats)
                best[T] = min(best[T], seconds)
    results = {T: (best[T] * 1e3, snapshots[T].nbytes) for T in lengths}

    header = f"{'model':>8} {'context':>8} | {'ms/token':>9} {'vs first':>8} | {'cache KB':>9}"
    print(header)
    print("-" * len(header))
    first = results[lengths[0]][0]
    for T, (ms, nbytes) in results.items():
        print(f"{'mamba':>8} {T:>8} | {ms:9.3f} {ms / first:8.2f} | {nbytes / 1024:9.1f}")
    ratio = results[lengths[-1]][0] / first
    verdict = "met" if ratio <= 1.10 else "NOT met"
    print(f"latency at {lengths[-1]} / latency at {lengths[0]} = {ratio:.2f} (goal <= 1.10: {verdict})")
    if not args.no_figure:
        print(f"wrote {_plot(results, lengths, config, n_params)}")
    return results


def _plot(results, lengths, config, n_params):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    ax_time.plot(lengths, [results[T][0] for T in lengths], "o-", label="Mamba")
    ax_time.set_ylim(0, 1.2 * max(results[T][0] for T in lengths))
    ax_time.set_title("per-token decode latency (ms)")
    ax_mem.plot(lengths, [results[T][1] / 1024 for T in lengths], "o-", label="Mamba")
    ax_mem.set_ylim(0, 1.2 * max(results[T][1] for T in lengths) / 1024)
    ax_mem.set_title("inference cache (KB)")
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    size = f"{n_params / 1e6:.1f}M params, d_model {config.d_model}, {config.n_layer} layers"
    fig.suptitle(f"decoding after a prompt of T tokens, batch 1, fp32, CPU ({size})", y=1.03)
    return save_figure(fig, "bench_decode")
