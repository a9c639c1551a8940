"""The fused selective scan: the C++ and CUDA kernels of cuda/, built on first use and wrapped for autograd.

Mamba §3.3.2 (hardware-aware algorithm): the scan moves O(batch · dim · L) numbers but computes O(· N) states,
so a fast scan keeps each channel's N states on chip while the sequence streams through, and never writes the
(batch, dim, L, N) tensor the torch scans build. The kernels (lesson 07 walks through them):
    cuda/scan_op.h              the combine and the per-step maths, shared by both kernels
    cuda/selective_scan_cpu.cpp the CPU twin: one task per (batch, channel), at::parallel_for over them
    cuda/selective_scan.cu      the CUDA kernels: one thread block per (batch, channel), block-wide scans
    cuda/binding.cpp            the torch entry points, which check every argument (RuntimeError, named)
Both backward passes recompute the states chunk by chunk from the states the forward saved at chunk starts,
so training memory is O(L / chunk · N) per channel on top of the inputs and outputs.

`load("cpu")` / `load("cuda")` build an extension with torch.utils.cpp_extension on the first call (about 25 s
for the CPU one; cached in TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default, afterwards). A failed
build raises BuildError, and is remembered so a process tries only once.

Glossary (code name — Mamba paper): u — x;  delta — Δ;  A, B, C, D — A, B, C, D;  z — the gate branch;
dim — D;  d_state — N;  chunk_states — the states at chunk starts, saved for the backward.
"""

import os
import re
from pathlib import Path

import torch

__all__ = ["BuildError", "CUDA_SOURCES", "DEVICES", "KINDS", "load", "kernel_constants", "fused_selective_scan"]

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
KINDS = ("cpu", "cuda", "cuda-emulated")
CUDA_SOURCES = {
    "cpu": ["binding.cpp", "selective_scan_cpu.cpp"],
    "cuda": ["binding.cpp", "selective_scan_cpu.cpp", "selective_scan.cu"],
    # selective_scan.cu itself, compiled as host C++ under the execution model of cuda/emulator/
    "cuda-emulated": ["binding.cpp", "emulator/cuda_emulator.cpp", "emulator/selective_scan_emulated.cpp"],
}
DEVICES = {"cpu": "cpu", "cuda": "cuda", "cuda-emulated": "cpu"}  # where each kind's tensors live
# Not -march=native (the binary must run on any x86-64 machine; cpu_math.h dispatches to AVX2 at load time
# instead) and not -ffast-math (it licenses reordering sums and ignoring NaN and inf). -fno-trapping-math changes
# no value: it only lets the compiler turn the clamps and ?: choices of cpu_math.h and scan_op.h into vector blends
# (floating-point traps are masked in torch anyway), without which those loops do not vectorize.
CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
# Without a GPU to ask, nvcc must be told which architectures to build: Ampere (A100) and Hopper (H100/H200).
DEFAULT_CUDA_ARCHS = "8.0;9.0"


class BuildError(RuntimeError):
    """The fused scan's extension could not be built here (no compiler, or no CUDA toolkit or CUDA torch)."""


_built = {}  # kind -> the loaded module, or the BuildError its build raised


def _build(kind):
    from torch.utils import cpp_extension

    sources = [str(CUDA_DIR / s) for s in CUDA_SOURCES[kind]]
    if kind == "cpu":
        return cpp_extension.load(
            name="minijamba_scan_cpu", sources=sources, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"]
        )
    if kind == "cuda-emulated":
        return cpp_extension.load(
            name="minijamba_scan_cuda_emulated",
            sources=sources,
            extra_include_paths=[str(CUDA_DIR / "emulator" / "include")],
            extra_cflags=[*CFLAGS, "-DMINIJAMBA_CUDA_EMULATED"],
            extra_ldflags=["-fopenmp"],
        )
    if torch.version.cuda is None:
        raise BuildError(
            f"the CUDA scan needs a CUDA build of torch, and torch {torch.__version__} is CPU-only "
            "(the .cu can still be compile-checked with nvcc alone: tests/test_fused_scan.py)"
        )
    # torch guesses /usr/local as CUDA_HOME when nvcc is not where it looks, and the link then fails.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    define = ["-DMINIJAMBA_WITH_CUDA"]
    return cpp_extension.load(
        name="minijamba_scan_cuda",
        sources=sources,
        extra_cflags=CFLAGS + define,
        extra_cuda_cflags=["-O3", "-std=c++17", *define],
        extra_ldflags=["-fopenmp"],
    )


def load(kind):
    """The built extension for kind "cpu" or "cuda" (built on the first call); raises BuildError if it cannot be."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind not in _built:
        try:
            _built[kind] = _build(kind)
        except BuildError as error:
            _built[kind] = error
        except (RuntimeError, OSError, ImportError) as error:  # compiler missing or failing, ninja missing
            _built[kind] = BuildError(f"building the fused {kind} scan from {CUDA_DIR} failed: {error}")
    if isinstance(_built[kind], BuildError):
        raise _built[kind]
    return _built[kind]


def kernel_constants():
    """The kernels' sizes, {name: int}, read from the `constexpr` integer literals of cuda/selective_scan.h and .cu.

    kCudaThreads (threads per block), kCudaItems (steps per thread), kWarp (lanes per warp), kCudaMaxState (the
    largest N), kCpuChunk (the CPU twin's steps per chunk). Read from the sources, not from a built extension, so
    that a machine without a GPU can still draw the CUDA kernel's layout with its real numbers."""
    literal = re.compile(r"constexpr\s+\w+\s+(k\w+)\s*=\s*(\d+)\s*;")  # derived ones (kCudaChunk) are not literals
    sources = ((CUDA_DIR / name).read_text() for name in ("selective_scan.h", "selective_scan.cu"))
    return {name: int(value) for text in sources for name, value in literal.findall(text)}


class _FusedScan(torch.autograd.Function):
    """y, last_state = the scan; backward through the kernels' own backward (no autograd graph inside)."""

    @staticmethod
    def forward(ctx, extension, delta_softplus, save, u, delta, A, B, C, D, z, delta_bias, initial_state):
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        y, last_state, chunk_states = extension.forward(*inputs, delta_softplus, save)
        ctx.extension, ctx.delta_softplus = extension, delta_softplus
        ctx.save_for_backward(*inputs, chunk_states)
        return y, last_state

    @staticmethod
    def backward(ctx, grad_y, grad_last_state):
        *inputs, chunk_states = ctx.saved_tensors
        grads = ctx.extension.backward(
            *inputs, ctx.delta_softplus, chunk_states, grad_y.contiguous(), grad_last_state.contiguous()
        )
        return None, None, None, *grads


def fused_selective_scan(kind, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """The scan on the kernels of `kind` ("cpu" or "cuda"): (y (batch, dim, L), last state (batch, dim, N)).

    Arguments as `minijamba.scan.selective_scan`, already checked there; made contiguous here, as the kernels
    require. The forward saves chunk-start states only when autograd will need them.
    """
    extension = load(kind)
    tensors = [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedScan.apply(extension, bool(delta_softplus), save, *tensors)
