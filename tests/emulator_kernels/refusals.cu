// Kernels that do what CUDA leaves undefined, one each, for tests/test_cuda_emulator.py: the emulator must refuse
// every one with a message naming the kernel and the line. The test finds the lines by their `// line:` tags.
//
// Plain CUDA, as basics.cu: nvcc compiles it (these are run-time mistakes, not compile errors).
#include <cuda_runtime.h>

#ifndef MJ_LAUNCH
#define MJ_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace {

constexpr unsigned kAll = 0xffffffffu;

// Threads past `active` return early; the others then wait at a barrier the returned ones never reach.
__global__ void barrier_after_return(float* out, int active) {
  if (static_cast<int>(threadIdx.x) >= active) return;
  out[threadIdx.x] = 1.0f;
  __syncthreads();  // line: barrier_after_return
}

// Each half of the block waits at its own barrier: two barriers, neither reached by every thread.
__global__ void different_barriers(float* out) {
  if (threadIdx.x < 64) {
    out[threadIdx.x] = 1.0f;
    __syncthreads();  // line: different_barriers_low
  } else {
    out[threadIdx.x] = 2.0f;
    __syncthreads();  // line: different_barriers_high
  }
}

__global__ void partial_mask(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);  // line: partial_mask
}

// The low and the high half-warp shuffle from different lines.
__global__ void different_shuffles(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_down_sync(kAll, v, 1);  // line: different_shuffles_low
  } else {
    v = __shfl_down_sync(kAll, v, 2);  // line: different_shuffles_high
  }
  out[threadIdx.x] = v;
}

// Launched with a block that is not whole warps.
__global__ void partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(kAll, 1.0f, 1);  // line: partial_warp
}

// Half of each warp waits at a shuffle, the other half at a barrier: each waits for the other, forever.
__global__ void deadlock(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(kAll, v, 1);  // line: deadlock_shuffle
  } else {
    __syncthreads();  // line: deadlock_barrier
  }
  out[threadIdx.x] = v;
}

__global__ void bad_width(float* out) {
  out[threadIdx.x] = __shfl_sync(kAll, 1.0f, 0, 12);  // line: bad_width
}

// Lane 0 returns; the other lanes then shuffle with a full mask.
__global__ void shuffle_after_return(float* out) {
  if (threadIdx.x % 32 == 0) return;
  out[threadIdx.x] = __shfl_sync(kAll, 1.0f, 0);  // line: shuffle_after_return
}

}  // namespace

extern "C" int run_refusal(int which, float* out, int threads) {
  switch (which) {
    case 0: MJ_LAUNCH(1, threads, 0, nullptr, barrier_after_return)(out, threads / 2); break;
    case 1: MJ_LAUNCH(1, threads, 0, nullptr, different_barriers)(out); break;
    case 2: MJ_LAUNCH(1, threads, 0, nullptr, partial_mask)(out); break;
    case 3: MJ_LAUNCH(1, threads, 0, nullptr, different_shuffles)(out); break;
    case 4: MJ_LAUNCH(1, threads, 0, nullptr, partial_warp)(out); break;
    case 5: MJ_LAUNCH(1, threads, 0, nullptr, deadlock)(out); break;
    case 6: MJ_LAUNCH(1, threads, 0, nullptr, bad_width)(out); break;
    case 7: MJ_LAUNCH(1, threads, 0, nullptr, shuffle_after_return)(out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
