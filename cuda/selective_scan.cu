// The fused selective scan on a GPU: forward and backward kernels, raw pointers, no torch headers.
//
// Mamba §3.3.2, the hardware-aware algorithm. The scan reads u, delta, z (batch, dim, L) and B, C and writes y:
// O(batch · dim · L) numbers. The states are (batch, dim, L, N), N times more, and a naive scan writes them to
// HBM and reads them back. Here they never leave the chip:
//
//   * One thread block per (batch, channel): blockIdx.x = channel d, blockIdx.y = batch b.
//   * The sequence in chunks of kCudaChunk = kCudaThreads · kCudaItems steps. Thread j owns the kCudaItems
//     consecutive steps j·kCudaItems .. of the chunk, and keeps their u, Δ and partial y in registers.
//   * For each state index n: every thread composes its steps' (a, b) pairs (scan_op.h's combine) into one
//     pair; a block-wide exclusive scan of those pairs (warp shuffles, then the warp totals through shared
//     memory) gives each thread the combined effect of all earlier steps of the chunk; applied to the state
//     carried in from the previous chunk (shared memory), that is the state before the thread's first step,
//     and the thread walks its own steps sequentially, adding C·x into its y values.
//   * The last thread's final state is the carry into the next chunk. The forward also saves the carry at
//     each chunk start (chunk_states), N numbers per chunk: all the backward needs.
//
// The backward walks the chunks from last to first. In each, it recomputes the chunk's states exactly as the
// forward did (from the saved chunk start), then runs the gradient's recurrence backwards through time,
//     gx_t = gp_t · C_t + h_{t+1},   h_t = a_t · gx_t      (h_t: gradient with respect to x_{t-1}),
// which is again a scan of (a_t, a_t · gp_t · C_t) pairs, now from the last thread down: the same block scan
// with the thread order reversed. No O(L · N) storage anywhere. Gradients that sum over channels or batch
// (A, B, C, D, delta_bias) are reduced within a warp and added with atomics; they must start zeroed.
//
// Written to be read and to be obviously correct: one state index at a time, plain shared memory, no cub.
#include <cuda_runtime.h>

#include "selective_scan.h"

// The one launch syntax, behind a macro so that cuda/emulator/ can run these kernels on a CPU (it defines
// MJ_LAUNCH first); under nvcc it is the triple-chevron launch. The kernel goes last: it may hold commas.
#ifndef MJ_LAUNCH
#define MJ_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace minijamba {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = kCudaThreads / kWarp;
constexpr unsigned kAllLanes = 0xffffffffu;
static_assert(kCudaThreads % kWarp == 0, "a block is whole warps");

// The value `offset` places earlier in scan order: lower lanes going forward, higher lanes in reverse.
template <bool kReverse, typename T>
__device__ __forceinline__ T from_earlier_lane(const T value, const int offset) {
  return kReverse ? __shfl_down_sync(kAllLanes, value, offset) : __shfl_up_sync(kAllLanes, value, offset);
}

// Exclusive scan of one Step per thread, in thread order (kReverse: from the last thread to the first): thread
// j gets the composition of the Steps of all threads before it in that order, identity for the first.
// Every thread of the block must call it; warp_totals is kWarps Steps of shared memory.
template <bool kReverse, typename T>
__device__ Step<T> block_exclusive_scan(const Step<T> value, Step<T>* warp_totals) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int rank = kReverse ? kWarp - 1 - lane : lane;  // position within the warp, in scan order
  Step<T> inclusive = value;  // Hillis–Steele across the warp's lanes
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const Step<T> earlier{from_earlier_lane<kReverse>(inclusive.a, offset),
                          from_earlier_lane<kReverse>(inclusive.b, offset)};
    if (rank >= offset) inclusive = combine(earlier, inclusive);
  }
  const Step<T> before{from_earlier_lane<kReverse>(inclusive.a, 1), from_earlier_lane<kReverse>(inclusive.b, 1)};
  const Step<T> exclusive = rank == 0 ? identity_step<T>() : before;
  if (rank == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  Step<T> prefix = identity_step<T>();  // the warps before this one, in scan order
  if (kReverse) {
    for (int w = kWarps - 1; w > warp; --w) prefix = combine(prefix, warp_totals[w]);
  } else {
    for (int w = 0; w < warp; ++w) prefix = combine(prefix, warp_totals[w]);
  }
  __syncthreads();  // warp_totals is free for the next scan
  return combine(prefix, exclusive);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(kAllLanes, value, offset);
  return value;  // in lane 0
}

