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

}  // namespace minijamba

// MINIJAMBA_WITH_CUDA: a GPU build. MINIJAMBA_CUDA_EMULATED: the same kernels on the CPU through cuda/emulator/.
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace minijamba {

// One thread block per (batch, channel): kCudaThreads threads, each owning kCudaItems consecutive steps, so a
// chunk of the sequence is kCudaThreads · kCudaItems steps; the forward saves the state at each chunk start.
constexpr int kCudaThreads = 128;
constexpr int kCudaItems = 4;
constexpr int64_t kCudaChunk = kCudaThreads * kCudaItems;
constexpr int64_t kCudaMaxState = 256;  // the carried states live in shared memory: N <= 256

// Both return the launch's error (cudaSuccess when it was queued); they never synchronize.
template <typename T>
cudaError_t selective_scan_forward_cuda(const ScanArgs<T>& args, cudaStream_t stream);

// grad_A, grad_B, grad_C, grad_D and grad_delta_bias must be zeroed: the kernel adds into them atomically.
template <typename T>
cudaError_t selective_scan_backward_cuda(const ScanArgs<T>& args, cudaStream_t stream);

}  // namespace minijamba
#endif
