"""python -m minijamba.bench sass: SASS instructions per (step, state) in the CUDA kernels' state loops.

The fused scan should be memory-bound (Mamba §3.3.2): per step and state its forward does an exp and a few
multiply-adds, so when a (step, state) costs many more instructions than that, issuing them, not HBM, sets the
kernel's speed. This counts them without a GPU: nvcc compiles cuda/selective_scan.cu for one architecture (sm_90,
H100/H200, by default) with the flags the extension's build uses, nvdisasm (pip package nvidia-cuda-nvdisasm)
prints its machine code, SASS, with source lines, and in each kernel the state loop's instructions are counted.

How it counts:
  * A loop is a backward branch: a branch to a lower address closes a loop that starts there.
  * The state loop (`for n` inside a chunk: the whole chunk, one state index at a time) is the innermost loop
    that holds a block barrier (BAR: the block scan of each state synchronizes); where several do, the one with
    the most exp2 instructions (MUFU.EX2), then the longest. Its backward branch's source line is printed, so
    that a reader can check which loop was found.
  * The count is static: every instruction from the loop's first to its backward branch, once each. That is all
    that one state index costs a thread in a chunk: its items' steps, the block scan (shuffles, shared memory,
    barriers), the carry between chunks, and both sides of every branch inside (the end of the sequence, the last
    thread's carry), though a thread runs only one side. An inner loop counts once however often it runs; code
    the compiler moved out of line (slow paths reached by CALL, fallbacks for divergent shuffles) does not count.
  * Divided by kCudaItems, the steps a thread owns in a chunk: instructions per (step, state), the block scan's
    share spread over the thread's items.
Goals (GOALS): at most 20 instructions per (step, state) in the forward, 45 in the backward.

`python -m minijamba.bench sass --cubin FILE` counts a cubin built elsewhere, or the one for --arch inside an
object file or a built extension (extracted with cuobjdump, pip package nvidia-cuda-cuobjdump); --items gives its
steps per thread where they are not this checkout's kCudaItems. Source lines need a build with -lineinfo.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import fused
from .measure import pos_int

SOURCE = fused.CUDA_DIR / "selective_scan.cu"
GOALS = {"forward": 20, "backward": 45}  # SASS instructions per (step, state)
EM_CUDA = 190  # the ELF machine number of a cubin (an object file that holds one is an x86-64 ELF)


def find_tool(name):
    """The path of a CUDA tool (nvcc, cuobjdump, nvdisasm): on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin,
    or in the bin/ of an installed nvidia-* pip package (nvidia/cu13/bin/...); None when none has it."""
    found = shutil.which(name)
    if found:
        return found
    homes = [Path(os.environ["CUDA_HOME"])] if "CUDA_HOME" in os.environ else []
    candidates = [home / "bin" / name for home in [*homes, Path("/usr/local/cuda")]]
    spec = importlib.util.find_spec("nvidia")
    for package in spec.submodule_search_locations if spec else []:
        candidates += sorted(Path(package).glob(f"*/bin/{name}"))
    return next((str(path) for path in candidates if path.is_file()), None)


def nvcc_command(nvcc, arch_list, output, *extra):
    """nvcc compiling selective_scan.cu to `output` for arch_list (TORCH_CUDA_ARCH_LIST syntax) with the flags of
    the extension's build: torch's COMMON_NVCC_FLAGS (which turn off the __half operators, among others) and
    fused.CUDA_CFLAGS. -lineinfo lets nvdisasm name source lines; it changes no instruction."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = [*COMMON_NVCC_FLAGS, *fused.CUDA_CFLAGS, "-DMINIJAMBA_WITH_CUDA", "-lineinfo"]
    return [nvcc, *flags, *fused.nvcc_arch_flags(arch_list), *extra, str(SOURCE), "-o", str(output)]


@dataclass(frozen=True)
class Resources:
    """What ptxas reported (-Xptxas -v) for one kernel on one architecture."""

    kernel: str  # mangled
    arch: str  # sm_90
    registers: int
    stack_bytes: int
    spill_stores: int  # bytes
    spill_loads: int


def ptxas_resources(log):
    """[Resources] from the output of an nvcc run with -Xptxas -v, one per kernel and architecture."""
    found = []
    for block in log.split("Compiling entry function ")[1:]:
        kernel, arch = re.match(r"'(\w+)' for '(\w+)'", block).groups()
        registers = int(re.search(r"Used (\d+) registers", block)[1])
        memory = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        found.append(Resources(kernel, arch, registers, *map(int, memory.groups())))
    return found


@dataclass(frozen=True)
class Instruction:
    opcode: str  # MUFU.EX2, without its predicate and operands
    text: str  # the whole instruction, as nvdisasm prints it
    source: tuple  # (file name, line) it was compiled from, or () where nvdisasm names none
    target: str  # the label a branch goes to, "" for other instructions


