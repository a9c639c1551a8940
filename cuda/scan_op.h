// The maths of the selective scan, written once and shared by the CPU twin and the CUDA kernels.
//
// Mamba §3.3.2 (the hardware-aware algorithm) and Algorithm 2. For one batch element b, channel d and state
// index n the scan is the first-order recurrence
//     x_t = a_t · x_{t-1} + b_t,    a_t = exp(dt_t · A)   (A_bar, ZOH),    b_t = dt_t · B_t · u_t   (Euler),
//     y_t = (Σ_n C_t · x_t + D · u_t) · silu(z_t),       dt_t = softplus(delta_t + delta_bias)   (if asked).
// Step t is the affine map x -> a_t·x + b_t; two steps compose to another,
//     (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2),    identity (1, 0),
// and that associativity is what lets the CUDA kernel scan a chunk in parallel.
//
// Glossary (code name — Mamba paper):  u — x (input);  x — h (state);  delta, dt — Δ;  A, B, C, D — A, B, C, D;
// z — the gate branch;  dim — D (channels);  d_state — N;  length — L.
//
// Every function here is `__host__ __device__` under nvcc and plain `inline` for the C++ compiler, so both
// kernels call the same lines. No torch headers: nvcc compiles the .cu that includes this in about a second.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MJ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MJ_HOST_DEVICE inline
#include "cpu_math.h"
#endif

namespace minijamba {

// exp and log1p by overload, so a template reads one name for float and double on host and device alike. The
// float32 CPU twin takes cpu_math.h's, which vectorize (libm's are calls); float64 keeps libm's everywhere.
#ifdef __CUDACC__
MJ_HOST_DEVICE float exp_(float x) { return expf(x); }
MJ_HOST_DEVICE float log1p_(float x) { return log1pf(x); }
#else
inline float exp_(float x) { return exp_float(x); }
inline float log1p_(float x) { return log1p_float(x); }
#endif
MJ_HOST_DEVICE double exp_(double x) { return exp(x); }
MJ_HOST_DEVICE double log1p_(double x) { return log1p(x); }

// One step x -> a·x + b of the recurrence, or the composition of several.
template <typename T>
struct Step {
  T a, b;
};

template <typename T>
MJ_HOST_DEVICE Step<T> identity_step() {
  return {T(1), T(0)};
}

// first, then second: (a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2). Associative, not commutative.
template <typename T>
MJ_HOST_DEVICE Step<T> combine(Step<T> first, Step<T> second) {
  return {first.a * second.a, second.a * first.b + second.b};
}

// e^-|s|: in (0, 1], so softplus and sigmoid never overflow. Selects, not branches: a loop of them vectorizes.
template <typename T>
MJ_HOST_DEVICE T exp_minus_abs(T s) {
  return exp_(s > T(0) ? -s : s);
}

// log(1 + e^s) = max(s, 0) + log(1 + e^-|s|), exact at every s (the official kernel returns s itself above 20;
// we do not). A NaN s gives NaN.
template <typename T>
MJ_HOST_DEVICE T softplus(T s) {
  return (s > T(0) ? s : T(0)) + log1p_(exp_minus_abs(s));
}

// 1 / (1 + e^-s) = (1 or e^-|s|) / (1 + e^-|s|), without overflow on either side. It is also softplus'(s).
template <typename T>
MJ_HOST_DEVICE T sigmoid(T s) {
  const T e = exp_minus_abs(s);
  return (s >= T(0) ? T(1) : e) / (T(1) + e);
}

template <typename T>
MJ_HOST_DEVICE T silu(T z) {
  return z * sigmoid(z);
}

// d silu / dz = σ(z) · (1 + z · (1 - σ(z))).
template <typename T>
MJ_HOST_DEVICE T silu_grad(T z) {
  const T s = sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

// B or C of one (batch, channel): element (n, t) sits at base[n * n_stride + t * t_stride]. One view covers
// the three layouts the scan accepts:
//     (dim, N)                time-invariant:  base = M + d·N,               n_stride 1, t_stride 0
//     (batch, groups, N, L)   grouped:         base = M + (b·G + d/(dim/G))·N·L, n_stride L, t_stride 1
// (batch, N, L), selective, is the grouped layout with G = 1. The gradient buffers share the layout.
struct MatrixView {
  int64_t batch_stride, group_stride, n_stride, t_stride, channels_per_group;
  int64_t numel;  // of the whole tensor

  MJ_HOST_DEVICE int64_t offset(int64_t b, int64_t d) const {
    return b * batch_stride + (d / channels_per_group) * group_stride;
  }
};

// Everything a forward or backward launch needs: sizes, raw pointers (contiguous), and the options.
// Optional inputs (D, z, delta_bias, initial_state, grad_last_state) are nullptr when absent.
// T is the type every sum and state is computed in; In the type of the sequences u, delta, z, B, C, y and their
// gradients, which the CUDA kernels also take in 16 bits (In = __half or __nv_bfloat16 with T = float, as the
// official kernel does). The CPU twin has In = T.
template <typename T, typename In = T>
struct ScanArgs {
  int64_t batch, dim, length, d_state;
  int64_t chunk;     // steps between saved states: chunk_states[b, d, c] is the state before step c·chunk
  int64_t n_chunks;  // ceil(length / chunk)
  bool delta_softplus;
  MatrixView B_view, C_view;

  const In *u, *delta;
  const T* A;
  const In *B, *C;
  const T* D;
  const In* z;
  const T *delta_bias, *initial_state;
  In* y;                         // output of the forward
  T *last_state, *chunk_states;  // the forward's states; chunk_states nullptr when not saved

  // backward only: incoming gradients and the gradients it writes (gradients of absent inputs are nullptr)
  const In* grad_y;
  const T* grad_last_state;
  In *grad_u, *grad_delta, *grad_z;
  T* grad_initial_state;
  // gradients summed over batch or channels, in T whatever In is: the CPU twin gives each task its own copy (see
  // the .cpp), the CUDA kernels one copy per batch element or one shared copy (see selective_scan.h)
  T *grad_A, *grad_B, *grad_C, *grad_D, *grad_delta_bias;
};

// Δ for one step: delta (+ delta_bias), through softplus if asked.
template <typename T>
MJ_HOST_DEVICE T step_size(T delta, T bias, bool use_softplus) {
  const T s = delta + bias;
  return use_softplus ? softplus(s) : s;
}

// d Δ / d (delta + delta_bias).
template <typename T>
MJ_HOST_DEVICE T step_size_grad(T delta, T bias, bool use_softplus) {
  return use_softplus ? sigmoid(delta + bias) : T(1);
}

}  // namespace minijamba
