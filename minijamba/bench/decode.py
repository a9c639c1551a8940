"""Benchmark decoding: per-token latency and cache bytes vs context length, for Mamba, Jamba and attention layouts.

A Transformer's decode step reads a KV cache that grows with the context T; a Mamba step reads a fixed state
(conv_state and ssm_state per layer), so its time and memory per token should not depend on T at all (Mamba §3.4,
the claim the Falcon Mamba article measures). Jamba sits between: one layer in eight keeps a KV cache.

Three JambaLMs of one code path and (nearly) one parameter count, dense MLPs (no MoE: the mixers are what differ):
    mamba      every layer a Mamba block              fixed cache
    jamba      one attention layer in attn_period      a KV cache in 1/attn_period of the layers
    attention  every layer attention (a Transformer)  a KV cache in every layer
An attention layer has 4·d² parameters where a Mamba block has about 6·d², so the attention-only model gets a wider
MLP to make up the difference. Each model prefills contexts of 128 .. 16384 tokens (once, in chunks: a forward with a
cache continues it) and model.step is timed at each length. Goal: the Mamba model's latency at 16K within 10% of its
latency at 128.

`measure_throughput` times whole requests instead (a prompt of T tokens prefilled, then tokens generated), the
measure of the Jamba paper's §3.2 throughput comparison; lesson 05 runs it on the jamba and attention layouts.
"""

import copy
import math
import time
from typing import NamedTuple

import torch

from ..jamba import JambaConfig, JambaLM
from ..models import count_parameters
from ..plotting import save_figure
from .measure import best_time, describe_machine, int_list, pos_int, threads_arg

LAYOUTS = {"mamba": "all-mamba", "jamba": "jamba", "attention": "all-attention"}  # --models name: JambaConfig layout