@dataclass
class Kernel:
    code: list  # [Instruction], in address order
    labels: dict  # branch label -> index in code of the instruction it names


def disassemble(cubin, nvdisasm):
    """{mangled kernel name: Kernel} of a cubin, read from `nvdisasm -g` (SASS with source lines)."""
    listing = subprocess.run([nvdisasm, "-g", str(cubin)], capture_output=True, text=True, check=True).stdout
    return parse_listing(listing)


def parse_listing(listing):
    """{mangled kernel name: Kernel} from the text nvdisasm -g prints."""
    kernels, kernel, source = {}, None, ()
    for line in map(str.strip, listing.splitlines()):
        if function := re.fullmatch(r"\.text\.(\w+):", line):
            kernel, source = Kernel([], {}), ()
            kernels[function[1]] = kernel
        elif kernel is None:
            continue  # the file's header
        elif label := re.fullmatch(r"(\.L\w+):", line):
            kernel.labels[label[1]] = len(kernel.code)
        elif where := re.match(r'//## File "([^"]+)", line (\d+)', line):
            source = (Path(where[1]).name, int(where[2]))
        elif instruction := re.match(r"/\*[0-9a-f]+\*/\s+(.*?)\s*;", line):
            text = instruction[1]
            opcode = text.split()[1] if text.startswith("@") else text.split()[0]  # past a predicate, @!P0
            branch = re.search(r"`\((\.L\w+)\)", text) if opcode.startswith("BRA") else None
            kernel.code.append(Instruction(opcode, text, source, branch[1] if branch else ""))
    return kernels


@dataclass(frozen=True)
class Loop:
    first: int  # index of its first instruction (a branch target)
    last: int  # index of its backward branch


def find_loops(kernel):
    """Every loop of a kernel: for each branch target, the furthest backward branch to it."""
    last = {}
    for i, instruction in enumerate(kernel.code):
        head = kernel.labels.get(instruction.target)
        if head is not None and head <= i:
            last[head] = max(last.get(head, i), i)
    return [Loop(head, end) for head, end in sorted(last.items())]


def count(kernel, loop, opcodes):
    """How many instructions of the loop have one of `opcodes`, each an opcode or its start up to a dot (BAR for
    BAR.SYNC.DEFER_BLOCKING)."""
    body = kernel.code[loop.first : loop.last + 1]
    return sum(1 for ins in body if any(ins.opcode == op or ins.opcode.startswith(op + ".") for op in opcodes))


def state_loop(kernel):
    """The kernel's loop over state indices (see the module docstring), or None where no loop holds a barrier."""
    with_barrier = [loop for loop in find_loops(kernel) if count(kernel, loop, {"BAR"})]
    innermost = [
        loop
        for loop in with_barrier
        if not any(o != loop and loop.first <= o.first and o.last <= loop.last for o in with_barrier)
    ]
    return max(innermost, key=lambda loop: (count(kernel, loop, {"MUFU.EX2"}), loop.last - loop.first), default=None)


# What a loop body spends its instructions on.
KINDS = {
    "BAR": {"BAR"},
    "SHFL": {"SHFL"},
    "MUFU": {"MUFU"},  # exp2, reciprocals: the special-function unit
    "global": {"LDG", "STG", "RED", "REDG", "ATOM", "ATOMG"},
    "shared": {"LDS", "STS", "ATOMS"},
}


@dataclass(frozen=True)
class LoopCount:
    kernel: str  # demangled, without namespaces and parameters: forward_kernel<float>
    direction: str  # forward or backward
    instructions: int  # in the state loop; 0 where none was found
    per_step_state: float
    closes_at: tuple  # (file name, line) of the loop's backward branch
    kinds: dict  # KINDS name -> count


def short_names(mangled):
    """{mangled: name<template arguments>}, demangled by c++filt (or cu++filt) without namespaces or parameters."""
    demangler = find_tool("cu++filt") or shutil.which("c++filt")
    if demangler is None:
        return {name: name for name in mangled}
    lines = subprocess.run([demangler], input="\n".join(mangled), capture_output=True, text=True, check=True).stdout
    return {name: _strip_scope(full) for name, full in zip(mangled, lines.splitlines(), strict=True)}


def _strip_scope(demangled):
    """'void ns::(anonymous namespace)::kernel<float, true>(ns::Args<float>)' -> 'kernel<float, true>'."""
    text = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i, char in enumerate(text):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            text = text[:i]  # the parameter list
            break
    qualified, args = (text.split("<", 1) + [""])[:2]
    return qualified.rsplit("::", 1)[-1] + (f"<{args}" if args else "")


