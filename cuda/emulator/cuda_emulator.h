// CUDA's execution model on a CPU: what the emulator is, what it checks, and what it cannot.
//
// A CUDA kernel is one function run by many threads: a grid of blocks, each block up to 1024 threads that share
// the block's `__shared__` memory and meet at `__syncthreads()`, grouped in warps of 32 lanes that exchange
// registers with `__shfl_*_sync`. The emulator runs the unmodified kernel source, compiled as host C++ (the
// headers of include/ stand in for CUDA's), with those rules:
//
//   * Every thread of a block is a fiber: its own stack and saved registers, all on the one OS thread that
//     launched the kernel (cooperative multitasking: POSIX ucontext could do it; cuda_emulator.cpp switches with
//     a dozen instructions on x86-64, ten times faster). A fiber runs until it reaches a barrier, a warp shuffle
//     or the kernel's end, and only then does another run. A block runs to completion before the next block
//     starts; the launch returns when the last block has finished (launches are synchronous; streams ignored).
//   * __syncthreads() releases when every thread of the block has reached it, from the same line of source.
//     __shfl_*_sync and __syncwarp complete when all 32 lanes of the warp have reached the same one.
//   * threadIdx and blockIdx are per fiber and per block; __shared__ variables are one copy per block (blocks
//     run one at a time), and those declared in the kernel's body are filled with NaN bytes (0xFF) before every
//     block, so that a value read before any thread wrote it shows up as NaN in the output. (The binding fills
//     the kernels' outputs with NaN too, for an element no thread writes.)
//   * The schedule (mj_emu::set_schedule) picks which waiting thread runs next, and the order of the blocks:
//       "forward"  threads in index order, each to its next barrier or shuffle, round and round; blocks in order
//       "reverse"  the same from the last thread down, and the blocks from last to first
//       "random"   a random ready thread each time, blocks in a random order (seeded; each launch replays the
//                  order of its seed, so a failing run can be repeated)
//       "warps"    the lowest-numbered ready thread: one warp runs as far as it can (to a __syncthreads) before
//                  the next one starts; blocks in order
//       "reverse-warps"  the highest-numbered ready thread: the last warp runs as far as it can first; blocks
//                  from last to first
//     A kernel is only correct if it is correct under every order CUDA allows, and these five are different
//     ones: a missing __syncthreads between a write and another warp's read gives a wrong answer under some of
//     them ("warps" catches one between two block scans that the thread-order schedules miss; "reverse-warps"
//     one after thread 0 fills shared memory that every warp reads), and atomicAdd sums in a different order
//     under each.
//
// It refuses, with cudaErrorLaunchFailure and a message naming the kernel, the source line(s) and the threads
// (cudaGetErrorString), what CUDA leaves undefined:
//   * a __syncthreads that some threads reach after others have returned from the kernel, or threads returning
//     while others wait at one;
//   * threads of one block waiting at different __syncthreads (different lines of source);
//   * a shuffle or __syncwarp with a mask other than all 32 lanes, one that lanes of a warp reach from
//     different lines, one in a partial warp (block size not a multiple of 32) or after lanes have returned, or
//     one with a width that is not a power of two up to 32;
//   * a deadlock: every thread not yet returned waits, and nothing can release them (lanes of one warp split
//     between a shuffle and a __syncthreads).
// The warp rules are stricter than CUDA's, which allows partial masks (when every lane named takes part) and
// __syncwarp from different lines: a kernel the emulator accepts is well defined on a GPU, not the converse.
// and, as CUDA does, launch configurations out of range (cudaErrorInvalidConfiguration: a block of 0 or more
// than 1024 threads, blockDim.z > 64, gridDim.y or .z > 65535, gridDim.x > 2^31 - 1, an empty grid) and more than
// 48 KiB of shared memory (cudaErrorInvalidValue). After an error the abandoned fibers are reset, and the next
// launch runs normally.
//
// What it cannot check, and only a GPU (and compute-sanitizer) can:
//   * the memory model: here every write is seen at once by every later read, on a GPU only after a barrier,
//     a fence or an atomic;
//   * races finer than a barrier: threads run whole stretches between barriers one at a time, so a race between
//     two of them comes out in the schedule's order (which the five schedules may or may not expose), never
//     torn or interleaved mid-stretch as on a GPU;
//   * timing, occupancy, registers, bank conflicts, coalescing: nothing here is fast or slow the way a GPU is;
//   * the device's own arithmetic: expf, __expf and friends are the CPU's libm, not the GPU's approximations.
// What it does check, on every machine: the indexing, the scans' logic, where the barriers are, and that nothing
// is read before it is written; and, built with AddressSanitizer and UBSan (make cuda-emulated-asan), every
// access out of bounds, misaligned or of undefined arithmetic.
//
// This header is the interface between the headers of include/ (what kernels see) and cuda_emulator.cpp (the
// scheduler); a kernel never calls mj_emu::detail itself.
#pragma once

#include <cstddef>
#include <cstdint>

#include "include/cuda_runtime_api.h"

#pragma GCC visibility push(hidden)
namespace mj_emu {
namespace detail {

// A line of source, from __builtin_FILE() / __builtin_LINE() default arguments at the call.
struct Site {
  const char* file;
  int line;
};

// Where a launch is written, and the kernel as the MJ_LAUNCH text names it.
struct LaunchSite {
  const char* kernel;
  Site site;
};

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs one thread's share of a launch: calls the kernel with the launch's arguments (cuda_runtime.h).
using ThreadBody = void (*)(const void* call);

// Runs every block of the launch on this OS thread and records its error (cudaGetLastError). kernel is the
// kernel's address, for finding its __shared__ variables (shared_memory.h) and its name.
void launch(const LaunchSite& where, const LaunchConfig& config, const void* kernel, ThreadBody body,
            const void* call);

// The running fiber's threadIdx, and the running block's blockIdx, blockDim, gridDim.
extern const uint3* thread_idx;
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;

void syncthreads(Site site);
void syncwarp(unsigned mask, Site site);

// PTX's four shuffle modes: from lane srcLane, from lane - delta, from lane + delta, from lane ^ laneMask.
enum class ShuffleMode { idx, up, down, bfly };

// The value (its bits, zero-extended) that this lane receives; lane_arg is srcLane, delta or laneMask.
uint64_t shuffle(ShuffleMode mode, unsigned mask, uint64_t bits, unsigned lane_arg, int width, Site site);

}  // namespace detail
}  // namespace mj_emu
#pragma GCC visibility pop
