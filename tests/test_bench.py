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


def test_decode_layouts_have_equal_size():
    """The three layouts differ in their mixers, not in their parameter count (within 0.5%)."""
    from minijamba.bench.decode import LAYOUTS, layout_config
    from minijamba.jamba import count_parameters

    sizes = [count_parameters(layout_config(layout, 256, 8, 8, 256)).total for layout in LAYOUTS]
    assert max(sizes) / min(sizes) < 1.005, sizes
    with pytest.raises(SystemExit, match="--models: unknown"):
        main(["decode", "--models", "rwkv", "--no-figure"])


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