def add_arguments(parser):
    parser.add_argument("--d-model", type=pos_int, default=256)
    parser.add_argument("--n-layer", type=pos_int, default=8)
    parser.add_argument("--attn-period", type=pos_int, default=8, help="jamba: one attention layer in this many")
    parser.add_argument("--vocab-size", type=pos_int, default=256)
    parser.add_argument("--models", default=",".join(LAYOUTS), help=f"comma-separated, from {list(LAYOUTS)}")
    parser.add_argument(
        "--lengths", type=int_list, default="128,256,512,1024,2048,4096,8192,16384", help="comma-separated contexts"
    )
    parser.add_argument("--chunk", type=pos_int, default=512, help="prefill chunk length (bounds prefill memory)")
    parser.add_argument("--repeats", type=pos_int, default=20, help="timed steps per context and round")
    parser.add_argument("--rounds", type=pos_int, default=3, help="passes over all contexts; the best step is reported")
    # Batch-1 decoding is small matmuls: a second OpenMP thread only adds synchronisation, and on a shared machine
    # with another busy process it makes steps far slower (README, "Measured").
    parser.add_argument("--threads", type=threads_arg, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--no-figure", action="store_true")


def layout_config(layout, d_model, n_layer, attn_period, vocab_size):
    """The JambaConfig of one layout, its MLP width chosen so it has as many parameters as the Mamba layout with an
    MLP of width 2·d_model (parameters grow by 3·d_model·n_layer per unit of width: gate, up, down). Its Mamba layers
    scan with "auto", the fused kernel where it builds: a benchmark measures the fast path."""
    heads = max(1, d_model // 64)
    common = dict(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layer, num_attention_heads=heads,
        num_key_value_heads=heads, num_experts=1, num_experts_per_tok=1, scan_impl="auto",
    )  # fmt: skip

    def config(layout, width):
        period = dict(attn_layer_period=attn_period, attn_layer_offset=attn_period // 2) if layout == "jamba" else {}
        return JambaConfig.with_layout(LAYOUTS[layout], intermediate_size=width, **common, **period)

    def size(layout, width):
        return count_parameters(config(layout, width)).total

    width = 1 + round((size("mamba", 2 * d_model) - size(layout, 1)) / (3 * d_model * n_layer))
    return config(layout, max(1, width))


def _prefill_snapshots(model, ids, lengths, chunk):
    """One pass over the longest context, in chunks, keeping a copy of the cache at every length.
    Returns ({T: cache after T tokens}, {T: seconds the model took to prefill T tokens}); copying is not timed."""
    cache, snapshots, seconds, elapsed = model.new_cache(1), {}, {}, 0.0
    for T in lengths:
        start = time.perf_counter()
        for t0 in range(cache.seqlen, T, chunk):  # continue the previous length's cache up to T
            model(ids[:, t0 : min(t0 + chunk, T)], cache)
        elapsed += time.perf_counter() - start
        seconds[T] = elapsed
        snapshots[T] = copy.deepcopy(cache)  # steps on a copy leave the snapshot at T
    return snapshots, seconds


class Throughput(NamedTuple):
    prefill_seconds: float  # the prompt of T tokens, in chunks
    generate_seconds: float  # the new tokens after it, one model.step each
    tokens_per_second: float  # (T + new tokens) / (prefill_seconds + generate_seconds)


def measure_throughput(model, lengths, new_tokens=16, chunk=512, passes=2, seed=0):
    """{T: Throughput} of batch-1 requests: prefill a prompt of T tokens, then generate new_tokens greedily.

    A pass prefills the longest prompt once in chunks, timing the model calls up to each T (a chunked prefill of T
    tokens), then generates from a copy of the cache at each T. Each time is the best over `passes`: on a shared
    machine a pass that another job slowed down is not the one kept. Prompts are random ids (the cost of a token
    does not depend on which token it is).
    """
    lengths = sorted(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, lengths[-1] + 1), generator=generator)  # (1, T_max + 1)
    prefill, generate = dict.fromkeys(lengths, math.inf), dict.fromkeys(lengths, math.inf)
    with torch.inference_mode():
        for _ in range(passes):
            snapshots, seconds = _prefill_snapshots(model, ids, lengths, chunk)
            for T in lengths:
                cache, token = snapshots.pop(T), ids[:, T]  # token (1,): the first generated token, given
                start = time.perf_counter()
                for _ in range(new_tokens):
                    token = model.step(token, cache).argmax(dim=-1)  # (1,)
                generate[T] = min(generate[T], time.perf_counter() - start)
                prefill[T] = min(prefill[T], seconds[T])
    return {T: Throughput(prefill[T], generate[T], (T + new_tokens) / (prefill[T] + generate[T])) for T in lengths}


def measure_decode(model, ids, lengths, chunk=512, rounds=5, repeats=20):
    """({T: (ms per token, cache bytes)}, seconds to prefill the longest context) for one model (a JambaLM or a
    MambaLM) and ids (1, max(lengths) + 1): the best time of model.step after T tokens, over `rounds` rounds that
    each visit every length in turn, so that a busy spell on a shared machine spoils a few rounds of every length
    rather than all rounds of one."""
    snapshots, prefill_seconds = _prefill_snapshots(model, ids, lengths, chunk)
    best = dict.fromkeys(lengths, math.inf)
    for _ in range(rounds):
        for T in lengths:
            cache = copy.deepcopy(snapshots[T])
            seconds = best_time(lambda cache=cache, T=T: model.step(ids[:, T], cache), repeats=repeats)
            best[T] = min(best[T], seconds)
    return {T: (best[T] * 1e3, snapshots[T].nbytes) for T in lengths}, prefill_seconds[lengths[-1]]


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = sorted(args.lengths)
    layouts = [m.strip() for m in args.models.split(",")]
    if unknown := sorted(set(layouts) - set(LAYOUTS)):
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(LAYOUTS)}")
    print(f"decode, batch 1, fp32, d_model {args.d_model}, {args.n_layer} layers; machine: {describe_machine()}")
    ids = torch.randint(0, args.vocab_size, (1, lengths[-1] + 1), generator=torch.Generator().manual_seed(0))
    results, sizes = {}, {}
    for layout in layouts:
        torch.manual_seed(0)
        config = layout_config(layout, args.d_model, args.n_layer, args.attn_period, args.vocab_size)
        model = JambaLM(config).eval()
        sizes[layout] = count_parameters(config).total
        with torch.inference_mode():
            results[layout], seconds = measure_decode(model, ids, lengths, args.chunk, args.rounds, args.repeats)
        kinds = config.layer_types.count("attention")
        print(
            f"{layout}: {sizes[layout] / 1e6:.2f}M parameters, {kinds}/{config.num_hidden_layers} attention layers, "
            f"MLP width {config.intermediate_size}; prefilled {lengths[-1]} tokens in {seconds:.1f} s"
        )

    header = f"{'model':>9} {'context':>8} | {'ms/token':>9} {'vs first':>8} | {'cache KB':>10}"
    print(header)
    print("-" * len(header))
    for layout, rows in results.items():
        first = rows[lengths[0]][0]
        for T, (ms, nbytes) in rows.items():
            print(f"{layout:>9} {T:>8} | {ms:9.3f} {ms / first:8.2f} | {nbytes / 1024:10.1f}")
    if "mamba" in results:
        rows = results["mamba"]
        ratio = rows[lengths[-1]][0] / rows[lengths[0]][0]
        verdict = "met" if ratio <= 1.10 else "NOT met"
        print(f"mamba: latency at {lengths[-1]} / latency at {lengths[0]} = {ratio:.2f} (goal <= 1.10: {verdict})")
    if not args.no_figure:
        print(f"wrote {_plot(results, lengths, sizes, args)}")
    return results


def _plot(results, lengths, sizes, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for layout, rows in results.items():
        label = f"{layout} ({sizes[layout] / 1e6:.1f}M)"
        ax_time.plot(lengths, [rows[T][0] for T in lengths], "o-", label=label)
        ax_mem.plot(lengths, [rows[T][1] / 2**20 for T in lengths], "o-", label=label)
    ax_time.set_title("per-token decode latency (ms)")
    ax_mem.set_title("inference cache (MB)")
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"decoding after a prompt of T tokens, batch 1, fp32, CPU (d_model {args.d_model}, "
                 f"{args.n_layer} layers)", y=1.03)  # fmt: skip
    return save_figure(fig, "bench_decode")
