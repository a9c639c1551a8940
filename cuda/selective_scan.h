// Entry points of the fused selective scan: the CPU twin (selective_scan_cpu.cpp) and, in a CUDA build, the
// kernels of selective_scan.cu. binding.cpp checks the tensors and fills ScanArgs; these only compute.
#pragma once

#include "scan_op.h"

namespace minijamba {

// The CPU backward keeps (2·chunk + 1)·N numbers per task; the forward saves one state every chunk steps.
constexpr int64_t kCpuChunk = 64;

template <typename T>
void selective_scan_forward_cpu(const ScanArgs<T>& args);

// grad_A, grad_B, grad_C, grad_D and grad_delta_bias hold n_tasks copies each, one per task, to be summed.
template <typename T>
void selective_scan_backward_cpu(const ScanArgs<T>& args, int64_t n_tasks);

// The float32 forward's compute floor: `tasks` tasks in parallel, each `steps` steps of d_state states of its
// unskippable arithmetic; returns a checksum. The benchmark times it (bench/scan.py, compute_floor).
float selective_scan_floor_cpu(int64_t steps, int64_t d_state, int64_t tasks);

}  // namespace minijamba

// MINIJAMBA_WITH_CUDA: a GPU build. MINIJAMBA_CUDA_EMULATED: the same kernels on the CPU through cuda/emulator/.
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED) || defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace minijamba {

// The type a kernel computes in for sequences of type In: 16-bit inputs are widened to float32 as they are read,
// and every sum and state is float32, as in the official kernel; float32 and float64 compute in themselves.
template <typename In>
struct ComputeType {
  using type = In;
};
template <>
struct ComputeType<__half> {
  using type = float;
};
template <>
struct ComputeType<__nv_bfloat16> {
  using type = float;
};
template <typename In>
using compute_t = typename ComputeType<In>::type;

// One thread block per (batch, channel): kCudaThreads threads, each owning kCudaItems consecutive steps, so a
// chunk of the sequence is kCudaThreads · kCudaItems steps; the forward saves the state at each chunk start.
// float64, whose values take two registers each, gives a thread kCudaItemsFloat64 steps and runs the chunk with
// kCudaChunk / kCudaItemsFloat64 threads: the same chunk (selective_scan.cu's Shape).
constexpr int kCudaThreads = 128;
constexpr int kCudaItems = 16;
constexpr int kCudaItemsFloat64 = 8;
constexpr int64_t kCudaChunk = kCudaThreads * kCudaItems;
constexpr int64_t kCudaMaxState = 256;  // the carried states live in shared memory: N <= 256

// Both return the launch's error (cudaSuccess when it was queued); they never synchronize. A time-varying B or C
// (and, in the backward, its gradient buffer) must have rows padded to whole chunks and start 16-byte aligned:
// its MatrixView's n_stride is then the padded row length (binding.cpp's kernel_matrix).
template <typename In>
cudaError_t selective_scan_forward_cuda(const ScanArgs<compute_t<In>, In>& args, cudaStream_t stream);

// The gradients that sum over batch or channels, all in compute_t<In>:
//   grad_A (batch, dim, N), grad_D and grad_delta_bias (batch, dim), and grad_B, grad_C when time-invariant
//   (batch, dim, N): one slot per (batch, channel) block, written once in a fixed order (no zeroing needed); the
//   caller sums them over batch, so these sums are deterministic.
//   grad_B, grad_C selective or grouped (the padded B's, C's shape): summed over a group's channels by atomic
//   adds from every block, so they must be zeroed, and their last bits depend on the order the blocks run in.
template <typename In>
cudaError_t selective_scan_backward_cuda(const ScanArgs<compute_t<In>, In>& args, cudaStream_t stream);

}  // namespace minijamba
#endif