// Adds the block's sum of `value` to *target: a warp reduction, then one atomic per warp.
template <typename T>
__device__ __forceinline__ void add_block_sum(T* target, const T value) {
  const T sum = warp_sum(value);
  if (threadIdx.x % kWarp == 0) atomicAdd(target, sum);
}

// What one thread knows about its kCudaItems steps of the current chunk.
template <typename T>
struct Items {
  int64_t first;  // this thread's first step
  T u[kCudaItems], dt[kCudaItems];

  __device__ bool valid(const int i, const ScanArgs<T>& p) const { return first + i < p.length; }
};

template <typename T>
__device__ Items<T> load_items(const ScanArgs<T>& p, const int64_t row, const int64_t chunk, const T bias) {
  Items<T> items;
  items.first = chunk * kCudaChunk + threadIdx.x * kCudaItems;
  for (int i = 0; i < kCudaItems; ++i) {
    const bool valid = items.valid(i, p);
    items.u[i] = valid ? p.u[row + items.first + i] : T(0);
    items.dt[i] = valid ? step_size(p.delta[row + items.first + i], bias, p.delta_softplus) : T(0);
  }
  return items;
}

// The (a, b) pairs of state index n for the thread's steps (identity past the end), and their composition.
template <typename T>
__device__ Step<T> item_steps(const ScanArgs<T>& p, const Items<T>& items, const T* B, const T A_n, const int64_t n,
                              Step<T> (&steps)[kCudaItems]) {
  Step<T> total = identity_step<T>();
  for (int i = 0; i < kCudaItems; ++i) {
    const int64_t t = items.first + i;
    steps[i] = identity_step<T>();
    if (items.valid(i, p)) {
      const T B_t = B[n * p.B_view.n_stride + t * p.B_view.t_stride];
      steps[i] = {exp_(items.dt[i] * A_n), items.dt[i] * items.u[i] * B_t};
    }
    total = combine(total, steps[i]);
  }
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads) forward_kernel(const ScanArgs<T> p) {
  __shared__ Step<T> warp_totals[kWarps];
  __shared__ T carry[kCudaMaxState];  // per n: the state before the current chunk
  const int64_t d = blockIdx.x, b = blockIdx.y, N = p.d_state;
  const int64_t row = (b * p.dim + d) * p.length, state = (b * p.dim + d) * N;
  const T *B = p.B + p.B_view.offset(b, d), *C = p.C + p.C_view.offset(b, d);
  const T D = p.D ? p.D[d] : T(0), bias = p.delta_bias ? p.delta_bias[d] : T(0);
  for (int64_t n = threadIdx.x; n < N; n += kCudaThreads) {
    carry[n] = p.initial_state ? p.initial_state[state + n] : T(0);
  }
  __syncthreads();

  for (int64_t c = 0; c < p.n_chunks; ++c) {
    const Items<T> items = load_items(p, row, c, bias);
    T out[kCudaItems];
    for (int i = 0; i < kCudaItems; ++i) out[i] = D * items.u[i];
    if (p.chunk_states) {  // read before any carry changes: the first scan below synchronizes first
      for (int64_t n = threadIdx.x; n < N; n += kCudaThreads) p.chunk_states[state * p.n_chunks + c * N + n] = carry[n];
    }
    for (int64_t n = 0; n < N; ++n) {
      Step<T> steps[kCudaItems];
      const Step<T> total = item_steps(p, items, B, p.A[d * N + n], n, steps);
      const T x_chunk_start = carry[n];  // read before the scan's barrier, written after it
      const Step<T> prefix = block_exclusive_scan<false>(total, warp_totals);
      T x = prefix.a * x_chunk_start + prefix.b;  // the state before this thread's first step
      for (int i = 0; i < kCudaItems; ++i) {
        x = steps[i].a * x + steps[i].b;
        if (items.valid(i, p)) out[i] += C[n * p.C_view.n_stride + (items.first + i) * p.C_view.t_stride] * x;
      }
      if (threadIdx.x == kCudaThreads - 1) carry[n] = x;  // past the end, steps are identities
      __syncthreads();
    }
    for (int i = 0; i < kCudaItems; ++i) {
      if (!items.valid(i, p)) continue;
      const int64_t t = row + items.first + i;
      p.y[t] = p.z ? out[i] * silu(p.z[t]) : out[i];
    }
  }
  for (int64_t n = threadIdx.x; n < N; n += kCudaThreads) p.last_state[state + n] = carry[n];
}

