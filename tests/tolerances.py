"""The one tolerance table of the test suite, and the comparison every test uses.

A check passes when  max|actual - expected| <= rtol * max(|expected|) + atol : the error is measured against
the scale of the whole expected tensor (an infinity-norm relative error). An elementwise rtol would fail on
entries that are near zero only through cancellation, where no algorithm can keep relative accuracy.
atol is a floor for expected tensors that are exactly zero.

Starting point: torch.testing.assert_close's defaults, float64 rtol 1e-7 and float32 rtol 1.3e-6. Each row says
why it is tighter or looser than that.
"""

import numpy as np
import torch

TOLERANCES = {
    # Two float64 routes to one matrix (block expm vs closed form vs scipy): a few dozen roundings.
    "discretize": (1e-10, 1e-14),
    # Recurrence vs FFT convolution in float64: the FFT adds O(log L) roundings per output over L terms.
    "conv_vs_recurrence": (1e-9, 1e-13),
    # The torch S4D layer against the NumPy reference (same formulas, different libraries), float64.
    "s4d_vs_reference": (1e-10, 1e-13),
    # S4D convolution mode vs recurrent mode: powers A_bar^k via exp(k·log) vs repeated products.
    "s4d_modes_float64": (1e-8, 1e-12),
    # float32 has 6e-8 unit roundoff; an FFT convolution of length L loses about log2(L)·L·eps in the worst case.
    "s4d_modes_float32": (1e-4, 1e-6),
    # Selective scans vs selective_scan_ref: float64 is a pure rounding comparison.
    "scan_float64": (1e-10, 1e-13),
    # float32 scans (y and the last state) vs float64, every impl, up to L = 4096 at a Mamba layer's size. Measured
    # by `python -m minijamba.bench accuracy` (tests/test_scan_accuracy.py checks L = 2048) at batch 2, dim 512, N
    # 16, in the official tests' regime, whose channels with |A| << 1 remember the whole sequence (the hardest case;
    # in the test suite's own regime forward errors are 5-10x smaller). The loop-shaped scans (sequential, cpu)
    # round the state at every step, at random, so their error is a random walk: the largest error of any output,
    # forward or gradient, was 0.85-1.05 x sqrt(L)·eps (eps = 2^-24 = 6e-8) at L = 512 ... 4096, e.g. y 2.4e-6 and
    # 3.6e-6 for the worst gradient at L = 4096, where sqrt(L)·eps = 3.8e-6. The chunked and parallel scans round
    # the carried state once a chunk, and showed no growth: at most 5.4e-7 for chunked (L <= 4096) and 2.0e-6 for
    # parallel (L <= 2048; its initial state's gradient, through products of a's far below 1), because their rounds
    # carry a − 1 (minijamba/scan.py says why a product of a's near 1 needs it). rtol 1e-5 is 4x the
    # largest forward error and 2.8x the largest gradient error measured at L = 4096, and by the sqrt(L) law holds
    # to L ~ 28000 (more channels raise the largest of the random walks only like sqrt(log(channels)): an estimate).
    # Still 60x tighter than the official kernel's float32 tests (rtol 6e-4, atol 2e-3). atol: a floor for zero
    # outputs.
    "scan_float32": (1e-5, 1e-6),
    # float32 gradients vs float64, every impl, fused or torch: the same measurements as scan_float32, the same
    # rtol. The gradients of A, D, delta_bias and time-invariant B, C are sums over batch and L, which the CPU twin
    # sums blocked by chunk, so they round like torch's own sums (dD at L = 4096: 2.1e-7, torch 1.8e-7; one
    # running total over L would round 8x worse). atol 1e-5: a floor for
    # the gradients of the small tests (a few channels and steps) that cancel to near zero.
    "fused_grad_float32": (1e-5, 1e-5),
    # 16-bit scans (u, delta, z, B, C and y in float16; A, the states and every sum in float32, as the official
    # kernel computes) vs float64 on the same 16-bit inputs: the official kernel's float16 test tolerances
    # (state-spaces/mamba tests/ops/test_selective_scan.py). Rounding y to float16 alone costs up to 2^-11 = 4.9e-4
    # of |y|; 3e-3 leaves ~6 such units for the 16-bit gradients. Ours are relative to max|expected| (see the top),
    # so for entries smaller than the largest these are looser than the official elementwise check, never tighter.
    "scan_float16": (3e-3, 5e-3),
    # The same with bfloat16 (8 significant bits: rounding y costs up to 2^-8 = 3.9e-3 of |y|), the official
    # bfloat16 test tolerances, ~8 such units.
    "scan_bfloat16": (3e-2, 5e-2),
    # Mamba forward vs prefill + step, float64: parallel scan and full conv vs recurrence and one window, n layers.
    "mamba_step_float64": (1e-9, 1e-12),
    # The same in float32 through a few layers and RMSNorms: a few hundred roundings of 6e-8 each, at most.
    "mamba_step_float32": (1e-5, 1e-6),
    # Our float32 MambaLM vs transformers' MambaForCausalLM: same math, other op order (sequential scan, matmuls).
    "hf_parity": (1e-4, 1e-6),
    # The Mamba mixer vs its NumPy float64 writing-out (tests/test_mamba.py): a few hundred float64 roundings.
    "mamba_vs_reference": (1e-10, 1e-13),
    # JambaLM forward vs prefill + step, float64: the Mamba rows' roundings plus a softmax over <= L keys and an MoE
    # whose routing is discrete (float64 keeps near-ties from flipping the top-k).
    "jamba_step_float64": (1e-9, 1e-12),
    # Attention in float64 (torch paths vs causal_attention_ref and each other, prefill + step vs forward): two
    # matmuls and a softmax over a few dozen keys, a few dozen roundings per output.
    "attention_float64": (1e-10, 1e-13),
    # The same in float32: a rounding δ in a score moves its softmax weight by δ relatively, and scores are O(1-10)
    # here, so ~10 eps = 6e-7 per weight; through the projections a few times that.
    "attention_float32": (1e-5, 1e-6),
    # MoE in float64 (sparse dispatch vs the dense moe_ref, relabelled experts, the capacity loop; the aux loss vs
    # its reference): three matmuls of width <= 12 and a sum of <= k weighted experts, a few dozen roundings.
    "moe_float64": (1e-10, 1e-13),
    # load_balancing_loss vs HF's load_balancing_loss_func in float32: the same sums in another order (one_hot vs
    # histc counts, which are exact; probability sums over <= 36 rows per layer). Measured bitwise equal on 4000
    # draws with torch 2.13; rtol 1e-6 (about 10 eps) leaves room for another summation order.
    "aux_loss_float32": (1e-6, 1e-7),
    # DDP (2 processes, half the batch each, gradients averaged) vs 1 process on the same global batch, float32.
    # Step 1, before any update: the same weights, the mean over B rows vs the average of two means over B/2 rows:
    # a few roundings of 6e-8 (measured 1.7e-7 relative).
    "ddp_first_loss_float32": (1e-6, 0.0),
    # Later steps: AdamW's first updates are lr·m/(sqrt(v)+eps) ≈ lr·sign(g), so a gradient entry that is ~0 up to
    # rounding can move its weight by ±lr in one process and not the other; that, not the data, is the difference
    # (measured up to 3.7e-5 relative in 6 steps of the tiny Jamba). A wrong shard or a summed (not averaged)
    # gradient moves the loss by 1e-2 or more.
    "ddp_losses_float32": (1e-4, 0.0),
    # A left-padded row vs the same prompt alone, float64 (tests/test_padding.py): the same sums, but the chunked
    # scan's chunks and the attention's key range start at other offsets (masked keys add exact zeros), so the step
    # rows' rounding budget through the Mamba, attention and MoE layers.
    "padding_float64": (1e-9, 1e-12),
}


def _as_numpy(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().resolve_conj().numpy()
    return np.asarray(t)


def max_error(actual, expected):
    """(max |actual - expected|, max |expected|), as float64 numbers for a failure message."""
    a, e = _as_numpy(actual), _as_numpy(expected)
    assert a.shape == e.shape, f"shape mismatch: actual {a.shape}, expected {e.shape}"
    diff = np.abs(a.astype(np.complex128) - e.astype(np.complex128))
    return float(diff.max(initial=0.0)), float(np.abs(e).max(initial=0.0))


def assert_close(actual, expected, kind, what=""):
    """Assert actual ≈ expected under TOLERANCES[kind]; the message reports the max difference and the bound."""
    rtol, atol = TOLERANCES[kind]
    err, scale = max_error(actual, expected)
    bound = rtol * scale + atol
    assert np.isfinite(err) and err <= bound, (
        f"{what or kind}: max |diff| = {err:.3e} > {bound:.3e} "
        f"(rtol {rtol:g} x max|expected| {scale:.3e} + atol {atol:g})"
    )
