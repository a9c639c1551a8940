"""The CUDA build without a GPU: the architectures and the build's name, nvcc for every default architecture
(registers, no spills), and the SASS count of minijamba.bench.sass.

nvcc compiles cuda/selective_scan.cu here wherever it exists (no GPU or CUDA torch needed): once for the module,
for every architecture of fused.DEFAULT_CUDA_ARCHS and its PTX, as one call (8 s on two cores for the kernels of
4 items per thread, 50-100 s for those of 16: most of this file's time).
"""

import os
import re
import subprocess
import time

import pytest
import torch

from minijamba import fused
from minijamba.bench import __main__ as bench_main
from minijamba.bench import sass

needs_nvcc = pytest.mark.skipif(
    sass.find_tool("nvcc") is None, reason="nvcc not on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin"
)


# ------------------------------------------------------------------------------ architectures and the build's name


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_default_archs_reach_colab_hopper_and_newer_gpus():
    """sm_75 (Colab's T4) through sm_90 (H100/H200) as machine code, and PTX that the driver compiles for newer."""
    flags = fused.nvcc_arch_flags(fused.DEFAULT_CUDA_ARCHS)
    assert {re.search(r"code=(sm_\d+)", f)[1] for f in flags if "code=sm_" in f} >= {"sm_75", "sm_80", "sm_90"}
    assert flags[-1] == "-gencode=arch=compute_90,code=compute_90"


