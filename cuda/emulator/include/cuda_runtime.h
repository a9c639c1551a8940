// The device side of CUDA for the emulator: what a kernel written for nvcc uses, as host C++.
//
// A .cu compiled under the emulator includes this instead of CUDA's cuda_runtime.h (include/ comes first on the
// include path) and runs its kernels on fibers, one per CUDA thread (../cuda_emulator.h says how, what it
// refuses and what it cannot check). THE supported subset (outside it, a kernel may not compile here, or may
// run with the host's meaning: printf prints, assert aborts the process):
//   qualifiers   __global__ __device__ __host__ __forceinline__ __launch_bounds__(threads[, blocks])
//                __restrict__ __align__(n); __shared__ with a size known at compile time (a function-local
//                static here; `extern __shared__` dynamic shared memory is NOT supported: the launch's
//                shared_bytes is only checked against the 48 KiB limit)
//   built-ins    threadIdx blockIdx blockDim gridDim (.x .y .z) warpSize
//   launches     MJ_LAUNCH(grid, block, shared_bytes, stream, kernel)(arguments...) for kernel<<<...>>>(...)
//   barriers     __syncthreads() __syncwarp(mask = all 32 lanes)
//   shuffles     __shfl_sync __shfl_up_sync __shfl_down_sync __shfl_xor_sync (mask, var, lane, width = 32)
//                for 32- and 64-bit integers, float and double; the mask must be all 32 lanes
//   atomics      atomicAdd on float, double, int, unsigned int, unsigned long long (returns the old value)
//   loads        __ldg(pointer)
//   types        dim3 uint3 float2 float4 double2 int2 int4 uint2 uint4 (CUDA's alignments), make_float2,
//                make_float4, make_double2, make_int2, make_int4, make_uint2, make_uint4 (vector_types.h);
//                __half (cuda_fp16.h) and __nv_bfloat16 (cuda_bf16.h) as 16-bit storage, converted explicitly:
//                __float2half_rn __half2float __float2bfloat16_rn __bfloat162float (and without _rn), and
//                __half_as_ushort __ushort_as_half __bfloat16_as_ushort __ushort_as_bfloat16 for the bits
//   maths        the C library's (expf exp2f log1pf ...); __expf __logf __fdividef as the accurate versions;
//                min and max for int, unsigned, long, long long (and unsigned), float, double
// Declare __shared__ variables in the kernel's body: those are the ones the emulator finds and fills with NaN
// before each block (shared_memory.h). A __device__ function's own __shared__ variables work (one per block) but
// keep what the block before left there.
//
// __CUDACC__ is defined at the end (after the standard headers this includes), so that headers shared with nvcc,
// such as cuda/scan_op.h, take their device path. __CUDA_ARCH__ is not: the emulator is no particular GPU.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../cuda_emulator.h"
#include "cuda_runtime_api.h"
#include "vector_types.h"

#pragma GCC visibility push(hidden)  // as in cuda_runtime_api.h: each shared library keeps its own emulator

// Qualifiers. Device and host code are the same code here; the launch bounds are an nvcc register hint.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One copy per block, because blocks run one at a time; refilled with NaN bytes before each block.
#define __shared__ static

// The built-in variables, read-only as in CUDA. threadIdx follows the running fiber.
#define threadIdx (*::mj_emu::detail::thread_idx)
#define blockIdx (static_cast<const ::uint3&>(::mj_emu::detail::block_idx))
#define blockDim (static_cast<const ::dim3&>(::mj_emu::detail::block_dim))
#define gridDim (static_cast<const ::dim3&>(::mj_emu::detail::grid_dim))
constexpr int warpSize = 32;

// The source line of each call comes from default arguments: __builtin_FILE() and __builtin_LINE() are evaluated
// where the function is called, so a refusal can say which line of the kernel the threads were on.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::mj_emu::detail::syncthreads({file, line});
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::mj_emu::detail::syncwarp(mask, {file, line});
}

