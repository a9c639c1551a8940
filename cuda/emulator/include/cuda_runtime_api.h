// The host half of CUDA's runtime API, as far as minijamba's kernels use it, for the emulator (cuda/emulator/).
//
// What host code (cuda/binding.cpp, the launch functions of a .cu) calls: error codes and their strings, the
// stream type, dim3. Host-safe: no device macros, so it can be included after torch's headers. The device side
// (__global__, threadIdx, __syncthreads, ...) is in cuda_runtime.h; the execution model in ../cuda_emulator.h.
//
// As on a GPU, a launch records its error for the calling host thread: cudaGetLastError returns it and resets it
// to cudaSuccess, cudaPeekAtLastError returns it and keeps it. Unlike on a GPU no error is sticky: after a launch
// the emulator refused, the next launch runs normally.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "vector_types.h"

// Hidden: every shared library that links the emulator has its own, so two of them in one process (the scan's
// extension and the tests' kernels) never bind to each other's symbols.
#pragma GCC visibility push(hidden)

// CUDA's numeric values, so that a printed code means the same as on a GPU.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,           // "invalid argument": e.g. more than 48 KiB of shared memory
  cudaErrorInvalidConfiguration = 9,   // "invalid configuration argument": grid or block out of range
  cudaErrorNotSupported = 801,         // what the emulator does not model (a launch from inside a kernel)
  cudaErrorLaunchFailure = 719,        // "unspecified launch failure": the emulator refused the kernel's run
};
typedef enum cudaError cudaError_t;

typedef struct CUstream_st* cudaStream_t;  // the emulator runs every launch to completion: streams are ignored

// The last launch error of this host thread, reset to cudaSuccess.
cudaError_t cudaGetLastError();
// The last launch error of this host thread, kept.
cudaError_t cudaPeekAtLastError();
// CUDA's text for the code; for the code of this thread's most recent failed launch, the emulator's full report
// (the kernel, the source lines, the threads). Valid until this thread's next failed launch.
const char* cudaGetErrorString(cudaError_t error);
// The enumerator's name, "cudaErrorLaunchFailure".
const char* cudaGetErrorName(cudaError_t error);
// Launches complete before they return, so there is nothing to wait for; returns cudaPeekAtLastError().
cudaError_t cudaDeviceSynchronize();

namespace mj_emu {

// The order in which the emulator runs threads and blocks from now on: "forward", "reverse", "random" (seeded:
// every launch replays the same order for the same seed), "warps" or "reverse-warps". See ../cuda_emulator.h.
// An unknown name throws std::invalid_argument naming the valid ones.
void set_schedule(const std::string& name, uint64_t seed = 0);

// The names set_schedule takes.
std::vector<std::string> schedules();

}  // namespace mj_emu
#pragma GCC visibility pop