template <typename T>
__global__ void __launch_bounds__(kCudaThreads) backward_kernel(const ScanArgs<T> p) {
  __shared__ Step<T> warp_totals[kWarps];
  __shared__ T h_carry[kCudaMaxState];  // per n: the gradient with respect to the state after the current chunk
  const int64_t d = blockIdx.x, b = blockIdx.y, N = p.d_state;
  const int64_t row = (b * p.dim + d) * p.length, state = (b * p.dim + d) * N;
  const int64_t B_at = p.B_view.offset(b, d), C_at = p.C_view.offset(b, d);
  const T *B = p.B + B_at, *C = p.C + C_at;
  const bool B_invariant = p.B_view.t_stride == 0, C_invariant = p.C_view.t_stride == 0;
  const T D = p.D ? p.D[d] : T(0), bias = p.delta_bias ? p.delta_bias[d] : T(0);
  for (int64_t n = threadIdx.x; n < N; n += kCudaThreads) {
    h_carry[n] = p.grad_last_state ? p.grad_last_state[state + n] : T(0);
  }
  __syncthreads();
  T grad_D = 0, grad_bias = 0;  // this thread's share

  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const Items<T> items = load_items(p, row, c, bias);
    T grad_pre[kCudaItems], pre[kCudaItems], grad_dt[kCudaItems], grad_dt_u[kCudaItems];
    for (int i = 0; i < kCudaItems; ++i) {
      const int64_t t = row + items.first + i;
      const T grad_y = items.valid(i, p) ? p.grad_y[t] : T(0);
      grad_pre[i] = p.z && items.valid(i, p) ? grad_y * silu(p.z[t]) : grad_y;  // zero past the end
      pre[i] = D * items.u[i];
      grad_dt[i] = grad_dt_u[i] = T(0);
    }
    for (int64_t n = 0; n < N; ++n) {
      const T A_n = p.A[d * N + n];
      // Recompute this thread's states of index n, as the forward did.
      Step<T> steps[kCudaItems];
      const Step<T> total = item_steps(p, items, B, A_n, n, steps);
      const Step<T> prefix = block_exclusive_scan<false>(total, warp_totals);
      T x_before[kCudaItems], x_after[kCudaItems], C_t[kCudaItems];
      T x = prefix.a * p.chunk_states[state * p.n_chunks + c * N + n] + prefix.b;
      for (int i = 0; i < kCudaItems; ++i) {
        C_t[i] = items.valid(i, p) ? C[n * p.C_view.n_stride + (items.first + i) * p.C_view.t_stride] : T(0);
        x_before[i] = x;
        x = steps[i].a * x + steps[i].b;
        x_after[i] = x;
        pre[i] += C_t[i] * x;
      }
      // The gradient's recurrence, backwards: h -> a·h + a·gp·C per step, scanned from the last thread down.
      Step<T> reverse_total = identity_step<T>();
      for (int i = kCudaItems - 1; i >= 0; --i) {
        reverse_total = combine(reverse_total, Step<T>{steps[i].a, steps[i].a * grad_pre[i] * C_t[i]});
      }
      const T h_chunk_end = h_carry[n];  // read before the scan's barrier, written after it
      const Step<T> later = block_exclusive_scan<true>(reverse_total, warp_totals);
      T h = later.a * h_chunk_end + later.b;  // gradient with respect to the state after this thread's last step
      T grad_A = 0, grad_B_sum = 0, grad_C_sum = 0;
      for (int i = kCudaItems - 1; i >= 0; --i) {
        if (!items.valid(i, p)) continue;  // identity steps: h passes through unchanged
        const int64_t t = items.first + i;
        const T grad_x = grad_pre[i] * C_t[i] + h;  // gradient with respect to x_t
        const T B_t = B[n * p.B_view.n_stride + t * p.B_view.t_stride];
        const T grad_B = grad_x * items.dt[i] * items.u[i], grad_C = grad_pre[i] * x_after[i];
        if (B_invariant) grad_B_sum += grad_B;
        else atomicAdd(p.grad_B + B_at + n * p.B_view.n_stride + t * p.B_view.t_stride, grad_B);
        if (C_invariant) grad_C_sum += grad_C;
        else atomicAdd(p.grad_C + C_at + n * p.C_view.n_stride + t * p.C_view.t_stride, grad_C);
        grad_dt_u[i] += grad_x * B_t;
        const T grad_exponent = grad_x * x_before[i] * steps[i].a;  // with respect to dt·A
        grad_A += grad_exponent * items.dt[i];
        grad_dt[i] += grad_exponent * A_n;
        h = steps[i].a * grad_x;
      }
      if (threadIdx.x == 0) h_carry[n] = h;  // thread 0 ends at the chunk's first step
      add_block_sum(p.grad_A + d * N + n, grad_A);
      if (B_invariant) add_block_sum(p.grad_B + B_at + n, grad_B_sum);
      if (C_invariant) add_block_sum(p.grad_C + C_at + n, grad_C_sum);
      __syncthreads();
    }
    for (int i = 0; i < kCudaItems; ++i) {
      if (!items.valid(i, p)) continue;
      const int64_t t = row + items.first + i;
      const T grad_s = (grad_dt[i] + grad_dt_u[i] * items.u[i]) * step_size_grad(p.delta[t], bias, p.delta_softplus);
      p.grad_u[t] = grad_pre[i] * D + grad_dt_u[i] * items.dt[i];
      p.grad_delta[t] = grad_s;
      if (p.z) p.grad_z[t] = p.grad_y[t] * pre[i] * silu_grad(p.z[t]);
      grad_D += grad_pre[i] * items.u[i];
      grad_bias += grad_s;
    }
  }
  if (p.grad_initial_state) {
    for (int64_t n = threadIdx.x; n < N; n += kCudaThreads) p.grad_initial_state[state + n] = h_carry[n];
  }
  if (p.grad_D) add_block_sum(p.grad_D + d, grad_D);
  if (p.grad_delta_bias) add_block_sum(p.grad_delta_bias + d, grad_bias);
}

}  // namespace

template <typename T>
cudaError_t selective_scan_forward_cuda(const ScanArgs<T>& args, cudaStream_t stream) {
  MJ_LAUNCH(dim3(args.dim, args.batch), kCudaThreads, 0, stream, forward_kernel<T>)(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t selective_scan_backward_cuda(const ScanArgs<T>& args, cudaStream_t stream) {
  MJ_LAUNCH(dim3(args.dim, args.batch), kCudaThreads, 0, stream, backward_kernel<T>)(args);
  return cudaGetLastError();
}

template cudaError_t selective_scan_forward_cuda<float>(const ScanArgs<float>&, cudaStream_t);
template cudaError_t selective_scan_forward_cuda<double>(const ScanArgs<double>&, cudaStream_t);
template cudaError_t selective_scan_backward_cuda<float>(const ScanArgs<float>&, cudaStream_t);
template cudaError_t selective_scan_backward_cuda<double>(const ScanArgs<double>&, cudaStream_t);

}  // namespace minijamba
