"""The fused selective scan: the C++ and CUDA kernels of cuda/, built on first use and wrapped for autograd.

Mamba §3.3.2 (hardware-aware algorithm): the scan moves O(batch · dim · L) numbers but computes O(· N) states,
so a fast scan keeps each channel's N states on chip while the sequence streams through, and never writes the
(batch, dim, L, N) tensor the torch scans build. The kernels (lesson 07 walks through them):
    cuda/scan_op.h              the combine and the per-step maths, shared by both kernels
    cuda/selective_scan_cpu.cpp the CPU twin: one task per (batch, channel), at::parallel_for over them
    cuda/selective_scan.cu      the CUDA kernels: one thread block per (batch, channel), block-wide scans
    cuda/causal_conv_cpu.cpp    the Mamba block's conv + SiLU, forward and backward, on the CPU
    cuda/binding.cpp            the torch entry points, which check every argument (RuntimeError, named)
Both backward passes recompute the states chunk by chunk from the states the forward saved at chunk starts,
so training memory is O(L / chunk · N) per channel on top of the inputs and outputs.

`load(kind)` compiles an extension with torch.utils.cpp_extension on its first call and caches it in
TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions by default), where later processes load it without compiling; the
CUDA one under a name that says which torch, CUDA and GPU architectures it was built for (cuda_build_name). A
failed build raises BuildError, and is remembered so a process tries only once. The kinds, FUSED_IMPLS, and their
devices are defined in minijamba.scan, which imports this module only when a fused impl or "auto" is asked for.

Glossary (code name — Mamba paper): u — x;  delta — Δ;  A, B, C, D — A, B, C, D;  z — the gate branch;
dim — D;  d_state — N;  chunk_states — the states at chunk starts, saved for the backward.
"""

import os
import re
from pathlib import Path

import torch

from .scan import FUSED_IMPLS

__all__ = [
    "BuildError",
    "CUDA_SOURCES",
    "EMULATOR_SOURCES",
    "build_emulated",
    "load",
    "load_emulated_variant",
    "kernel_constants",
    "fused_selective_scan",
    "fused_causal_conv_silu",
    "cuda_arch_list",
    "cuda_build_name",
    "nvcc_arch_flags",
]

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
# CUDA's execution model on the CPU (cuda/emulator/cuda_emulator.h): the scheduler, and the finder of __shared__
EMULATOR_SOURCES = ["emulator/cuda_emulator.cpp", "emulator/shared_memory.cpp"]
CUDA_SOURCES = {
    "cpu": ["binding.cpp", "selective_scan_cpu.cpp", "causal_conv_cpu.cpp"],
    "cuda": ["binding.cpp", "selective_scan_cpu.cpp", "causal_conv_cpu.cpp", "selective_scan.cu"],
    # selective_scan.cu itself, compiled as host C++ under the execution model of cuda/emulator/
    "cuda-emulated": ["binding.cpp", *EMULATOR_SOURCES, "emulator/selective_scan_emulated.cpp"],
}
# Not -march=native (the binary must run on any x86-64 machine; cpu_math.h dispatches to AVX2 at load time
# instead) and not -ffast-math (it licenses reordering sums and ignoring NaN and inf). -fno-trapping-math changes
# no value: it only lets the compiler turn the clamps and ?: choices of cpu_math.h and scan_op.h into vector blends
# (floating-point traps are masked in torch anyway), without which those loops do not vectorize.
CFLAGS = ["-O3", "-fno-trapping-math", "-fopenmp"]
# Without a GPU to ask, nvcc must be told which architectures to build, as TORCH_CUDA_ARCH_LIST spells them:
# Turing 7.5 (the T4 of Colab's free tier), Ampere 8.0 (A100) and 8.6 (RTX 30xx, A10), Ada 8.9 (RTX 40xx, L4),
# Hopper 9.0 (H100, H200). "+PTX" embeds the compute_90 PTX as well: on a GPU newer than all of these (Blackwell)
# the driver compiles it at load time, with none of that chip's own instructions but no "no kernel image" error.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
# nvcc's flags for selective_scan.cu, besides the architectures; tests/test_cuda_build.py compiles with these too.
CUDA_CFLAGS = ["-O3", "-std=c++17"]


class BuildError(RuntimeError):
    """The fused scan's extension could not be built here (no compiler, or no CUDA toolkit or CUDA torch)."""


_built = {}  # kind -> the loaded module, or the BuildError its build raised