def test_nvcc_arch_flags_are_torchs():
    assert fused.nvcc_arch_flags("7.5;9.0+PTX") == [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert fused.nvcc_arch_flags("9.0a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="arch_list: 'Hopper'"):
        fused.nvcc_arch_flags("8.0;Hopper")


def test_arch_list_without_a_gpu_is_the_default(no_gpu):
    assert fused.cuda_arch_list() == fused.DEFAULT_CUDA_ARCHS


def test_arch_list_is_the_variable_where_set(no_gpu, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert fused.cuda_arch_list() == "8.6"


def test_arch_list_with_gpus_is_theirs(monkeypatch):
    """What torch builds for when the variable is unset: every visible card's capability, +PTX on the highest."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    cards = [(9, 0), (7, 5), (9, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: cards[i])
    assert fused.cuda_arch_list() == "7.5;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")  # torch's spelling of "the visible cards"
    assert fused.cuda_arch_list() == "7.5;9.0+PTX"


def test_build_name_says_what_it_was_built_for(monkeypatch):
    """One name per (torch, CUDA, architectures): torch's cache compares none of them (NOTES.md)."""
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    name = fused.cuda_build_name("7.5;9.0+PTX")
    assert name.isidentifier(), name  # it names the extension's Python module
    assert name == fused.cuda_build_name("7.5;9.0+PTX")
    assert "2_11_0" in name and "13_0" in name
    others = {fused.cuda_build_name("9.0+PTX"), fused.cuda_build_name("7.5;9.0")}
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    others.add(fused.cuda_build_name("7.5;9.0+PTX"))
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    others.add(fused.cuda_build_name("7.5;9.0+PTX"))
    assert name not in others and len(others) == 4


def test_cuda_build_asks_torch_for_the_named_architectures(no_gpu, monkeypatch):
    """With a CUDA torch and no GPU (a build machine), torch is told the default architectures and the build is
    named after them. cpp_extension.load is replaced: the CUDA torch is not installed here."""
    from torch.utils import cpp_extension

    seen = {}

    def load(name, extra_cuda_cflags, **kwargs):
        seen.update(name=name, archs=os.environ["TORCH_CUDA_ARCH_LIST"], flags=extra_cuda_cflags)
        return "built"

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setenv("CUDA_HOME", "/usr/local/cuda")
    assert fused._build("cuda") == "built"
    assert seen["archs"] == fused.DEFAULT_CUDA_ARCHS
    assert seen["name"] == fused.cuda_build_name(fused.DEFAULT_CUDA_ARCHS)
    assert seen["flags"][: len(fused.CUDA_CFLAGS)] == fused.CUDA_CFLAGS


# ------------------------------------------------------------------------------ nvcc for every default architecture


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(object file, [sass.Resources], seconds): one nvcc call for every architecture of the default list, warnings
    as errors, with ptxas's report of each kernel."""
    output = tmp_path_factory.mktemp("nvcc") / "selective_scan.o"
    flags = ["-c", "-Werror", "all-warnings", "-Xptxas", "-v", "--threads", "0"]  # 0: one thread per CPU
    command = sass.nvcc_command(sass.find_tool("nvcc"), fused.DEFAULT_CUDA_ARCHS, output, *flags)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return output, sass.ptxas_resources(done.stderr), time.perf_counter() - start


def _sass_archs():
    return {re.search(r"code=(sm_\w+)", f)[1] for f in fused.nvcc_arch_flags(fused.DEFAULT_CUDA_ARCHS) if "sm_" in f}


@needs_nvcc
def test_cuda_every_arch_builds_every_kernel_without_spills(compiled):
    """Registers and spills per kernel instantiation and architecture (printed: pytest -rP shows them)."""
    _, resources, seconds = compiled
    names = sass.short_names(sorted({r.kernel for r in resources}))
    print(f"nvcc for {fused.DEFAULT_CUDA_ARCHS}: {seconds:.1f} s")
    print(f"{'kernel':<40} {'arch':<6} {'registers':>9} {'stack B':>8} {'spill stores B':>14} {'spill loads B':>13}")
    for r in sorted(resources, key=lambda r: (names[r.kernel], r.arch)):
        row = f"{names[r.kernel]:<40} {r.arch:<6} {r.registers:>9} {r.stack_bytes:>8}"
        print(f"{row} {r.spill_stores:>14} {r.spill_loads:>13}")
    kernels = {r.kernel for r in resources}
    assert any("forward" in names[k] for k in kernels) and any("backward" in names[k] for k in kernels), names
    per_arch = {arch: {r.kernel for r in resources if r.arch == arch} for arch in _sass_archs()}
    assert {r.arch for r in resources} == _sass_archs()
    missing = {arch: sorted(names[k] for k in kernels - found) for arch, found in per_arch.items() if kernels - found}
    assert not missing, f"kernels with no machine code for an architecture: {missing}"
    spilled = [(names[r.kernel], r.arch) for r in resources if r.spill_stores or r.spill_loads]
    assert not spilled, f"register spills: {spilled}"


@needs_nvcc
@pytest.mark.skipif(sass.find_tool("cuobjdump") is None, reason="no cuobjdump: pip install nvidia-cuda-cuobjdump")
def test_cuda_ptx_holds_every_kernel(compiled):
    """The +PTX of the default list: every kernel as PTX too, for GPUs newer than any machine code here."""
    output, resources, _ = compiled
    dump = subprocess.run([sass.find_tool("cuobjdump"), "-ptx", str(output)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    ptx_arch = fused.DEFAULT_CUDA_ARCHS.split(";")[-1].removesuffix("+PTX").replace(".", "")
    assert re.findall(r"^\.target\s+(\w+)", dump.stdout, re.M) == [f"sm_{ptx_arch}"]
    assert set(re.findall(r"\.entry\s+(\w+)", dump.stdout)) == {r.kernel for r in resources}


# ------------------------------------------------------------------------------ the SASS count

# What nvdisasm -g prints, cut down: an outer loop (.L_x_0) around the state loop (.L_x_1: a barrier and an exp2),
# then a longer loop with a barrier and no exp2 (a block reduction over states, say) and a trap loop (.L_x_3).
LISTING = """
        .text._Z6kernelv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
.L_x_1:
        /*0020*/                   MUFU.EX2 R3, R3 ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
	//## File "/src/cuda/selective_scan.cu", line 7
        /*0040*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   FADD R1, R1, R2 ;
        /*0070*/                   FADD R1, R1, R2 ;
        /*0080*/               @P1 BRA `(.L_x_2) ;
        /*0090*/              @!P2 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_3:
        /*00b0*/                   BRA `(.L_x_3) ;
"""


def test_state_loop_is_the_innermost_barrier_loop_with_the_exps():
    kernel = sass.parse_listing(LISTING)["_Z6kernelv"]
    assert [(loop.first, loop.last) for loop in sass.find_loops(kernel)] == [(1, 9), (2, 4), (5, 8), (11, 11)]
    loop = sass.state_loop(kernel)
    assert (loop.first, loop.last) == (2, 4)
    assert kernel.code[loop.last].source == ("selective_scan.cu", 7)
    assert sass.count(kernel, loop, {"BAR"}) == 1 and sass.count(kernel, loop, sass.KINDS["MUFU"]) == 1


def test_kernel_names_lose_their_scopes():
    assert sass._strip_scope("void ns::(anonymous namespace)::forward_kernel<float, true>(ns::Args<float>)") == (
        "forward_kernel<float, true>"
    )


@needs_nvcc
@pytest.mark.skipif(
    sass.find_tool("nvdisasm") is None or sass.find_tool("cuobjdump") is None,
    reason="no nvdisasm or cuobjdump: pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump (the test extra)",
)
def test_cuda_sass_script_counts_every_kernel(compiled, capsys):
    """`python -m minijamba.bench sass --cubin` on the sm_90 code of the object above: a count for every forward
    and backward kernel, each from a loop of selective_scan.cu."""
    output, resources, _ = compiled
    counts = bench_main.main(["sass", "--cubin", str(output), "--arch", "9.0"])
    table = capsys.readouterr().out
    print(table)
    names = sass.short_names(sorted({r.kernel for r in resources if r.arch == "sm_90"}))
    scan_kernels = {n for n in names.values() if "forward" in n or "backward" in n}
    assert {c.kernel for c in counts} == scan_kernels
    for c in counts:
        assert c.instructions > 0 and c.closes_at[0] == "selective_scan.cu", c
        assert c.per_step_state == c.instructions / fused.kernel_constants()["kCudaItems"]
        assert c.kinds["BAR"] >= 1 and c.kernel in table