def count_state_loops(cubin, items):
    """[LoopCount] for every forward and backward kernel of a cubin, `items` steps per thread and chunk."""
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is None:
        raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm (in the test extra), or a CUDA toolkit")
    kernels = disassemble(cubin, nvdisasm)
    names = short_names(list(kernels))
    counts = []
    for mangled, kernel in kernels.items():
        direction = next((d for d in GOALS if d in names[mangled].split("<")[0]), None)
        if direction is None:
            continue
        loop = state_loop(kernel)
        size = loop.last - loop.first + 1 if loop else 0
        closes_at = kernel.code[loop.last].source if loop else ()
        kinds = {kind: count(kernel, loop, opcodes) if loop else 0 for kind, opcodes in KINDS.items()}
        counts.append(LoopCount(names[mangled], direction, size, size / items, closes_at, kinds))
    return sorted(counts, key=lambda c: (c.direction != "forward", c.kernel))


def build_cubin(directory, arch="9.0"):
    """Compile selective_scan.cu for one architecture into directory/selective_scan.cubin; returns its path."""
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin")
    cubin = Path(directory) / "selective_scan.cubin"
    subprocess.run(nvcc_command(nvcc, arch, cubin, "-cubin"), check=True)
    return cubin


def extract_cubin(binary, directory, arch="9.0"):
    """The cubin for arch: `binary` itself if it is one, else the one cuobjdump extracts from it (an object file,
    a fatbin, a built extension)."""
    with open(binary, "rb") as f:
        if int.from_bytes(f.read(20)[18:20], "little") == EM_CUDA:
            return Path(binary)
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise SystemExit("cuobjdump not found: pip install nvidia-cuda-cuobjdump (in the test extra), or a toolkit")
    sm = "sm_" + arch.replace(".", "")
    subprocess.run(
        [cuobjdump, "-xelf", sm, str(Path(binary).resolve())], cwd=directory, check=True, capture_output=True
    )
    found = sorted(Path(directory).glob(f"*.{sm}.cubin"))
    if not found:
        raise SystemExit(f"{binary} holds no {sm} machine code (cuobjdump -lelf {binary} lists what it holds)")
    return found[0]


def format_table(counts, items, arch):
    """The counts as a table against the goals, and the source line where each state loop closes."""

    def row(kernel, line, size, per, goal, verdict, kinds):
        return f"{kernel:<40} {line:>5} {size:>6} {per:>17} {goal:>6} {verdict:>7} | " + " ".join(
            f"{k:>6}" for k in kinds
        )

    header = row("kernel", "line", "loop", "per (step, state)", "goal", "", KINDS)
    rows = [f"SASS of {SOURCE.name} for sm_{arch.replace('.', '')}: the state loops, {items} items per thread", header]
    rows.append("-" * len(header))
    for c in counts:
        goal = GOALS[c.direction]
        verdict = "no loop" if not c.instructions else ("met" if c.per_step_state <= goal else "missed")
        line = c.closes_at[1] if c.closes_at else ""
        kinds = [c.kinds[k] for k in KINDS]
        rows.append(row(c.kernel, line, c.instructions, f"{c.per_step_state:.1f}", f"<= {goal}", verdict, kinds))
    rows.append("loop: the state loop's instructions, counted statically (python -m pydoc minijamba.bench.sass);")
    rows.append(f"per (step, state) = loop / {items}. BAR, SHFL, MUFU, global, shared: how many of the loop's are")
    rows.append("barriers, warp shuffles, special functions (exp2, reciprocals), global and shared memory accesses.")
    if any(c.closes_at for c in counts):
        rows.append("line: where the loop closes in the source, the `for` over state indices:")
    for file, line in sorted({c.closes_at for c in counts if c.closes_at}):
        path = fused.CUDA_DIR / file
        text = path.read_text().splitlines()[line - 1].strip() if path.is_file() else ""
        rows.append(f"    {file}:{line}: {text}")
    return "\n".join(rows)


def add_arguments(parser):
    parser.add_argument("--cubin", type=Path, help="count this cubin (or the --arch one in this object/extension)")
    parser.add_argument("--arch", default="9.0", help="the architecture to build or extract, X.Y (default 9.0)")
    parser.add_argument("--items", type=pos_int, help="steps per thread (default: kCudaItems of this checkout's cuda/)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a kernel misses its goal")


def run(args):
    items = args.items or fused.kernel_constants()["kCudaItems"]
    with tempfile.TemporaryDirectory() as directory:
        cubin = extract_cubin(args.cubin, directory, args.arch) if args.cubin else build_cubin(directory, args.arch)
        counts = count_state_loops(cubin, items)
    print(format_table(counts, items, args.arch))
    missed = [c.kernel for c in counts if not c.instructions or c.per_step_state > GOALS[c.direction]]
    if args.check and missed:
        raise SystemExit(f"missed the goal: {', '.join(missed)}")
    return counts