def cuda_arch_list():
    """The architectures the CUDA extension is built for, as TORCH_CUDA_ARCH_LIST spells them.

    The variable itself where it is set; else, where torch sees GPUs, theirs (what torch then builds for: each
    card's compute capability, +PTX on the highest); else DEFAULT_CUDA_ARCHS."""
    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen and chosen != "native":  # torch reads "native" as "the visible cards", as it does an unset variable
        return chosen
    if torch.cuda.is_available():
        cards = sorted({tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in cards) + "+PTX"
    return DEFAULT_CUDA_ARCHS


def cuda_build_name(arch_list):
    """The CUDA extension's name, which says what it is built for: torch's version, CUDA's, and arch_list.

    torch caches a build in TORCH_EXTENSIONS_DIR under its name and loads it again while the sources and flags are
    unchanged, but TORCH_CUDA_ARCH_LIST is not among what it compares: under one fixed name, a build cached on one
    machine (or in a shared home directory) would be loaded on a different GPU, to fail there with "no kernel image
    is available", and one made by another torch would be loaded against the wrong ABI. One name per (torch, CUDA,
    architectures) gives each its own build."""
    built_for = f"torch{torch.__version__}_cuda{torch.version.cuda}_arch{arch_list}"
    return "minijamba_scan_cuda_" + re.sub(r"\W", "_", built_for)  # an identifier: it names the Python module


def nvcc_arch_flags(arch_list):
    """nvcc's -gencode flags for a TORCH_CUDA_ARCH_LIST value, as torch derives them: machine code (SASS) for each
    X.Y, and for X.Y+PTX the compute_XY PTX as well. For compiling the .cu with nvcc alone (tests/test_cuda_build.py,
    minijamba.bench.sass); torch's named architectures ("Hopper") are not accepted here."""
    flags = []
    for arch in arch_list.replace(";", " ").split():
        number = arch.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d+a?", number):
            raise ValueError(f"arch_list: {arch!r} is not X.Y or X.Y+PTX")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _emulator_flags():
    """(compiler flags, linker flags, name suffix) for the builds under cuda/emulator/.

    MINIJAMBA_SANITIZE=address,undefined (what `make cuda-emulated-asan` sets) builds them with those sanitizers,
    at -O1 with debug information for readable reports, stopping at the first error, under a name of their own so
    that the plain build stays cached. The process must then start with libasan loaded first (LD_PRELOAD)."""
    sanitize = os.environ.get("MINIJAMBA_SANITIZE", "").strip()
    if not sanitize:
        return CFLAGS, ["-fopenmp"], ""
    if not re.fullmatch(r"[a-z]+(,[a-z]+)*", sanitize):
        raise BuildError(f"MINIJAMBA_SANITIZE must be a list such as address,undefined, got {sanitize!r}")
    flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    cflags = [f for f in CFLAGS if not f.startswith("-O")] + ["-O1", *flags]
    return cflags, ["-fopenmp", *flags], "_" + sanitize.replace(",", "_")


def build_emulated(name, cu_files, extra_cflags=()):
    """A shared library of the given .cu files compiled as host C++ under cuda/emulator/, the emulator linked in;
    returns its path, for ctypes (tests/test_cuda_emulator.py builds its own small kernels with it).

    Built and cached by torch.utils.cpp_extension like the extensions, sanitized as they are under
    MINIJAMBA_SANITIZE, but it is no Python module: the .cu files export extern "C" functions. Each .cu is compiled
    through a two-line wrapper in the build directory that includes the emulator's cuda_runtime.h first.
    extra_cflags (such as -DMJ_EMU_UCONTEXT) call for a name of their own, or each call rebuilds the other's."""
    from torch.utils import cpp_extension

    cflags, ldflags, suffix = _emulator_flags()
    name += suffix
    build_dir = Path(cpp_extension.get_default_build_root()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for cu in map(Path, cu_files):
        wrapper, text = build_dir / f"{cu.stem}_emulated.cpp", f'#include <cuda_runtime.h>\n#include "{cu.resolve()}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:  # rewritten only when changed: ninja goes by mtime
            wrapper.write_text(text)
        wrappers.append(str(wrapper))
    try:
        cpp_extension.load(
            name=name,
            sources=[*wrappers, *(str(CUDA_DIR / s) for s in EMULATOR_SOURCES)],
            extra_include_paths=[str(CUDA_DIR / "emulator" / "include")],
            extra_cflags=[*cflags, *extra_cflags],
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        raise BuildError(
            f"building {name} from {[str(f) for f in cu_files]} under the emulator failed: {error}"
        ) from None
    return build_dir / f"{name}.so"


def load_emulated_variant(name, cu_source):
    """The cuda-emulated extension built from `cu_source`, the text of a changed cuda/selective_scan.cu (lesson 07
    removes a barrier from it), under the build name `name`; used like load("cuda-emulated"), cached the same way.

    The text is written to the build directory, whose wrapper includes it after the emulator's cuda_runtime.h;
    its `#include "selective_scan.h"` resolves to cuda/'s."""
    from torch.utils import cpp_extension

    cflags, ldflags, suffix = _emulator_flags()
    name += suffix
    build_dir = Path(cpp_extension.get_default_build_root()) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    for file, text in (("selective_scan.cu", cu_source), ("variant_emulated.cpp", _VARIANT_WRAPPER)):
        if not (build_dir / file).exists() or (build_dir / file).read_text() != text:  # ninja goes by mtime
            (build_dir / file).write_text(text)
    sources = [str(CUDA_DIR / "binding.cpp"), *(str(CUDA_DIR / s) for s in EMULATOR_SOURCES)]
    try:
        return cpp_extension.load(
            name=name,
            sources=[*sources, str(build_dir / "variant_emulated.cpp")],
            extra_include_paths=[str(CUDA_DIR / "emulator" / "include"), str(CUDA_DIR)],
            extra_cflags=[*cflags, "-DMINIJAMBA_CUDA_EMULATED"],
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
        )
    except (RuntimeError, OSError, ImportError) as error:
        raise BuildError(f"building the emulated variant {name} failed: {error}") from None


_VARIANT_WRAPPER = '#include <cuda_runtime.h>\n\n#include "selective_scan.cu"\n'


def _build(kind):
    from torch.utils import cpp_extension

    sources = [str(CUDA_DIR / s) for s in CUDA_SOURCES[kind]]
    if kind == "cpu":
        return cpp_extension.load(
            name="minijamba_scan_cpu", sources=sources, extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"]
        )
    if kind == "cuda-emulated":
        cflags, ldflags, suffix = _emulator_flags()
        return cpp_extension.load(
            name="minijamba_scan_cuda_emulated" + suffix,
            sources=sources,
            extra_include_paths=[str(CUDA_DIR / "emulator" / "include")],
            extra_cflags=[*cflags, "-DMINIJAMBA_CUDA_EMULATED"],
            extra_ldflags=ldflags,
        )
    if torch.version.cuda is None:
        raise BuildError(
            f"the CUDA scan needs a CUDA build of torch, and torch {torch.__version__} is CPU-only "
            "(the .cu can still be compile-checked with nvcc alone: tests/test_cuda_build.py)"
        )
    # torch guesses /usr/local as CUDA_HOME when nvcc is not where it looks, and the link then fails.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    arch_list = cuda_arch_list()
    if not torch.cuda.is_available():  # no card for torch to ask: it builds what the variable says
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    define = ["-DMINIJAMBA_WITH_CUDA"]
    return cpp_extension.load(
        name=cuda_build_name(arch_list),
        sources=sources,
        extra_cflags=CFLAGS + define,
        extra_cuda_cflags=[*CUDA_CFLAGS, *define],
        extra_ldflags=["-fopenmp"],
    )


def load(kind):
    """The built extension for kind "cpu", "cuda" or "cuda-emulated" (built on the first call); raises BuildError
    if it cannot be."""
    if kind not in FUSED_IMPLS:
        raise ValueError(f"kind must be one of {FUSED_IMPLS}, got {kind!r}")
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

    kCudaThreads (threads per block), kCudaItems (steps per thread), kCudaItemsFloat64 (float64's steps per thread:
    its blocks have kCudaThreads · kCudaItems / kCudaItemsFloat64 threads, the same chunk), kWarp (lanes per warp),
    kCudaMaxState (the largest N), kCpuChunk (the CPU twin's steps per chunk). Read from the sources, not from a
    built extension, so that a machine without a GPU can still draw the CUDA kernel's layout with its real numbers."""
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
    """The scan on the kernels of `kind` (one of FUSED_IMPLS): (y (batch, dim, L), last state (batch, dim, N)).

    Arguments as `minijamba.scan.selective_scan`, already checked there; made contiguous here, as the kernels
    require. The forward saves chunk-start states only when autograd will need them.
    """
    extension = load(kind)
    tensors = [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _FusedScan.apply(extension, bool(delta_softplus), save, *tensors)


class _FusedConv(torch.autograd.Function):
    """silu(causal depthwise conv); backward through the kernel's own backward, which recomputes the conv."""

    @staticmethod
    def forward(ctx, extension, x, weight, bias, prefix):
        ctx.extension = extension
        ctx.save_for_backward(x, weight, bias, prefix)
        return extension.conv_forward(x, weight, bias, prefix)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, prefix = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, grad_prefix = ctx.extension.conv_backward(
            x, weight, bias, prefix, grad_out.contiguous()
        )
        return None, grad_x, grad_weight, grad_bias, grad_prefix


def fused_causal_conv_silu(x, weight, bias, prefix):
    """The Mamba block's silu(conv1d) on the CPU kernel (cuda/causal_conv_cpu.cpp): (batch, dim, L), contiguous.

    x: (batch, L, dim), channels-last (in_proj's output, sliced: unit stride along dim, any other strides);
    weight: (dim, d_conv); bias: (dim,) or None; prefix: (batch, dim, d_conv - 1), the inputs before x (the cache's
    window), or None for zeros. The same numbers as mamba.depthwise_causal_conv on the window [prefix, x] followed by
    F.silu, to rounding; tests/test_mamba.py compares the two, forward and gradients, in float64.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    tensors = [None if t is None else t.contiguous() for t in (weight, bias, prefix)]
    return _FusedConv.apply(load("cpu"), x, *tensors)
