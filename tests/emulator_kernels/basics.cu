// Small kernels for tests/test_cuda_emulator.py, each written to show one rule of CUDA's execution model.
//
// Plain CUDA: nvcc compiles this file as it is (the test checks that where nvcc exists), and the emulator runs it
// on the CPU (minijamba.fused.build_emulated). The host functions are extern "C" for ctypes; they take device
// pointers, which under the emulator are ordinary host pointers, and return the launch's cudaError_t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifndef MJ_LAUNCH
#define MJ_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

static_assert(alignof(float4) == 16 && alignof(int4) == 16 && alignof(uint4) == 16, "128-bit vector loads");
static_assert(alignof(float2) == 8 && alignof(int2) == 8 && alignof(uint2) == 8, "64-bit vector loads");
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage types");

namespace {

constexpr unsigned kAll = 0xffffffffu;

// The sum of each block's values: a tree in shared memory, halving the active threads each round. Every round
// reads what other threads wrote in the round before, so it needs the barrier that ends each round.
template <bool kBarriers>
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[1024];
  const unsigned t = threadIdx.x;
  partial[t] = in[blockIdx.x * blockDim.x + t];
  if (kBarriers) __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    if (kBarriers) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

// Inclusive prefix sums of `rounds` rows of blockDim.x values, one block scan per row: within each warp by
// shuffles, then each warp adds the totals of the warps before it, read from shared memory. The second barrier
// keeps the next row's totals from overwriting this row's before every warp has read them.
template <bool kSecondBarrier>
__global__ void block_scans(const int* in, int* out, int rounds) {
  __shared__ int warp_totals[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  for (int r = 0; r < rounds; ++r) {
    int sum = in[r * blockDim.x + t];
    for (int offset = 1; offset < 32; offset *= 2) {
      const int earlier = __shfl_up_sync(kAll, sum, offset);
      if (lane >= offset) sum += earlier;
    }
    if (lane == 31) warp_totals[warp] = sum;
    __syncthreads();
    for (int w = 0; w < warp; ++w) sum += warp_totals[w];
    if (kSecondBarrier) __syncthreads();
    out[r * blockDim.x + t] = sum;
  }
}

// Thread 0 writes a value that every thread then reads. Without the barrier only thread 0's own warp is sure to
// see it: its __syncwarp orders the write before its lanes' reads, not before other warps'.
__global__ void broadcast(float* out, int barrier) {
  __shared__ float value;
  if (threadIdx.x == 0) value = 7.0f;
  if (barrier) __syncthreads();
  __syncwarp();
  out[threadIdx.x] = value;
}

// Shared memory as each block finds it: read first, then written (the next block must find NaN again).
__device__ float read_then_write_helper(const unsigned t) {
  __shared__ float helper[32];  // one per block too, but the emulator finds only the kernel's own to fill
  const float seen = helper[t % 32];
  helper[t % 32] = 1.0f;
  return seen;
}

__global__ void read_before_write(float* floats, double* doubles, int* ints, float* helper_values) {
  __shared__ float f[64];
  __shared__ double d[64];
  __shared__ int i[64];
  const unsigned t = threadIdx.x, at = blockIdx.x * blockDim.x + t;
  floats[at] = f[t], doubles[at] = d[t], ints[at] = i[t];
  helper_values[at] = read_then_write_helper(t);
  __syncthreads();
  f[t] = 1.0f, d[t] = 2.0, i[t] = 3;
}

// Every thread adds into one counter of each type; old_ints[i] is what atomicAdd returned to thread i.
__global__ void atomic_adds(const float* values, float* float_sum, double* double_sum, int* int_sum,
                            unsigned* unsigned_sum, unsigned long long* wide_sum, int* old_ints) {
  const unsigned at = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(float_sum, values[at]);
  atomicAdd(double_sum, static_cast<double>(values[at]));
  old_ints[at] = atomicAdd(int_sum, 1);
  atomicAdd(unsigned_sum, 2u);
  atomicAdd(wide_sum, 3ull);
}

// threadIdx, blockIdx, blockDim, gridDim of every thread, 12 numbers each, at its global linear index.
__global__ void index_variables(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
  const uint3 values[4] = {threadIdx, blockIdx, uint3(blockDim), uint3(gridDim)};
  for (int k = 0; k < 4; ++k) o[3 * k] = values[k].x, o[3 * k + 1] = values[k].y, o[3 * k + 2] = values[k].z;
}

// What each lane receives from one shuffle of `value(lane)`: mode 0 __shfl_sync, 1 up, 2 down, 3 xor.
template <typename T>
__global__ void shuffle_probe(T* out, int mode, int lane_arg, int width) {
  const unsigned t = threadIdx.x;
  const T value = static_cast<T>(3 * t + 1) / static_cast<T>(2);  // distinct; x.5 for the floating types
  T got = value;
  if (mode == 0) got = __shfl_sync(kAll, value, lane_arg, width);
  if (mode == 1) got = __shfl_up_sync(kAll, value, lane_arg, width);
  if (mode == 2) got = __shfl_down_sync(kAll, value, lane_arg, width);
  if (mode == 3) got = __shfl_xor_sync(kAll, value, lane_arg, width);
  out[blockIdx.x * blockDim.x + t] = got;
}

// The order the threads run in: each takes a ticket, meets its warp at a __syncwarp, and takes another.
__global__ void tickets(unsigned* counter, unsigned* first, unsigned* second) {
  const unsigned at = blockIdx.x * blockDim.x + threadIdx.x;
  first[at] = atomicAdd(counter, 1u);
  __syncwarp();
  second[at] = atomicAdd(counter, 1u);
}

// Lanes trade values through shared memory; __syncwarp orders the writes before the reads within the warp.
__global__ void warp_exchange(int* out) {
  __shared__ int slot[1024];
  const unsigned t = threadIdx.x;
  slot[t] = static_cast<int>(10 * t);
  __syncwarp();
  out[t] = slot[t ^ 1u];
}

// Vector loads and stores: each thread reverses the components of one float4 and one int4, and splits a uint4
// into two uint2 and a float4 into two float2.
__global__ void vectors(const float4* in4, float4* out4, const int4* in_int4, int4* out_int4, uint2* halves,
                        const uint4* in_uint4, float2* pairs) {
  const unsigned t = threadIdx.x;
  const float4 v = in4[t];
  out4[t] = make_float4(v.w, v.z, v.y, v.x);
  const int4 w = in_int4[t];
  out_int4[t] = make_int4(w.w, w.z, w.y, w.x);
  const uint4 u = in_uint4[t];
  halves[2 * t] = make_uint2(u.x, u.y), halves[2 * t + 1] = make_uint2(u.z, u.w);
  pairs[2 * t] = make_float2(v.x, v.y), pairs[2 * t + 1] = make_float2(v.z, v.w);
}

// float -> 16 bits -> float, for each of fp16 and bf16: the bits and the value read back.
__global__ void to_16_bits(const float* in, unsigned short* half_bits, float* half_back,
                           unsigned short* bf16_bits, float* bf16_back, int n) {
  const int at = blockIdx.x * blockDim.x + threadIdx.x;
  if (at >= n) return;
  const __half h = __float2half_rn(in[at]);
  const __nv_bfloat16 b = __float2bfloat16_rn(in[at]);
  half_bits[at] = __half_as_ushort(h), half_back[at] = __half2float(h);
  bf16_bits[at] = __bfloat16_as_ushort(b), bf16_back[at] = __bfloat162float(b);
}

// The maths a kernel may call, once each on fixed arguments: checked against Python's.
__global__ void maths(const float* x, float* out, double* out_double, int* out_int) {
  out[0] = expf(x[0]), out[1] = exp2f(x[0]), out[2] = log1pf(x[0]), out[3] = __expf(x[0]);
  out[4] = min(x[0], x[1]), out[5] = max(x[0], x[1]);
  out_double[0] = min(2.5, -1.0), out_double[1] = max(2.5, -1.0);
  out_int[0] = min(-3, 4), out_int[1] = max(-3, 4);
}

}  // namespace

// A kernel with external linkage, a template: its __shared__ variable is found by the kernel's own name.
template <typename T>
__global__ void external_template_kernel(T* out) {
  __shared__ T values[32];
  out[threadIdx.x] = values[threadIdx.x];
  values[threadIdx.x] = T(1);
}

extern "C" {

int run_block_sum(const float* in, float* out, int threads, int blocks, int barriers) {
  if (barriers) MJ_LAUNCH(blocks, threads, 0, nullptr, block_sum<true>)(in, out);
  else MJ_LAUNCH(blocks, threads, 0, nullptr, block_sum<false>)(in, out);
  return cudaGetLastError();
}

int run_block_scans(const int* in, int* out, int threads, int rounds, int second_barrier) {
  if (second_barrier) MJ_LAUNCH(1, threads, 0, nullptr, block_scans<true>)(in, out, rounds);
  else MJ_LAUNCH(1, threads, 0, nullptr, block_scans<false>)(in, out, rounds);
  return cudaGetLastError();
}

int run_broadcast(float* out, int threads, int barrier) {
  MJ_LAUNCH(1, threads, 0, nullptr, broadcast)(out, barrier);
  return cudaGetLastError();
}

int run_read_before_write(float* floats, double* doubles, int* ints, float* helper_values, int blocks) {
  MJ_LAUNCH(blocks, 64, 0, nullptr, read_before_write)(floats, doubles, ints, helper_values);
  return cudaGetLastError();
}

int run_external_template_kernel(double* out) {
  MJ_LAUNCH(1, 32, 0, nullptr, external_template_kernel<double>)(out);
  return cudaGetLastError();
}

int run_atomic_adds(const float* values, float* float_sum, double* double_sum, int* int_sum, unsigned* unsigned_sum,
                    unsigned long long* wide_sum, int* old_ints, int threads, int blocks) {
  MJ_LAUNCH(blocks, threads, 0, nullptr, atomic_adds)(values, float_sum, double_sum, int_sum, unsigned_sum, wide_sum,
                                                       old_ints);
  return cudaGetLastError();
}

// grid and block as (x, y, z) triples; also the way to try launch configurations CUDA rejects.
int run_index_variables(unsigned* out, const unsigned* grid, const unsigned* block, unsigned shared_bytes) {
  MJ_LAUNCH(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), shared_bytes, nullptr,
            index_variables)(out);
  return cudaGetLastError();
}

// type: 0 int, 1 unsigned, 2 float, 3 double, 4 long long.
int run_shuffle_probe(void* out, int type, int mode, int lane_arg, int width, int threads) {
  switch (type) {
    case 0: MJ_LAUNCH(1, threads, 0, nullptr, shuffle_probe<int>)(static_cast<int*>(out), mode, lane_arg, width); break;
    case 1:
      MJ_LAUNCH(1, threads, 0, nullptr, shuffle_probe<unsigned>)(static_cast<unsigned*>(out), mode, lane_arg, width);
      break;
    case 2: MJ_LAUNCH(1, threads, 0, nullptr, shuffle_probe<float>)(static_cast<float*>(out), mode, lane_arg, width);
      break;
    case 3:
      MJ_LAUNCH(1, threads, 0, nullptr, shuffle_probe<double>)(static_cast<double*>(out), mode, lane_arg, width);
      break;
    case 4:
      MJ_LAUNCH(1, threads, 0, nullptr, shuffle_probe<long long>)(static_cast<long long*>(out), mode, lane_arg,
                                                                    width);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

int run_tickets(unsigned* counter, unsigned* first, unsigned* second, int threads, int blocks) {
  MJ_LAUNCH(blocks, threads, 0, nullptr, tickets)(counter, first, second);
  return cudaGetLastError();
}

int run_warp_exchange(int* out, int threads) {
  MJ_LAUNCH(1, threads, 0, nullptr, warp_exchange)(out);
  return cudaGetLastError();
}

int run_vectors(const float4* in4, float4* out4, const int4* in_int4, int4* out_int4, uint2* halves,
                const uint4* in_uint4, float2* pairs, int threads) {
  MJ_LAUNCH(1, threads, 0, nullptr, vectors)(in4, out4, in_int4, out_int4, halves, in_uint4, pairs);
  return cudaGetLastError();
}

int run_to_16_bits(const float* in, unsigned short* half_bits, float* half_back, unsigned short* bf16_bits,
                   float* bf16_back, int n) {
  MJ_LAUNCH((n + 127) / 128, 128, 0, nullptr, to_16_bits)(in, half_bits, half_back, bf16_bits, bf16_back, n);
  return cudaGetLastError();
}

int run_maths(const float* x, float* out, double* out_double, int* out_int) {
  MJ_LAUNCH(1, 32, 0, nullptr, maths)(x, out, out_double, out_int);
  return cudaGetLastError();
}

// The runtime API, for the test's error checks.
int last_error() { return cudaGetLastError(); }
int peek_error() { return cudaPeekAtLastError(); }
const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

#ifdef MJ_CUDA_EMULATOR
}  // extern "C"

#include <cstdio>
#include <stdexcept>

extern "C" {
// 0, or -1 when the name is unknown (then message holds the emulator's explanation).
int set_schedule(const char* name, unsigned long long seed, char* message, int capacity) {
  try {
    mj_emu::set_schedule(name, seed);
    return 0;
  } catch (const std::invalid_argument& error) {
    snprintf(message, capacity, "%s", error.what());
    return -1;
  }
}
#endif

}  // extern "C"