namespace mj_emu {
namespace detail {

template <typename T>
constexpr bool is_shuffle_type = (std::is_integral_v<T> || std::is_floating_point_v<T>) &&
                                 (sizeof(T) == 4 || sizeof(T) == 8);

// A register's bits, for the scheduler to pass between lanes whatever the type.
template <typename T>
T shuffled(ShuffleMode mode, unsigned mask, T var, unsigned lane_arg, int width, Site site) {
  static_assert(is_shuffle_type<T>, "shuffles take 32- or 64-bit integers, float or double");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof var);
  bits = shuffle(mode, mask, bits, lane_arg, width, site);
  std::memcpy(&var, &bits, sizeof var);
  return var;
}

}  // namespace detail
}  // namespace mj_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return ::mj_emu::detail::shuffled(::mj_emu::detail::ShuffleMode::idx, mask, var, srcLane, width, {file, line});
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::mj_emu::detail::shuffled(::mj_emu::detail::ShuffleMode::up, mask, var, delta, width, {file, line});
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::mj_emu::detail::shuffled(::mj_emu::detail::ShuffleMode::down, mask, var, delta, width, {file, line});
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::mj_emu::detail::shuffled(::mj_emu::detail::ShuffleMode::bfly, mask, var, laneMask, width, {file, line});
}

// Atomic by construction: a fiber is never interrupted between the read and the write. They return the old value.
inline float atomicAdd(float* address, float value) { return std::exchange(*address, *address + value); }
inline double atomicAdd(double* address, double value) { return std::exchange(*address, *address + value); }
inline int atomicAdd(int* address, int value) { return std::exchange(*address, *address + value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return std::exchange(*address, *address + value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::exchange(*address, *address + value);
}

// A load through the read-only data cache on a GPU; a load here.
template <typename T>
inline T __ldg(const T* address) {
  return *address;
}

// The fast intrinsics are approximations on a GPU; here they are the accurate functions, so a kernel's test
// against a reference does not see the intrinsics' own error.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float x, float y) { return x / y; }

// CUDA's min and max, global overloads as in device code (floats as fminf/fmaxf: a NaN argument loses).
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

namespace mj_emu {
namespace detail {

// `kernel<<<grid, block, shared_bytes, stream>>>(arguments...)`, spelled MJ_LAUNCH(...)(arguments...). As CUDA
// does, the arguments are converted to the kernel's parameter types and copied once, at the launch; every thread
// then calls the kernel with (its own copy of) them.
template <typename... Params>
class KernelCall {
 public:
  KernelCall(const LaunchSite& where, const LaunchConfig& config, void (*kernel)(Params...))
      : where_(where), config_(config), kernel_(kernel) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "a launch passes one argument per kernel parameter");
    static_assert((!std::is_reference_v<Params> && ...), "kernel parameters are passed by value");
    struct Call {
      void (*kernel)(Params...);
      std::tuple<Params...> arguments;
    };
    const Call call{kernel_, std::tuple<Params...>(std::forward<Args>(args)...)};
    const ThreadBody body = [](const void* erased) {
      const Call& c = *static_cast<const Call*>(erased);
      std::apply(c.kernel, c.arguments);
    };
    launch(where_, config_, reinterpret_cast<const void*>(kernel_), body, &call);
  }

 private:
  LaunchSite where_;
  LaunchConfig config_;
  void (*kernel_)(Params...);
};

template <typename... Params>
KernelCall<Params...> kernel_call(const LaunchSite& where, const LaunchConfig& config, void (*kernel)(Params...)) {
  return {where, config, kernel};
}

}  // namespace detail
}  // namespace mj_emu

// The kernel is the variadic tail, so that a template-id with commas (forward_kernel<T, true>) is one argument;
// its text names the kernel in the emulator's messages.
#define MJ_LAUNCH(grid, block, shared_bytes, stream, ...)                                                   \
  ::mj_emu::detail::kernel_call(                                                                            \
      ::mj_emu::detail::LaunchSite{#__VA_ARGS__, {__FILE__, __LINE__}},                                      \
      ::mj_emu::detail::LaunchConfig{::dim3(grid), ::dim3(block), static_cast<size_t>(shared_bytes), (stream)}, \
      __VA_ARGS__)

#pragma GCC visibility pop

// For host code that must know it runs under the emulator (tests set its schedule); kernels never look at it.
#define MJ_CUDA_EMULATOR 1

#ifndef __CUDACC__
#define __CUDACC__
#endif
