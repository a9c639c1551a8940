"""The benchmark scripts run end to end on tiny shapes (a smoke test: what they measure is not checked here)."""

import math
import re

import pytest
import torch

from minijamba.bench.__main__ import main
from minijamba.bench.measure import best_time, peak_extra_bytes


def test_scan_benchmark_prints_its_table(capsys):
    main(
        ["scan", "--batch", "1", "--dim", "4", "--d-state", "2", "--lengths", "16,32", "--repeats", "1", "--no-figure"]
    )
    out = capsys.readouterr().out
    for impl in ("sequential", "parallel", "chunked", "cpu"):
        assert len(re.findall(rf"^ *{impl} +\d+ \|", out, re.M)) == 2, out


def test_decode_benchmark_prints_its_table(capsys):
    main(
        ["decode", "--d-model", "16", "--n-layer", "2", "--attn-period", "2", "--lengths", "8,16", "--chunk", "8"]
        + ["--repeats", "2", "--rounds", "1", "--no-figure"]
    )
    out = capsys.readouterr().out
    for layout in ("mamba", "jamba", "attention"):
        assert len(re.findall(rf"^ *{layout} +\d+ \|", out, re.MULTILINE)) == 2, out  # one row per context
    assert "goal <= 1.10" in out


def test_step_benchmark_prints_its_table_and_breakdown(capsys):
    result = main(["step", "--preset", "tiny", "--steps", "1", "--threads", "1"])
    out = capsys.readouterr().out
    for model in ("transformer", "jamba", "mamba"):
        assert re.search(rf"^ *{model} \|.*\| +\d+ \| +\d+ \| \d\.\d\d$", out, re.M), out
    for category in ("scan forward", "scan backward", "matrix products", "optimizer (clip + AdamW)"):
        assert category in out
    jamba = result["breakdown"]["jamba"]
    assert jamba["scan forward"] > 0 and jamba["scan backward"] > 0  # the fused scan ran, and was found
    assert result["breakdown"]["transformer"]["scan forward"] == 0


def test_step_categories_match_op_names():
    from minijamba.bench.step import OTHER, category_of

    assert category_of("aten::mm") == "matrix products"
    assert category_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category_of("_FusedScanBackward") == "scan backward"
    assert category_of("aten::mul") == OTHER


def test_decode_layouts_have_equal_size():
    """The three layouts differ in their mixers, not in their parameter count (within 0.5%)."""
    from minijamba.bench.decode import LAYOUTS, layout_config
    from minijamba.models import count_parameters

    sizes = [count_parameters(layout_config(layout, 256, 8, 8, 256)).total for layout in LAYOUTS]
    assert max(sizes) / min(sizes) < 1.005, sizes
    with pytest.raises(SystemExit, match="--models: unknown"):
        main(["decode", "--models", "rwkv", "--no-figure"])


@pytest.mark.parametrize("batch, dim, N, L", [(1, 1, 1, 1), (2, 3, 4, 5), (2, 512, 16, 2048)])
def test_byte_counts_are_the_tensors_sizes(batch, dim, N, L):
    """floor_bytes is the scan's inputs u, delta, z, B, C and its output y in fp32; unfused_bytes adds a, b and x
    as (batch, dim, L, N) tensors, written and read once each."""
    from minijamba.bench.scan import floor_bytes, inputs, unfused_bytes

    t = inputs(batch, dim, N, L)
    moved = sum(t[k].numel() * t[k].element_size() for k in ("u", "delta", "z", "B", "C")) + t["u"].nbytes  # y as u
    assert floor_bytes(batch, dim, N, L) == moved
    assert unfused_bytes(batch, dim, N, L) - moved == 3 * 2 * batch * dim * L * N * t["u"].element_size()


@pytest.mark.parametrize("backward", [False, True])
def test_time_impls_times_every_impl_at_one_shape(backward):
    from minijamba.bench.scan import time_impls

    seconds = time_impls(["sequential", "chunked", "cpu"], 1, 2, 3, 40, backward, rounds=2)
    assert list(seconds) == ["sequential", "chunked", "cpu"]
    assert all(0 < s < 10 for s in seconds.values()), seconds


def test_copy_bandwidth_on_cpu_is_positive():
    from minijamba.bench.scan import copy_bandwidth

    assert 1e6 < copy_bandwidth("cpu", mib=4) < 1e13


def test_measure_throughput_times_whole_requests():
    """Prefill times accumulate with the prompt; tokens/s is the request's tokens over its prefill + generation."""
    from minijamba.bench.decode import layout_config, measure_throughput
    from minijamba.jamba import JambaLM

    torch.manual_seed(0)
    model = JambaLM(layout_config("jamba", 16, 2, 2, 32)).eval()
    lengths, new_tokens = [24, 8, 16], 3
    results = measure_throughput(model, lengths, new_tokens, chunk=8, passes=2)
    assert list(results) == sorted(lengths)
    for T, (prefill, generate, tokens_per_second) in results.items():
        assert 0 < prefill < 5 and 0 < generate < 5, (T, prefill, generate)
        assert tokens_per_second == (T + new_tokens) / (prefill + generate)
    prefills = [r.prefill_seconds for r in results.values()]
    assert prefills == sorted(prefills)  # a longer prompt continues the shorter one's prefill


def test_measure_decode_times_steps_of_any_lm():
    """For a MambaLM as for a JambaLM: a time and the real cache's bytes at every length, the cache flat for Mamba."""
    from minijamba.bench.decode import measure_decode
    from minijamba.mamba import MambaConfig, MambaLM

    torch.manual_seed(0)
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=32)
    model = MambaLM(config).eval()
    lengths = [4, 12]
    ids = torch.randint(0, 32, (1, lengths[-1] + 1))
    with torch.inference_mode():
        rows, prefill_seconds = measure_decode(model, ids, lengths, chunk=8, rounds=2, repeats=2)
    assert list(rows) == lengths and 0 < prefill_seconds < 5
    expected_bytes = config.n_layer * config.d_inner * (config.d_conv + config.d_state) * 4
    for ms, nbytes in rows.values():
        assert 0 < ms < 1000 and nbytes == expected_bytes


def test_unknown_impl_is_a_clear_error():
    with pytest.raises(SystemExit, match="--impls: unknown"):
        main(["scan", "--impls", "fast", "--no-figure"])


def test_peak_extra_bytes_sees_a_known_allocation():
    """A call that allocates 8 MB and frees it has a peak of at least 8 MB and not much more."""
    peak = peak_extra_bytes(lambda: torch.empty(2**21).fill_(1.0).sum())
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_best_time_is_positive_and_finite():
    seconds = best_time(lambda: sum(range(1000)), repeats=2)
    assert 0 < seconds < 1 and math.isfinite(seconds)
