"""Float32 accuracy of every scan at a Mamba layer's size, batch 2, dim 512, N 16, L 2048, against float64.

The other scan tests run at dim <= 8 and mostly L <= 300, where float32's errors have no room to grow. These run
the scans where they do: in the official tests' regime (minijamba.bench.accuracy), where channels with |A| ≪ 1
remember the whole sequence, forward and every gradient, at the rows of tests/tolerances.py; those rows' numbers
come from `python -m minijamba.bench accuracy` at L = 512 ... 4096. Each test prints its errors.
"""

import functools
import re

import pytest
import torch
from tolerances import assert_close

from minijamba.bench.__main__ import main
from minijamba.bench.accuracy import expected_outputs, loss_weights, relative_errors, scan_inputs, scan_outputs

BATCH, DIM, N, L = 2, 512, 16, 2048
# The parallel scan's autograd keeps every one of its log2(L) rounds of (batch, dim, L, N) pairs, ~3.5 GB at
# dim 512: it runs a quarter of the channels (its rounds are the chunked scan's, in one chunk of L steps).
DIMS = {"parallel": 128}


def make_case(dim, time_invariant=False):
    """(inputs, loss weights, float64 answers) in the official regime at (BATCH, dim, N, L), with initial_state."""
    args = scan_inputs("official", BATCH, dim, N, L, time_invariant)
    weights = loss_weights(args)
    return args, weights, expected_outputs(args, weights)


@pytest.fixture(scope="module")
def case():
    """make_case, each case computed once for this module and freed after it (~120 MB a case at dim 512)."""
    return functools.cache(make_case)


def check_float32(case, impl, dim, time_invariant=False):
    args, weights, expected = case(dim, time_invariant)
    got = scan_outputs(args, impl, torch.float32, weights)
    errors = relative_errors(got, expected)
    print(impl, " ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        kind = "scan_float32" if name in ("y", "last_state") else "fused_grad_float32"
        assert_close(value, expected[name], kind, f"{impl} {name}")


GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no CUDA GPU here (cuda-emulated runs its kernels)")


@pytest.mark.parametrize("impl", ["sequential", "parallel", "chunked", "cpu", "cuda-emulated",
                                  pytest.param("cuda", marks=needs_gpu)])  # fmt: skip
def test_float32_at_a_realistic_size(case, impl):
    check_float32(case, impl, DIMS.get(impl, DIM))


def test_float32_time_invariant_B_and_C(case):
    """B, C of shape (dim, N): the CPU twin sums their gradients over batch and all L steps, as it does A's and D's
    (the torch scans leave those sums to autograd, checked above through A and D)."""
    check_float32(case, "cpu", DIM, time_invariant=True)


def test_the_float64_answers_agree(case):
    """The float64 gradients come from the CPU twin; autograd through the chunked scan gives the same ones at this
    length (on the parallel scan's channels, to save time: float64 autograd is the slowest run here)."""
    args, weights, expected = case(DIMS["parallel"])
    chunked = scan_outputs(args, "chunked", torch.float64, weights)
    for name, value in chunked.items():
        assert_close(value, expected[name], "scan_float64", f"chunked vs cpu, float64 {name}")


def test_cpu_backward_repeats_bit_for_bit(case):
    """Every sum of the CPU twin runs in one fixed order: two runs on two threads give the same bits."""
    args, weights, _ = case(DIMS["parallel"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = (scan_outputs(args, "cpu", torch.float32, weights) for _ in range(2))
    finally:
        torch.set_num_threads(threads)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_hillis_steele_keeps_long_memories():
    """Decays just below 1 (|A| ~ 1e-4, a memory of ~10^4 steps): the scans built on Hillis–Steele rounds are at
    least as accurate as the loop. Rounds that multiply the decays themselves fail this: their products are biased
    low (minijamba/scan.py, _hillis_steele); rounds that carry a − 1 keep the digits the loop keeps."""
    args = scan_inputs("official", 1, 4, N, 4096, initial_state=False)
    args["A"] = -1e-4 * torch.arange(1, 4 * N + 1, dtype=torch.float64).reshape(4, N)  # (dim, N)
    weights = loss_weights(args)
    expected = expected_outputs(args, weights)
    errors = {
        impl: relative_errors(scan_outputs(args, impl, torch.float32, weights), expected)
        for impl in ("sequential", "parallel", "chunked")
    }
    print(errors)
    for impl in ("parallel", "chunked"):
        for name in ("y", "last_state"):
            assert errors[impl][name] <= errors["sequential"][name], (impl, name, errors)


def test_the_benchmark_prints_its_table(capsys):
    """python -m minijamba.bench accuracy on a tiny shape: a row per (impl, L), the growth fit on an impl's last."""
    main(["accuracy", "--batch", "1", "--dim", "2", "--d-state", "3", "--lengths", "16,32", "--impls", "chunked,cpu"])
    out = capsys.readouterr().out
    for impl in ("chunked", "cpu"):
        rows = re.findall(rf"^ *{impl} +(\d+) .*\|(.*)$", out, re.M)
        assert [L for L, _ in rows] == ["16", "32"], out
        assert rows[0][1].strip() == "" and re.fullmatch(r" -?\d+\.\d\d", rows[1][1]), out
