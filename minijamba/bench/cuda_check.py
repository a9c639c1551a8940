"""python -m minijamba.bench.cuda_check {preflight,build,small,sanitize}: the steps of `make cuda-check` around its
tests and benchmark, for a GPU machine whose Python already has a CUDA torch. Nothing here installs anything.

    preflight  what this Python lacks for the check (a CUDA torch, a visible GPU, nvcc, ninja, the test and
               benchmark packages), and where to get it; exits 1 when anything is missing
    build      builds the CUDA extension (or loads the cached build) and says what it was built for; a build
               that cannot be made is one line saying why, exit status 1
    small      one forward and backward of the CUDA scan per input dtype at a small size, every option on, over
               two chunks and a ragged tail: the case the sanitizers run
    sanitize   `small` under compute-sanitizer's memcheck (out-of-bounds and misaligned accesses), racecheck
               (shared-memory races) and synccheck (barriers misused); skipped, saying so, where it is absent
"""

import argparse
import importlib.util
import subprocess
import sys

import torch

from .. import fused
from ..scan import selective_scan
from .sass import find_tool

# `make cuda-check-deps` installs pytest and hypothesis into build/cuda-check-deps on a machine with a network, for
# one without (built for its Python version, CUDA_DEPS_PYTHON), and `make cuda-check` puts that folder on PYTHONPATH.
CARRY = "`make cuda-check-deps` on a machine with a network fills build/cuda-check-deps: copy that folder here"
INSTALL = "install it into this Python, or carry its wheel"
MODULES = {  # module: (what needs it, how to get it)
    "numpy": ("the reference", INSTALL),
    "pytest": ("the tests", CARRY),
    "hypothesis": ("the tests", CARRY),
    "matplotlib": ("the benchmark, python -m minijamba.bench", INSTALL),
}
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


def preflight():
    """The list of what is missing for `make cuda-check`, each with what to do; empty when nothing is."""
    missing = []
    if torch.version.cuda is None:
        where = f"{sys.executable} has torch {torch.__version__}; `make cuda-check PYTHON=...` names another Python"
        missing.append(f"a CUDA build of torch: {where}")
    elif not torch.cuda.is_available():
        missing.append(f"a GPU: torch {torch.__version__} sees none")
    if find_tool("nvcc") is None:
        missing.append("nvcc, to build the extension: not on PATH, in $CUDA_HOME/bin nor in /usr/local/cuda/bin")
    if importlib.util.find_spec("ninja") is None and find_tool("ninja") is None:
        missing.append("ninja, which torch builds extensions with (pip package ninja)")
    for module, (needed_by, fix) in MODULES.items():
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module}, for {needed_by}: {fix}")
    return missing


def build():
    """The built extension's file; SystemExit with the BuildError's message when it cannot be built."""
    try:
        extension = fused.load("cuda")
    except fused.BuildError as error:
        raise SystemExit(f"make cuda-check: the CUDA extension was not built: {error}") from None
    print(f"built for {fused.cuda_arch_list()} ({torch.cuda.get_device_name()}): {extension.__file__}")
    return extension.__file__


def small_inputs(dtype, L, batch=2, dim=3, N=5, seed=0):
    """Every input of a scan with every option on, selective B and C: u, delta, z, B, C in dtype, the rest in
    float32 for 16-bit dtypes (as the kernels take them), on the GPU, each requiring its gradient."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def rand(*shape, kind=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to("cuda", kind)

    inputs = dict(
        u=rand(batch, dim, L),
        delta=rand(batch, dim, L, scale=0.5, shift=-1),
        A=-torch.rand(dim, N, generator=g, dtype=torch.float64).add(0.5).to("cuda", wide),
        B=rand(batch, N, L),
        C=rand(batch, N, L),
        D=rand(dim, kind=wide),
        z=rand(batch, dim, L),
        delta_bias=rand(dim, kind=wide, scale=0.1),
        initial_state=rand(batch, dim, N, kind=wide),
    )
    return {name: t.requires_grad_() for name, t in inputs.items()}


def small():
    """One forward and backward per dtype; raises where a result is not finite."""
    k = fused.kernel_constants()
    L = 2 * k["kCudaThreads"] * k["kCudaItems"] + 3  # two whole chunks and a tail that is not a multiple of 16 bytes
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        inputs = small_inputs(dtype, L)
        y, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, impl="cuda")
        (y.float().square().sum() + last.sum()).backward()
        torch.cuda.synchronize()
        results = {"y": y, "last state": last, **{f"grad {n}": t.grad for n, t in inputs.items()}}
        bad = [name for name, t in results.items() if not torch.isfinite(t).all()]
        if bad:
            raise SystemExit(f"cuda_check small: {dtype} gave non-finite {', '.join(bad)}")
        print(f"small case, {dtype}, L {L}: forward and backward ran, every result finite")


def sanitize():
    """`small` under each compute-sanitizer tool; exit status 1 when one reports an error."""
    sanitizer = find_tool("compute-sanitizer")
    if sanitizer is None:
        print("compute-sanitizer not on PATH, in $CUDA_HOME/bin nor in /usr/local/cuda/bin: sanitizers SKIPPED")
        return
    failed = []
    for tool in SANITIZER_TOOLS:
        command = [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, "-m", __spec__.name, "small"]
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(tool)
    if failed:
        raise SystemExit(f"compute-sanitizer reported errors: {', '.join(failed)}")
    print(f"compute-sanitizer: {', '.join(SANITIZER_TOOLS)} found nothing")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minijamba.bench.cuda_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("step", choices=["preflight", "build", "small", "sanitize"])
    step = parser.parse_args(argv).step
    if step == "preflight":
        missing = preflight()
        for what in missing:
            print(f"make cuda-check needs {what}")
        if missing:
            raise SystemExit(1)
        print(f"make cuda-check: {sys.executable}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    else:
        {"build": build, "small": small, "sanitize": sanitize}[step]()


if __name__ == "__main__":
    main()
