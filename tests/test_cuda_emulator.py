"""CUDA's execution model on the CPU (cuda/emulator/): each of its rules on a small kernel written to show it
(tests/emulator_kernels/*.cu, plain CUDA that nvcc also compiles), and the real scan kernel through it.

The kernels are built with minijamba.fused.build_emulated into a shared library without torch and called through
ctypes with NumPy arrays: under the emulator a device pointer is a host pointer. Every host function returns the
launch's cudaError_t; `error_string` gives the emulator's message for it.
"""

import ctypes
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_scan import make_inputs
from tolerances import assert_close

from minijamba import fused
from minijamba.scan import selective_scan

KERNEL_DIR = Path(__file__).parent / "emulator_kernels"
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
SCHEDULES = ["forward", "reverse", "random", "warps", "reverse-warps"]
SUCCESS, INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE = 0, 1, 9, 719


class Kernels:
    """The library of tests/emulator_kernels/ under ctypes: k.run_block_sum(array, array, 128, ...) -> error code."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.error_string.restype = ctypes.c_char_p
        self.lib.set_schedule.argtypes = [ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p, ctypes.c_int]

    def __getattr__(self, name):
        function = getattr(self.lib, name)

        def call(*args):
            return function(*(ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else a for a in args))

        return call

    def message(self, error):
        return self.lib.error_string(error).decode()

    def check(self, error):
        assert error == SUCCESS, self.message(error)

    @contextmanager
    def schedule(self, name, seed=0):
        message = ctypes.create_string_buffer(512)
        if self.lib.set_schedule(name.encode(), seed, message, len(message)) != 0:
            raise ValueError(message.value.decode())
        try:
            yield
        finally:
            self.lib.set_schedule(b"forward", 0, message, len(message))


@pytest.fixture(scope="module")
def kernels():
    return Kernels(fused.build_emulated("minijamba_emulator_test_kernels", SOURCES))


def tagged_lines(path):
    """{tag: line number} of the `// line: tag` comments in a kernel source."""
    lines = path.read_text().splitlines()
    return {m.group(1): i for i, text in enumerate(lines, 1) if (m := re.search(r"// line: (\w+)", text))}


# ------------------------------------------------------------------------------------- barriers and schedules


def block_sums(kernels, values, threads, barriers):
    out = np.zeros(len(values) // threads, np.float32)
    kernels.check(kernels.run_block_sum(values, out, threads, len(out), int(barriers)))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shared_memory_reduction_is_right_under_every_schedule(kernels, schedule):
    values = np.arange(3 * 256, dtype=np.float32) % 97  # small integers: every order of the sums is exact
    with kernels.schedule(schedule, seed=1):
        out = block_sums(kernels, values, 256, barriers=True)
    np.testing.assert_array_equal(out, values.reshape(3, 256).sum(axis=1))


def test_reduction_without_barriers_is_wrong_under_the_forward_schedule(kernels):
    """Without its barriers the tree reduction reads partial sums before they are written. Under "forward" thread
    0 runs first, to its end, and reads slots no thread has written yet: NaN, the shared memory's fill. Under
    "reverse" the higher threads finish before the lower ones read their slots, and the same wrong kernel gives
    the right answer: one order proves nothing, which is why the tests run several."""
    values = np.arange(2 * 128, dtype=np.float32) % 7
    expected = values.reshape(2, 128).sum(axis=1)
    with kernels.schedule("forward"):
        assert np.isnan(block_sums(kernels, values, 128, barriers=False)).all()
    with kernels.schedule("reverse"):
        np.testing.assert_array_equal(block_sums(kernels, values, 128, barriers=False), expected)


def block_scans(kernels, rows, second_barrier):
    out = np.zeros_like(rows)
    kernels.check(kernels.run_block_scans(rows, out, rows.shape[1], rows.shape[0], int(second_barrier)))
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_block_scans_are_right_under_every_schedule(kernels, schedule):
    rows = np.random.default_rng(0).integers(-50, 50, size=(6, 128)).astype(np.int32)
    with kernels.schedule(schedule, seed=2):
        np.testing.assert_array_equal(block_scans(kernels, rows, second_barrier=True), rows.cumsum(axis=1))


def test_a_missing_barrier_between_block_scans_shows_only_under_warps(kernels):
    """Without the barrier after reading the warp totals, the next scan's totals can overwrite them before a
    slower warp has read them. The thread-order schedules move every warp one step at a time, so every warp reads
    before any writes again; "warps" runs warp 0 into the next scan first, and the warps after it read its new
    total (NOTES.md: the schedule that caught what thread order missed)."""
    rows = np.random.default_rng(1).integers(1, 50, size=(4, 128)).astype(np.int32)
    for schedule in ("forward", "reverse", "reverse-warps"):  # the last warp's total is read by no warp
        with kernels.schedule(schedule):
            np.testing.assert_array_equal(block_scans(kernels, rows, second_barrier=False), rows.cumsum(axis=1))
    with kernels.schedule("warps"):
        wrong = block_scans(kernels, rows, second_barrier=False)
    assert not np.array_equal(wrong, rows.cumsum(axis=1))
    np.testing.assert_array_equal(wrong[-1], rows[-1].cumsum())  # the last scan has no next one to race with


def tickets(kernels, threads, blocks, schedule, seed=0):
    counter = np.zeros(1, np.uint32)
    first, second = np.zeros(threads * blocks, np.uint32), np.zeros(threads * blocks, np.uint32)
    with kernels.schedule(schedule, seed):
        kernels.check(kernels.run_tickets(counter, first, second, threads, blocks))
    return first.reshape(blocks, threads), second.reshape(blocks, threads)


def test_each_schedule_runs_threads_and_blocks_in_its_order(kernels):
    """Each thread takes a ticket, meets its warp at __syncwarp, takes another: the tickets show the order."""
    t = np.arange(64)
    first, second = tickets(kernels, 64, 2, "forward")  # every thread to the __syncwarp, then every thread on
    np.testing.assert_array_equal(first, [t, 128 + t])
    np.testing.assert_array_equal(second, [64 + t, 192 + t])
    first, second = tickets(kernels, 64, 2, "reverse")  # the same from the last thread of the last block
    np.testing.assert_array_equal(first, [128 + 63 - t, 63 - t])
    np.testing.assert_array_equal(second, [192 + 63 - t, 64 + 63 - t])
    first, second = tickets(kernels, 64, 2, "warps")  # warp 0 to its end, then warp 1
    np.testing.assert_array_equal(first, [t // 32 * 64 + t % 32, 128 + t // 32 * 64 + t % 32])
    np.testing.assert_array_equal(second, first + 32)
    first, second = tickets(kernels, 64, 2, "reverse-warps")  # the last warp first, its last lane first
    np.testing.assert_array_equal(first, [128 + (1 - t // 32) * 64 + 31 - t % 32, (1 - t // 32) * 64 + 31 - t % 32])
    np.testing.assert_array_equal(second, first + 32)


def test_a_missing_barrier_after_thread_0_fills_shared_memory_shows_under_reverse_warps(kernels):
    """Thread 0 writes a value every thread reads, and the barrier between them is missing: every schedule that
    runs thread 0 before the other warps get there hides it; "reverse-warps" runs the last warp first."""
    out = np.zeros(128, np.float32)
    for schedule in ("forward", "reverse", "warps"):
        with kernels.schedule(schedule):
            kernels.check(kernels.run_broadcast(out, 128, 0))
        np.testing.assert_array_equal(out, 7.0)
    with kernels.schedule("reverse-warps"):
        kernels.check(kernels.run_broadcast(out, 128, 0))
    assert np.isnan(out[32:]).all()  # the other warps read it before thread 0 ran
    np.testing.assert_array_equal(out[:32], 7.0)
    with kernels.schedule("reverse-warps"):
        kernels.check(kernels.run_broadcast(out, 128, 1))
    np.testing.assert_array_equal(out, 7.0)


def test_the_random_schedule_is_seeded(kernels):
    runs = {seed: tickets(kernels, 96, 5, "random", seed) for seed in (1, 1, 2)}
    again = tickets(kernels, 96, 5, "random", 1)
    np.testing.assert_array_equal(runs[1][0], again[0])  # a seed replays its order
    assert not np.array_equal(runs[1][0], runs[2][0])
    for first, second in runs.values():
        assert sorted(np.concatenate([first.ravel(), second.ravel()])) == list(range(2 * 96 * 5))
        assert (second > first).all()  # a thread's second ticket comes after its first


def test_unknown_schedules_are_refused_with_the_names(kernels):
    with pytest.raises(ValueError, match="forward, reverse, random, warps, reverse-warps"):
        with kernels.schedule("backwards"):
            pass
    assert fused.load("cuda-emulated").schedules() == SCHEDULES


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_syncwarp_orders_a_warp_s_shared_memory(kernels, schedule):
    out = np.zeros(96, np.int32)
    with kernels.schedule(schedule, seed=3):
        kernels.check(kernels.run_warp_exchange(out, 96))
    np.testing.assert_array_equal(out, 10 * (np.arange(96) ^ 1))


# ----------------------------------------------------------------------------------------------- memory


def test_shared_memory_is_nan_before_every_block(kernels):
    """Each block reads its shared arrays before writing them: NaN (all bytes 0xFF; -1 as an int) in every block,
    although the block before wrote 1, 2, 3 there. A __device__ function's own __shared__ array is not refilled
    (cuda_runtime.h says so): it shows what the block before wrote."""
    blocks = 3
    floats, helper = np.zeros(64 * blocks, np.float32), np.zeros(64 * blocks, np.float32)
    doubles, ints = np.zeros(64 * blocks), np.zeros(64 * blocks, np.int32)
    kernels.check(kernels.run_read_before_write(floats, doubles, ints, helper, blocks))
    assert np.isnan(floats).all() and np.isnan(doubles).all()
    np.testing.assert_array_equal(ints, -1)
    np.testing.assert_array_equal(helper[64:], 1.0)
    templated = np.zeros(32)
    for _ in range(2):  # a kernel with external linkage, found by its own name; NaN again the second time
        kernels.check(kernels.run_external_template_kernel(templated))
        assert np.isnan(templated).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_atomic_adds(kernels, schedule):
    """Integer atomics are exact whatever the order; a float sum's last bits follow the order, which the
    schedules change; atomicAdd returns the old value, so the returned ints show the order as well."""
    threads, blocks = 128, 4
    n = threads * blocks
    values = np.random.default_rng(4).random(n, dtype=np.float32)
    float_sum, double_sum = np.zeros(1, np.float32), np.zeros(1)
    ints, unsigneds, wides = np.zeros(1, np.int32), np.zeros(1, np.uint32), np.zeros(1, np.uint64)
    olds = np.zeros(n, np.int32)
    with kernels.schedule(schedule, seed=5):
        kernels.check(
            kernels.run_atomic_adds(values, float_sum, double_sum, ints, unsigneds, wides, olds, threads, blocks)
        )
    assert (ints[0], unsigneds[0], wides[0]) == (n, 2 * n, 3 * n)
    assert sorted(olds) == list(range(n))
    if schedule == "forward":
        np.testing.assert_array_equal(olds, np.arange(n))
    if schedule in ("reverse", "reverse-warps"):
        np.testing.assert_array_equal(olds, np.arange(n)[::-1])
    np.testing.assert_allclose(double_sum[0], values.astype(np.float64).sum(), rtol=1e-14)
    np.testing.assert_allclose(float_sum[0], double_sum[0], rtol=n * 6e-8)  # n roundings of float32, at most


def test_atomic_float_sums_depend_on_the_order(kernels):
    values = np.random.default_rng(4).random(512, dtype=np.float32)
    sums = set()
    for schedule in SCHEDULES:
        float_sum, double_sum = np.zeros(1, np.float32), np.zeros(1)
        ints, unsigneds, wides, olds = (np.zeros(k, t) for k, t in [(1, np.int32), (1, np.uint32), (1, np.uint64),
                                                                    (512, np.int32)])  # fmt: skip
        with kernels.schedule(schedule, seed=6):
            kernels.check(kernels.run_atomic_adds(values, float_sum, double_sum, ints, unsigneds, wides, olds, 128, 4))
        sums.add(float_sum[0])
    assert len(sums) > 1


# ------------------------------------------------------------------------------------ indices and launches


def test_index_variables(kernels):
    grid, block = np.array([2, 3, 2], np.uint32), np.array([4, 2, 3], np.uint32)  # 24 threads: no warp is whole
    n_blocks, n_threads = int(grid.prod()), int(block.prod())
    out = np.zeros((n_blocks * n_threads, 12), np.uint32)
    kernels.check(kernels.run_index_variables(out, grid, block, 0))
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(k) for k in (*grid[::-1], *block[::-1])), indexing="ij")
    expected = np.stack([tx, ty, tz, bx, by, bz], axis=-1).reshape(-1, 6)
    np.testing.assert_array_equal(out[:, :6], expected)
    np.testing.assert_array_equal(out[:, 6:9], np.broadcast_to(block, (len(out), 3)))
    np.testing.assert_array_equal(out[:, 9:], np.broadcast_to(grid, (len(out), 3)))


@pytest.mark.parametrize(
    ("grid", "block", "shared_bytes", "error", "reason"),
    [
        ((1, 1, 1), (1025, 1, 1), 0, INVALID_CONFIGURATION, "at most 1024"),
        ((1, 1, 1), (32, 32, 2), 0, INVALID_CONFIGURATION, "2048 threads"),
        ((1, 1, 1), (0, 1, 1), 0, INVALID_CONFIGURATION, "0 threads"),
        ((1, 1, 1), (1, 1, 65), 0, INVALID_CONFIGURATION, ".z 64"),
        ((0, 1, 1), (32, 1, 1), 0, INVALID_CONFIGURATION, "empty grid"),
        ((1, 65536, 1), (32, 1, 1), 0, INVALID_CONFIGURATION, "65535"),
        ((1, 1, 65536), (32, 1, 1), 0, INVALID_CONFIGURATION, "65535"),
        ((2**31, 1, 1), (32, 1, 1), 0, INVALID_CONFIGURATION, "2^31 - 1"),
        ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, INVALID_VALUE, "48 KiB"),
    ],
)  # fmt: skip
def test_bad_launch_configurations_are_cuda_s_errors(kernels, grid, block, shared_bytes, error, reason):
    out = np.zeros(12, np.uint32)
    got = kernels.run_index_variables(out, np.array(grid, np.uint32), np.array(block, np.uint32), shared_bytes)
    assert got == error
    message = kernels.message(got)
    text = "invalid configuration argument" if error == INVALID_CONFIGURATION else "invalid argument"
    assert message.startswith(text) and "index_variables" in message and reason in message, message
    assert kernels.peek_error() == SUCCESS  # the host function's cudaGetLastError took it and reset it
    np.testing.assert_array_equal(out, 0)  # nothing ran


def test_the_largest_grid_y_launches(kernels):
    out = np.zeros((65535, 12), np.uint32)
    kernels.check(kernels.run_index_variables(out, np.array([1, 65535, 1], np.uint32), np.ones(3, np.uint32), 0))
    np.testing.assert_array_equal(out[:, 4], np.arange(65535))


# ------------------------------------------------------------------------------------------------- refusals

REFUSALS = {  # which (run_refusal's switch), threads, the tagged lines the message must name, what it says
    "barrier_after_return": (0, 128, ["barrier_after_return"], "returned from the kernel"),
    "different_barriers": (1, 128, ["different_barriers_low", "different_barriers_high"], "different __syncthreads"),
    "partial_mask": (2, 64, ["partial_mask"], "mask 0x0000ffff"),
    "different_shuffles": (3, 64, ["different_shuffles_low", "different_shuffles_high"], "different shuffles"),
    "partial_warp": (4, 48, ["partial_warp"], "partial warp"),
    "deadlock": (5, 64, ["deadlock_shuffle", "deadlock_barrier"], "deadlock"),
    "bad_width": (6, 32, ["bad_width"], "width 12"),
    "shuffle_after_return": (7, 64, ["shuffle_after_return"], "returned from the kernel"),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kernel", REFUSALS)
def test_undefined_behaviour_is_refused_naming_kernel_lines_and_threads(kernels, kernel, schedule):
    which, threads, tags, says = REFUSALS[kernel]
    lines = tagged_lines(KERNEL_DIR / "refusals.cu")
    out = np.zeros(threads, np.float32)
    with kernels.schedule(schedule, seed=7):
        error = kernels.run_refusal(which, out, threads)
    message = kernels.message(error)
    assert error == LAUNCH_FAILURE, message
    assert message.startswith("unspecified launch failure") and f"kernel {kernel} " in message, message
    assert f'"{schedule}" schedule' in message and says in message and re.search(r"threads? \d", message), message
    for tag in tags:
        assert re.search(rf"refusals\.cu:{lines[tag]}\b", message), (tag, message)
    values = np.arange(256, dtype=np.float32)  # and the emulator works again
    np.testing.assert_array_equal(block_sums(kernels, values, 256, barriers=True), [values.sum()])


# ------------------------------------------------------------------------------------------------- shuffles


def cuda_shuffle(values, mode, arg, width):
    """What each lane receives, from the CUDA programming guide's words (not from PTX, which the emulator follows):
    lanes form segments of `width`; __shfl_sync reads lane srcLane % width of the segment; up and down read lane
    -/+ delta and keep their own value where that leaves the segment; xor reads lane ^ laneMask, and keeps its own
    value where that is a later segment."""
    out = values.copy()
    for t in range(len(values)):
        lane, warp = t % 32, t // 32 * 32
        start = lane // width * width
        if mode == "idx":
            source = start + arg % width
        elif mode == "up":
            source = lane - arg if lane - start >= arg else lane
        elif mode == "down":
            source = lane + arg if lane - start + arg < width else lane
        else:
            source = lane ^ arg if (lane ^ arg) < start + width else lane
        out[t] = values[warp + source]
    return out


SHUFFLE_CASES = [
    ("idx", 0, 32), ("idx", 7, 32), ("idx", 31, 32), ("idx", -1, 32), ("idx", 5, 8), ("idx", 3, 1),
    ("up", 0, 32), ("up", 1, 32), ("up", 5, 32), ("up", 16, 32), ("up", 31, 32), ("up", 3, 8), ("up", 2, 2),
    ("down", 1, 32), ("down", 5, 32), ("down", 31, 32), ("down", 3, 8), ("down", 1, 16),
    ("xor", 1, 32), ("xor", 16, 32), ("xor", 31, 32), ("xor", 8, 8), ("xor", 3, 4),
]  # fmt: skip
SHUFFLE_TYPES = {"int": (0, np.int32), "unsigned": (1, np.uint32), "float": (2, np.float32),
                 "double": (3, np.float64), "long long": (4, np.int64)}  # fmt: skip


@pytest.mark.parametrize("type_name", SHUFFLE_TYPES)
@pytest.mark.parametrize(("mode", "arg", "width"), SHUFFLE_CASES)
def test_shuffles_follow_cuda_s_rules_at_the_edges(kernels, type_name, mode, arg, width):
    type_code, dtype = SHUFFLE_TYPES[type_name]
    out = np.zeros(64, dtype)  # two warps: each shuffles within itself
    mode_code = ["idx", "up", "down", "xor"].index(mode)
    kernels.check(kernels.run_shuffle_probe(out, type_code, mode_code, arg, width, 64))
    values = ((3 * np.arange(64) + 1) / 2).astype(dtype)  # the kernel's value(lane): (3t + 1) / 2 in its type
    if np.issubdtype(dtype, np.integer):
        values = ((3 * np.arange(64) + 1) // 2).astype(dtype)
    np.testing.assert_array_equal(out, cuda_shuffle(values, mode, arg, width))


# ------------------------------------------------------------------------------------------ types and maths


def test_vector_types(kernels):
    n = 64
    rng = np.random.default_rng(8)
    in4, in_int4 = rng.random((n, 4), dtype=np.float32), rng.integers(-99, 99, (n, 4)).astype(np.int32)
    in_uint4 = rng.integers(0, 2**32, (n, 4), dtype=np.uint64).astype(np.uint32)
    out4, out_int4 = np.zeros_like(in4), np.zeros_like(in_int4)
    halves, pairs = np.zeros((2 * n, 2), np.uint32), np.zeros((2 * n, 2), np.float32)
    kernels.check(kernels.run_vectors(in4, out4, in_int4, out_int4, halves, in_uint4, pairs, n))
    np.testing.assert_array_equal(out4, in4[:, ::-1])
    np.testing.assert_array_equal(out_int4, in_int4[:, ::-1])
    np.testing.assert_array_equal(halves.reshape(n, 4), in_uint4)
    np.testing.assert_array_equal(pairs.reshape(n, 4), in4)


def to_16_bits(kernels, floats):
    floats = np.ascontiguousarray(floats, np.float32)
    half_bits, bf16_bits = np.zeros(len(floats), np.uint16), np.zeros(len(floats), np.uint16)
    half_back, bf16_back = np.zeros_like(floats), np.zeros_like(floats)
    kernels.check(kernels.run_to_16_bits(floats, half_bits, half_back, bf16_bits, bf16_back, len(floats)))
    return half_bits, half_back, bf16_bits, bf16_back


def test_16_bit_conversions_round_to_nearest_even(kernels):
    """Against NumPy's float16 and torch's bfloat16 conversions (both round to nearest, ties to even), over random
    bit patterns (every exponent: subnormals, overflow, infinities, NaN) and the ties and edges by name."""
    rng = np.random.default_rng(9)
    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14,
             1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, np.inf, -np.inf, np.nan,
             3.4028235e38]  # fmt: skip
    floats = np.concatenate([np.array(edges, np.float32), rng.integers(0, 2**32, 20000, dtype=np.uint64)
                             .astype(np.uint32).view(np.float32)])  # fmt: skip
    half_bits, half_back, bf16_bits, bf16_back = to_16_bits(kernels, floats)
    nan = np.isnan(floats)
    with np.errstate(over="ignore"):
        expected_half = floats.astype(np.float16)
    np.testing.assert_array_equal(half_bits[~nan], expected_half.view(np.uint16)[~nan])
    np.testing.assert_array_equal(half_back[~nan], expected_half.astype(np.float32)[~nan])
    expected_bf16 = torch.from_numpy(floats).to(torch.bfloat16)
    np.testing.assert_array_equal(bf16_bits[~nan], expected_bf16.view(torch.int16).numpy().view(np.uint16)[~nan])
    np.testing.assert_array_equal(bf16_back[~nan], expected_bf16.float().numpy()[~nan])
    assert (half_bits[nan] == 0x7FFF).all() and (bf16_bits[nan] == 0x7FFF).all()  # CUDA's canonical NaN
    assert np.isnan(half_back[nan]).all() and np.isnan(bf16_back[nan]).all()


def test_every_16_bit_number_converts_back_exactly(kernels):
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]
    half_bits, half_back, _, _ = to_16_bits(kernels, halves.astype(np.float32))
    np.testing.assert_array_equal(half_bits, halves.view(np.uint16))
    np.testing.assert_array_equal(half_back, halves.astype(np.float32))
    bf16 = (np.arange(2**16, dtype=np.uint32) << 16).view(np.float32)
    bf16 = bf16[np.isfinite(bf16)]
    _, _, bf16_bits, bf16_back = to_16_bits(kernels, bf16)
    np.testing.assert_array_equal(bf16_bits, (bf16.view(np.uint32) >> 16).astype(np.uint16))
    np.testing.assert_array_equal(bf16_back, bf16)


def test_maths(kernels):
    x = np.array([0.75, -2.0], np.float32)
    out, out_double, out_int = np.zeros(6, np.float32), np.zeros(2), np.zeros(2, np.int32)
    kernels.check(kernels.run_maths(x, out, out_double, out_int))
    expected = [np.exp(0.75), np.exp2(0.75), np.log1p(0.75), np.exp(0.75)]
    np.testing.assert_allclose(out[:4], expected, rtol=2.4e-7)  # within 2 ulps of float32: the C library's
    np.testing.assert_array_equal(out[4:], [-2.0, 0.75])
    np.testing.assert_array_equal(out_double, [-1.0, 2.5])
    np.testing.assert_array_equal(out_int, [-3, 4])


# ------------------------------------------------------------------------------------ the switch, the source


def test_the_ucontext_fallback_runs_the_same_model():
    """Other architectures than x86-64 switch fibers with POSIX ucontext: the same schedules and refusals."""
    fallback = Kernels(fused.build_emulated("minijamba_emulator_test_kernels_ucontext", SOURCES, ["-DMJ_EMU_UCONTEXT"]))
    rows = np.random.default_rng(1).integers(1, 50, size=(4, 128)).astype(np.int32)
    with fallback.schedule("forward"):
        np.testing.assert_array_equal(block_scans(fallback, rows, second_barrier=False), rows.cumsum(axis=1))
    with fallback.schedule("warps"):
        assert not np.array_equal(block_scans(fallback, rows, second_barrier=False), rows.cumsum(axis=1))
    out = np.zeros(64, np.float32)
    error = fallback.run_refusal(5, out, 64)
    assert error == LAUNCH_FAILURE and "deadlock" in fallback.message(error)
    first, second = tickets(fallback, 64, 2, "warps")
    np.testing.assert_array_equal(second, first + 32)


def _nvcc():
    return shutil.which("nvcc") or next(iter(Path("/usr/local/cuda/bin").glob("nvcc")), None)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not on PATH nor in /usr/local/cuda/bin")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_the_test_kernels_are_cuda(tmp_path, source):
    """What the emulator runs here is CUDA as nvcc takes it, warnings as errors."""
    command = [str(_nvcc()), "-std=c++17", "-gencode=arch=compute_80,code=sm_80", "-Werror", "all-warnings", "-c",
               str(source), "-o", str(tmp_path / "kernel.o")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # make cuda-emulated-asan preloads libasan
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------- the scan kernel


def _gradients(args, impl):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if isinstance(v, torch.Tensor)}
    y, last = selective_scan(**{**args, **leaves}, return_last_state=True, impl=impl)
    g = torch.Generator().manual_seed(0)
    ((y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (last * torch.randn(last.shape, generator=g,
     dtype=last.dtype)).sum()).backward()  # fmt: skip
    return (y, last), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_scan_kernel_matches_the_sequential_scan_under_every_schedule(schedule):
    """Smoke test of impl="cuda-emulated" (tests/test_fused_scan.py has the full grid): float64, two chunks and a
    remainder, every option on, forward and every gradient."""
    extension = fused.load("cuda-emulated")
    chunk = fused.kernel_constants()["kCudaThreads"] * fused.kernel_constants()["kCudaItems"]
    options = {"D", "z", "delta_bias", "delta_softplus", "initial_state"}
    args = make_inputs(3, 2, 3, 5, chunk + 7, torch.float64, "selective", "invariant", options)
    extension.set_schedule(schedule, 11)
    try:
        (y, last), grads = _gradients(args, "cuda-emulated")
    finally:
        extension.set_schedule("forward", 0)
    (y_ref, last_ref), expected = _gradients(args, "sequential")
    assert_close(y, y_ref, "scan_float64", "emulated y")
    assert_close(last, last_ref, "scan_float64", "emulated last state")
    for name, grad in grads.items():
        assert_close(grad, expected[name], "scan_float64", f"emulated grad {name}")
