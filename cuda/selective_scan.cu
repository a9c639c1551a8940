// The fused selective scan on a GPU: forward and backward kernels, raw pointers, no torch headers.
//
// Mamba §3.3.2, the hardware-aware algorithm. The scan reads u, delta, z (batch, dim, L) and B, C and writes y:
// O(batch · dim · L) numbers. The states are (batch, dim, L, N), N times more, and a naive scan writes them to
// HBM and reads them back. Here they never leave the chip:
//
//   * One thread block per (batch, channel): blockIdx.x = channel d, blockIdx.y = batch b.
//   * The sequence in chunks of kCudaChunk = 2048 steps. Thread j owns kCudaItems consecutive steps of the chunk
//     and keeps their Δ, Δ·u and partial y in registers; a warp's 32 lanes own 32 · kCudaItems consecutive steps.
//   * For each state index n: every thread composes its steps' (a, b) pairs (scan_op.h's combine) into one
//     pair; a block-wide exclusive scan of those pairs (warp shuffles, then the warp totals through shared
//     memory) gives each thread the combined effect of all earlier steps of the chunk; applied to the state
//     carried in from the previous chunk, that is the state before the thread's first step, and the thread walks
//     its own steps sequentially, adding C·x into its y values.
//   * The last thread's final state is the carry into the next chunk. The forward also saves the carry at
//     each chunk start (chunk_states), N numbers per chunk: all the backward needs.
//
// The backward walks the chunks from last to first. In each, it recomputes the chunk's states exactly as the
// forward did (from the saved chunk start), then runs the gradient's recurrence backwards through time,
//     gx_t = gp_t · C_t + h_{t+1},   h_t = a_t · gx_t      (h_t: gradient with respect to x_{t-1}),
// which is again a scan of (a_t, a_t · gp_t · C_t) pairs, now from the last thread down: the same block scan
// with the thread order reversed. No O(L · N) storage anywhere.
//
// What makes it fast (the official kernel's choices, written out one state index at a time):
//   * Memory: u, delta, z, y, B and C move between global memory and a warp's registers through a WarpTile in
//     shared memory, so that each load or store instruction covers contiguous 16-byte vectors of neighbouring
//     lanes (coalesced) while each lane still computes on consecutive steps.
//   * Arithmetic: e^(Δ·A) is exp2(Δ · A·log2(e)), one hardware instruction, with A scaled once per state.
//   * Synchronization: one __syncthreads per state and chunk (see block scan); everything else is warp-level.
//   * Reductions: the gradients summed over L (A, D, delta_bias, a time-invariant B or C) are reduced inside the
//     block in a fixed order, no atomics, and written once per block: gradcheck gets the same bits every run.
//   * Templates: a time-varying or time-invariant B and C are compile-time choices, so the inner loops carry no
//     branch for them; the options (D, z, delta_bias, softplus) act once per chunk and stay runtime flags.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "selective_scan.h"

// The one launch syntax, behind a macro so that cuda/emulator/ can run these kernels on a CPU (it defines
// MJ_LAUNCH first); under nvcc it is the triple-chevron launch. The kernel goes last: it may hold commas.
#ifndef MJ_LAUNCH
#define MJ_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif

namespace minijamba {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kAllLanes = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;  // e^x = 2^(x · log2(e))

// The block's shape for compute type T. float32 (and 16-bit inputs, computed in float32): kCudaThreads threads of
// kCudaItems steps. A float64 value takes two registers, so float64 takes fewer steps and more threads: the
// chunk, and with it the layout of chunk_states, is kCudaChunk either way.
template <typename T>
struct Shape {
  static constexpr int kItems = sizeof(T) == 8 ? kCudaItemsFloat64 : kCudaItems;
  static constexpr int kThreads = kCudaChunk / kItems;
  static constexpr int kWarps = kThreads / kWarp;
  static constexpr int kWarpSteps = kWarp * kItems;  // the consecutive steps a warp owns
  static constexpr int kPackSize = 16 / sizeof(T);   // steps in one 16-byte Pack<T>
  static constexpr int kPacks = kItems / kPackSize;  // a thread's steps, in Packs
  static_assert(kThreads * kItems == kCudaChunk, "one chunk for every dtype");
  static_assert(kThreads % kWarp == 0 && kItems % kPackSize == 0, "whole warps, whole 16-byte vectors");
};

// ------------------------------------------------------------------------------------------ element types

// Reading and writing the sequences: In (float, double, __half or __nv_bfloat16) to the compute type and back.
__device__ __forceinline__ float widen(const float x) { return x; }
__device__ __forceinline__ double widen(const double x) { return x; }
__device__ __forceinline__ float widen(const __half x) { return __half2float(x); }
__device__ __forceinline__ float widen(const __nv_bfloat16 x) { return __bfloat162float(x); }

template <typename In>
__device__ __forceinline__ In narrow(const compute_t<In> x) {
  if constexpr (std::is_same_v<In, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<In, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// 2^x. For float32 on the GPU, the hardware's instruction itself (PTX ex2.approx.ftz, at most 2 ulp from 2^x):
// exp2f adds four instructions around it to return results below 2^-126 as subnormals, and here those are decays
// under 1e-38, which this one flushes to 0. The emulator, compiling host code, takes exp2f.
__device__ __forceinline__ float exp2_(const float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}
__device__ __forceinline__ double exp2_(const double x) { return exp2(x); }

// 16 bytes of X: one load or store instruction for a lane (LDG.128 / STS.128), 4 floats or 8 halves.
template <typename X>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(X);
  X v[kSize];
};

template <typename X>
__device__ __forceinline__ bool is_aligned(const X* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
}

// ---------------------------------------------------------------------------------- moving the sequences

// The slow paths below (a sequence that is not 16-byte aligned) stay loops: unrolled kItems times, they hold
// registers the kernels are short of, for code that rarely runs. Only nvcc's device pass knows the pragma.
#ifdef __CUDA_ARCH__
#define MJ_KEEP_ROLLED _Pragma("unroll 1")
#else
#define MJ_KEEP_ROLLED
#endif

// One warp's kWarpSteps consecutive steps of one sequence, in shared memory, as 16-byte vectors. Global memory
// is fastest when the 32 lanes of an instruction touch one contiguous run ("striped": lane l takes vectors l,
// l + 32, ...); the scan wants lane l to hold kItems consecutive steps ("blocked"). A load goes global ->
// striped -> tile -> blocked -> registers, a store the other way. Shared memory serves 8 lanes' 16-byte vectors
// at once when they fall in 8 different 16-byte bank groups; one padding vector after every 8 makes that true
// for both ways of indexing (vector v lives at v + v / 8).
template <typename T, typename S>
struct WarpTile {
  static constexpr int kVectors = S::kWarpSteps / S::kPackSize;
  Pack<T> vectors[kVectors + kVectors / 8];

  __device__ static int padded(const int v) { return v + v / 8; }  // where vector v lives
  __device__ T& step(const int s) { return vectors[padded(s / S::kPackSize)].v[s % S::kPackSize]; }
  // Step k · 32 + lane, the lane's k-th in striped order: its vector k · 32 / kPackSize + lane / kPackSize
  // lives at padded(k · 32 / kPackSize) + padded(lane / kPackSize), since the first term is a multiple of 8.
  __device__ T& striped_step(const int k) {
    static_assert(kWarp / S::kPackSize % 8 == 0, "a row of 32 steps is whole groups of 8 vectors");
    const int lane = threadIdx.x % kWarp;
    return vectors[padded(k * kWarp / S::kPackSize) + padded(lane / S::kPackSize)].v[lane % S::kPackSize];
  }
};

// This lane's k-th Pack of its own steps (blocked): vector lane · kPacks + k, which lives at
// padded(lane · kPacks) + k, as a lane's kPacks vectors never straddle a padding vector.
template <typename T, typename S>
__device__ __forceinline__ Pack<T>& lane_pack(WarpTile<T, S>& tile, const int k) {
  static_assert(8 % S::kPacks == 0, "a lane's vectors never straddle a padding vector");
  return tile.vectors[WarpTile<T, S>::padded(threadIdx.x % kWarp * S::kPacks) + k];
}

// Steps [0, kWarpSteps) of a warp's run `source` into the tile, zero from step `valid` on. vectors: the run
// starts 16-byte aligned and `valid` is a whole number of 16-byte vectors, so it moves in 16-byte loads. Every
// lane calls it; the __syncwarp()s order the tile's reuse (every lane has read the last contents; every lane's
// writes are in when it returns).
template <typename S, typename T, typename In>
__device__ void fill_tile(const In* source, const int valid, const bool vectors, WarpTile<T, S>& tile) {
  constexpr int kWiden = sizeof(T) / sizeof(In);  // tile vectors per loaded vector: 1, or 2 for 16-bit inputs
  const int lane = threadIdx.x % kWarp;
  __syncwarp();
  if (vectors) {
    // Loaded vector v = k · 32 + lane is tile vector v · kWiden (+ 1), at 36 · kWiden · k + padded(lane · kWiden).
    const int lane_slot = WarpTile<T, S>::padded(lane * kWiden);
    for (int k = 0; k < S::kWarpSteps / Pack<In>::kSize / kWarp; ++k) {
      const int v = k * kWarp + lane;
      const Pack<In> loaded = v * Pack<In>::kSize < valid ? reinterpret_cast<const Pack<In>*>(source)[v] : Pack<In>{};
      for (int h = 0; h < kWiden; ++h) {
        Pack<T> wide;
        for (int j = 0; j < S::kPackSize; ++j) wide.v[j] = widen(loaded.v[h * S::kPackSize + j]);
        tile.vectors[WarpTile<T, S>::padded(k * kWarp * kWiden) + lane_slot + h] = wide;
      }
    }
  } else {  // a sequence that is not 16-byte aligned: one element per lane and load, still contiguous
    MJ_KEEP_ROLLED
    for (int s = lane; s < S::kWarpSteps; s += kWarp) tile.step(s) = s < valid ? widen(source[s]) : T(0);
  }
  __syncwarp();
}

// A warp's run of a sequence into the lane's `items`, through the tile.
template <typename S, typename T, typename In>
__device__ void load_run(const In* source, const int valid, const bool vectors, WarpTile<T, S>& tile,
                         T (&items)[S::kItems]) {
  fill_tile(source, valid, vectors, tile);
  for (int k = 0; k < S::kPacks; ++k) {
    const Pack<T> pack = lane_pack(tile, k);
    for (int j = 0; j < S::kPackSize; ++j) items[k * S::kPackSize + j] = pack.v[j];
  }
}

// The reverse of load_run: the lane's `items` to steps [0, valid) of the warp's run `target`.
template <typename S, typename T, typename Out>
__device__ void store_run(const T (&items)[S::kItems], WarpTile<T, S>& tile, Out* target, const int valid,
                          const bool vectors) {
  constexpr int kWiden = sizeof(T) / sizeof(Out);
  const int lane = threadIdx.x % kWarp;
  __syncwarp();
  for (int k = 0; k < S::kPacks; ++k) {
    Pack<T>& pack = lane_pack(tile, k);
    for (int j = 0; j < S::kPackSize; ++j) pack.v[j] = items[k * S::kPackSize + j];
  }
  __syncwarp();
  if (vectors) {
    const int lane_slot = WarpTile<T, S>::padded(lane * kWiden);  // as in fill_tile
    for (int k = 0; k < S::kWarpSteps / Pack<Out>::kSize / kWarp; ++k) {
      const int v = k * kWarp + lane;
      Pack<Out> narrowed;
      for (int h = 0; h < kWiden; ++h) {
        const Pack<T> wide = tile.vectors[WarpTile<T, S>::padded(k * kWarp * kWiden) + lane_slot + h];
        for (int j = 0; j < S::kPackSize; ++j) narrowed.v[h * S::kPackSize + j] = narrow<Out>(wide.v[j]);
      }
      if (v * Pack<Out>::kSize < valid) reinterpret_cast<Pack<Out>*>(target)[v] = narrowed;
    }
  } else {
    MJ_KEEP_ROLLED
    for (int s = lane; s < valid; s += kWarp) target[s] = narrow<Out>(tile.step(s));
  }
}

// Adds the tile, which every lane has filled with its own steps' values (lane_pack), into the warp's run of
// `target` (padded to whole chunks, like B and C), which other blocks add into too: the gradient of a B or C
// shared by a group of channels. The 32 atomics of one instruction go to 32 neighbouring floats. The order in
// which blocks add is the GPU's choice: these sums are the one part of the backward whose last bits can change
// from run to run.
template <typename S, typename T>
__device__ void add_tile(WarpTile<T, S>& tile, T* target) {
  T* const lane_target = target + threadIdx.x % kWarp;
  __syncwarp();
  for (int k = 0; k < S::kItems; ++k) atomicAdd(lane_target + k * kWarp, tile.striped_step(k));
}

// ------------------------------------------------------------------------------------------ block scan

// The block scan of one state index runs in two halves around one __syncthreads:
//   before: each warp scans its lanes' pairs with shuffles (warp_scan), and its last lane in scan order
//           writes the warp's total to shared memory;
//   after:  each thread folds the totals of the warps before it, then its own lanes' (value_entering).
// One barrier per state and chunk is enough because the totals are double-buffered: scan k writes half k % 2,
// and the next write to that half (scan k + 2) comes after barrier k + 1, which no thread passes before it has
// finished reading scan k's totals. The carried states are double-buffered by chunk in the same way.

// The value `offset` places earlier in scan order: lower lanes going forward, higher lanes in reverse.
template <bool kReverse, typename T>
__device__ __forceinline__ T from_earlier_lane(const T value, const int offset) {
  return kReverse ? __shfl_down_sync(kAllLanes, value, offset) : __shfl_up_sync(kAllLanes, value, offset);
}

template <bool kReverse>
__device__ __forceinline__ int rank_in_warp() {  // position within the warp, in scan order
  const int lane = threadIdx.x % kWarp;
  return kReverse ? kWarp - 1 - lane : lane;
}

// Inclusive scan of one Step per lane across the warp (Hillis–Steele: round k combines with the lane 2^k
// earlier); the warp's total goes to warp_totals[warp].
template <bool kReverse, typename T>
__device__ Step<T> warp_scan(Step<T> value, Step<T>* warp_totals) {
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const Step<T> earlier{from_earlier_lane<kReverse>(value.a, offset), from_earlier_lane<kReverse>(value.b, offset)};
    if (rank_in_warp<kReverse>() >= offset) value = combine(earlier, value);
  }
  if (rank_in_warp<kReverse>() == kWarp - 1) warp_totals[threadIdx.x / kWarp] = value;
  return value;
}

// After the barrier: the value entering this thread's steps, given `start`, the value entering the chunk
// (in scan order), the warps' totals and this lane's inclusive scan.
template <bool kReverse, int kWarps, typename T>
__device__ T value_entering(const Step<T> inclusive, const Step<T>* warp_totals, T start) {
  const int warp = threadIdx.x / kWarp;
  for (int k = 0; k < kWarps - 1; ++k) {  // the warps before this one, in scan order
    const int w = kReverse ? kWarps - 1 - k : k;
    if (kReverse ? w > warp : w < warp) start = warp_totals[w].a * start + warp_totals[w].b;
  }
  const T leaving = inclusive.a * start + inclusive.b;  // the value after this lane's steps
  const T from_earlier = from_earlier_lane<kReverse>(leaving, 1);
  return rank_in_warp<kReverse>() == 0 ? start : from_earlier;
}

// The exact sum over a warp (a tree of shuffles, the same order every run); in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(kAllLanes, value, offset);
  return value;
}

// ---------------------------------------------------------------------------------------------- kernels

// Where a block's warp works in the current chunk: its run of the sequence starts at step `first` of the row;
// `valid` of its kWarpSteps steps lie inside the sequence (none, for a warp past the end of a short one).
template <typename S>
struct Run {
  int64_t first;
  int valid;

  __device__ Run(const int64_t chunk, const int64_t length) {
    first = chunk * kCudaChunk + threadIdx.x / kWarp * S::kWarpSteps;
    const int64_t left = length - first;
    valid = left <= 0 ? 0 : left >= S::kWarpSteps ? S::kWarpSteps : static_cast<int>(left);
  }
  __device__ bool inside(const int i) const { return threadIdx.x % kWarp * S::kItems + i < valid; }
};

// The per-chunk values every state index uses: Δ_t and Δ_t·u_t. Past the end Δ = 0: a = e^0 = 1 and b = 0
// there, the identity step, so no loop below needs to know where the sequence ends.
template <typename S, typename T>
struct ChunkSteps {
  T dt[S::kItems], dt_u[S::kItems];
};

template <typename S, typename T, typename In>
__device__ ChunkSteps<S, T> chunk_steps(const ScanArgs<T, In>& p, const Run<S>& run, const T (&u)[S::kItems],
                                        const T (&delta)[S::kItems], const T bias) {
  ChunkSteps<S, T> steps;
  for (int i = 0; i < S::kItems; ++i) {
    steps.dt[i] = run.inside(i) ? step_size(delta[i], bias, p.delta_softplus) : T(0);
    steps.dt_u[i] = steps.dt[i] * u[i];
  }
  return steps;
}

// B or C of one state at the warp's run, from M, where that run starts: a time-varying one (kVariable) is loaded
// into the warp's tile, for matrix_pack to read; a time-invariant one is the one value returned. A time-varying
// B or C comes padded with zeros to whole chunks and 16-byte aligned (binding.cpp), so every run is whole: no
// bounds to check in the state loop.
template <bool kVariable, typename S, typename T, typename In>
__device__ T load_matrix(const In* M, WarpTile<T, S>& tile) {
  if constexpr (kVariable) {
    fill_tile(M, S::kWarpSteps, true, tile);
    return T(0);
  } else {
    return widen(*M);
  }
}

// B or C at the lane's k-th Pack of steps, from load_matrix's tile or value.
template <bool kVariable, typename S, typename T>
__device__ __forceinline__ Pack<T> matrix_pack(WarpTile<T, S>& tile, const int k, const T value) {
  if constexpr (kVariable) {
    return lane_pack(tile, k);
  } else {
    Pack<T> pack;
    for (int j = 0; j < S::kPackSize; ++j) pack.v[j] = value;
    return pack;
  }
}

// Whether the (batch, dim, L) sequences start 16-byte aligned, and L is a whole number of 16-byte vectors, so
// that every row starts aligned too: then they move as 16-byte vectors.
template <typename T, typename In>
__device__ bool sequences_aligned(const ScanArgs<T, In>& p) {
  return p.length % Pack<In>::kSize == 0 && is_aligned(p.u) && is_aligned(p.delta) && is_aligned(p.z) &&
         is_aligned(p.y) && is_aligned(p.grad_y) && is_aligned(p.grad_u) && is_aligned(p.grad_delta) &&
         is_aligned(p.grad_z);
}

// The kernels. __launch_bounds__(threads, 1): one block per multiprocessor is enough, which lets ptxas give a
// thread all the registers it needs (up to 255); told only the block size, nvcc 13 caps some of these kernels at
// 96 or 128 registers and spills to memory instead.
template <typename In, bool kVariableB, bool kVariableC, typename T = compute_t<In>, typename S = Shape<T>>
__global__ void __launch_bounds__(S::kThreads, 1) forward_kernel(const ScanArgs<T, In> p) {
  // Per warp: B's run (also u's, delta's, z's and y's) and C's; one when a single sequence varies per state.
  constexpr int kTiles = kVariableB && kVariableC ? 2 : 1;
  __shared__ WarpTile<T, S> tiles[S::kWarps][kTiles];
  __shared__ Step<T> warp_totals[2][S::kWarps];  // by scan parity
  __shared__ T carry[2][kCudaMaxState];          // by chunk parity: per n, the state before the chunk
  __shared__ T A[kCudaMaxState];                 // this channel's A
  WarpTile<T, S>& B_tile = tiles[threadIdx.x / kWarp][0];
  WarpTile<T, S>& C_tile = tiles[threadIdx.x / kWarp][kTiles - 1];
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int N = static_cast<int>(p.d_state);  // at most kCudaMaxState: binding.cpp checks
  const int64_t row = (b * p.dim + d) * p.length, state = (b * p.dim + d) * N;
  const int64_t B_at = p.B_view.offset(b, d), C_at = p.C_view.offset(b, d);
  const T D = p.D ? p.D[d] : T(0), bias = p.delta_bias ? p.delta_bias[d] : T(0);
  const bool vectors = sequences_aligned(p);
  const bool last_thread = threadIdx.x == S::kThreads - 1;
  for (int n = threadIdx.x; n < N; n += S::kThreads) {
    A[n] = p.A[d * N + n];
    carry[0][n] = p.initial_state ? p.initial_state[state + n] : T(0);
  }
  __syncthreads();

  int parity = 0;  // which half of warp_totals the next scan uses
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    if (p.chunk_states) {  // save the carry in: the last thread wrote it after the previous chunk's last barrier
      if (c > 0) __syncthreads();
      for (int n = threadIdx.x; n < N; n += S::kThreads) {
        p.chunk_states[state * p.n_chunks + c * N + n] = carry[c % 2][n];
      }
    }
    const Run<S> run(c, p.length);
    T u[S::kItems], delta[S::kItems], out[S::kItems];
    load_run(p.u + row + run.first, run.valid, vectors, B_tile, u);
    load_run(p.delta + row + run.first, run.valid, vectors, B_tile, delta);
    const ChunkSteps<S, T> steps = chunk_steps(p, run, u, delta, bias);
    for (int i = 0; i < S::kItems; ++i) out[i] = D * u[i];
    // Where the warp's run of B and C for state 0 starts (at B's start, for a time-invariant one: t_stride 0).
    const int64_t B_run = B_at + run.first * p.B_view.t_stride, C_run = C_at + run.first * p.C_view.t_stride;

    for (int n = 0; n < N; ++n) {
      const T A_log2 = A[n] * T(kLog2e);
      const T B_n = load_matrix<kVariableB>(p.B + B_run + n * p.B_view.n_stride, B_tile);
      const T C_n = load_matrix<kVariableC>(p.C + C_run + n * p.C_view.n_stride, C_tile);
      // This thread's steps, and their composition (scan_op.h's combine, written out).
      T a[S::kItems], b_t[S::kItems];
      Step<T> total = identity_step<T>();
      for (int k = 0; k < S::kPacks; ++k) {
        const Pack<T> B_t = matrix_pack<kVariableB>(B_tile, k, B_n);
        for (int j = 0; j < S::kPackSize; ++j) {
          const int i = k * S::kPackSize + j;
          a[i] = exp2_(A_log2 * steps.dt[i]);
          b_t[i] = steps.dt_u[i] * B_t.v[j];
          total = {total.a * a[i], a[i] * total.b + b_t[i]};
        }
      }
      const Step<T> inclusive = warp_scan<false>(total, warp_totals[parity]);
      __syncthreads();
      T x = value_entering<false, S::kWarps>(inclusive, warp_totals[parity], carry[c % 2][n]);
      for (int k = 0; k < S::kPacks; ++k) {
        const Pack<T> C_t = matrix_pack<kVariableC>(C_tile, k, C_n);
        for (int j = 0; j < S::kPackSize; ++j) {
          const int i = k * S::kPackSize + j;
          x = a[i] * x + b_t[i];
          out[i] += C_t.v[j] * x;
        }
      }
      if (last_thread) carry[(c + 1) % 2][n] = x;  // past the end the steps are identities: x ends the chunk
      parity ^= 1;
    }
    if (p.z) {
      T z[S::kItems];
      load_run(p.z + row + run.first, run.valid, vectors, B_tile, z);
      for (int i = 0; i < S::kItems; ++i) out[i] *= silu(z[i]);
    }
    store_run(out, B_tile, p.y + row + run.first, run.valid, vectors);
  }
  __syncthreads();  // the last thread's final carry
  for (int n = threadIdx.x; n < N; n += S::kThreads) p.last_state[state + n] = carry[p.n_chunks % 2][n];
}

template <typename In, bool kVariableB, bool kVariableC, typename T = compute_t<In>, typename S = Shape<T>>
__global__ void __launch_bounds__(S::kThreads, 1) backward_kernel(const ScanArgs<T, In> p) {
  constexpr int kTiles = kVariableB && kVariableC ? 2 : 1;
  __shared__ WarpTile<T, S> tiles[S::kWarps][kTiles];
  __shared__ Step<T> warp_totals[2][2][S::kWarps];  // by scan parity, then forward and reverse
  __shared__ T h_carry[2][kCudaMaxState];  // by chunk parity: per n, the gradient of the state after the chunk
  __shared__ T A[kCudaMaxState];           // this channel's A
  // The block's sums over the sequence, per n, of the gradients of A and of a time-invariant B and C: each
  // warp's share of a state's sum goes to warp_sums after the scan, and after the next barrier the state's
  // owner, thread n % kThreads, adds the warps' shares in order: the same order every run.
  __shared__ T warp_sums[2][3][S::kWarps];  // by scan parity
  __shared__ T sum_A[kCudaMaxState], sum_B[kVariableB ? 1 : kCudaMaxState], sum_C[kVariableC ? 1 : kCudaMaxState];
  WarpTile<T, S>& B_tile = tiles[threadIdx.x / kWarp][0];
  WarpTile<T, S>& C_tile = tiles[threadIdx.x / kWarp][kTiles - 1];
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int N = static_cast<int>(p.d_state);  // at most kCudaMaxState: binding.cpp checks
  const int64_t row = (b * p.dim + d) * p.length, state = (b * p.dim + d) * N;
  const int64_t B_at = p.B_view.offset(b, d), C_at = p.C_view.offset(b, d);
  const T D = p.D ? p.D[d] : T(0), bias = p.delta_bias ? p.delta_bias[d] : T(0);
  const bool vectors = sequences_aligned(p);
  for (int n = threadIdx.x; n < N; n += S::kThreads) {
    A[n] = p.A[d * N + n];
    h_carry[(p.n_chunks - 1) % 2][n] = p.grad_last_state ? p.grad_last_state[state + n] : T(0);
    sum_A[n] = 0;
    if (!kVariableB) sum_B[n] = 0;
    if (!kVariableC) sum_C[n] = 0;
  }
  __syncthreads();
  // The owner of state n adds the warps' shares of its sums, once the barrier after they were written is passed.
  const auto add_warp_sums = [&](const int n, const T (&shares)[3][S::kWarps]) {
    for (int w = 0; w < S::kWarps; ++w) {
      sum_A[n] += shares[0][w];
      if (!kVariableB) sum_B[n] += shares[1][w];
      if (!kVariableC) sum_C[n] += shares[2][w];
    }
  };
  T grad_D = 0, grad_bias = 0;  // this thread's shares
  int parity = 0;
  int pending = -1;  // the state whose warp sums wait for the next barrier, if any

  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const Run<S> run(c, p.length);
    ChunkSteps<S, T> steps;
    {
      T u[S::kItems], delta[S::kItems];
      load_run(p.u + row + run.first, run.valid, vectors, B_tile, u);
      load_run(p.delta + row + run.first, run.valid, vectors, B_tile, delta);
      steps = chunk_steps(p, run, u, delta, bias);
    }
    T grad_pre[S::kItems];  // the gradient of the output before the gate, zero past the end
    load_run(p.grad_y + row + run.first, run.valid, vectors, B_tile, grad_pre);
    if (p.z) {
      T z[S::kItems];
      load_run(p.z + row + run.first, run.valid, vectors, B_tile, z);
      for (int i = 0; i < S::kItems; ++i) grad_pre[i] *= silu(z[i]);
    }
    // Summed over n: the readout Σ C·x (the output before the gate is it plus D·u; grad_z needs that), and the
    // gradients with respect to Δ through the decays (grad_dt) and to Δ·u through the drives b = Δ·u·B.
    T readout[S::kItems], grad_dt[S::kItems], grad_dt_u[S::kItems];
    for (int i = 0; i < S::kItems; ++i) readout[i] = grad_dt[i] = grad_dt_u[i] = T(0);
    const T* x_chunk = p.chunk_states + state * p.n_chunks + c * N;  // the states before the chunk
    // As in the forward; the gradients of a time-varying B and C have their layout.
    const int64_t B_run = B_at + run.first * p.B_view.t_stride, C_run = C_at + run.first * p.C_view.t_stride;

    for (int n = 0; n < N; ++n) {
      const T A_n = A[n], A_log2 = A_n * T(kLog2e);
      const int64_t B_n_run = B_run + n * p.B_view.n_stride, C_n_run = C_run + n * p.C_view.n_stride;
      const T B_n = load_matrix<kVariableB>(p.B + B_n_run, B_tile);
      const T C_n = load_matrix<kVariableC>(p.C + C_n_run, C_tile);
      // The thread's totals for both scans: the states' steps (a, Δu·B) composed from its first step up, and
      // the gradient's (a, a·gp·C) from its last step down.
      T a[S::kItems], grad_x[S::kItems];
      Step<T> forward = identity_step<T>(), reverse = identity_step<T>();
      for (int k = 0; k < S::kPacks; ++k) {
        const Pack<T> B_t = matrix_pack<kVariableB>(B_tile, k, B_n), C_t = matrix_pack<kVariableC>(C_tile, k, C_n);
        for (int j = 0; j < S::kPackSize; ++j) {
          const int i = k * S::kPackSize + j;
          a[i] = exp2_(A_log2 * steps.dt[i]);
          forward = {forward.a * a[i], a[i] * forward.b + steps.dt_u[i] * B_t.v[j]};
          grad_x[i] = grad_pre[i] * C_t.v[j];  // the gradient of x_t from y_t; from later steps h comes next
        }
      }
      for (int i = S::kItems - 1; i >= 0; --i) reverse.b = a[i] * (reverse.b + grad_x[i]);
      reverse.a = forward.a;  // the same decays, composed in the other order
      const Step<T> forward_inclusive = warp_scan<false>(forward, warp_totals[parity][0]);
      const Step<T> reverse_inclusive = warp_scan<true>(reverse, warp_totals[parity][1]);
      __syncthreads();
      if (pending >= 0 && threadIdx.x == pending % S::kThreads) add_warp_sums(pending, warp_sums[parity ^ 1]);
      T x = value_entering<false, S::kWarps>(forward_inclusive, warp_totals[parity][0], x_chunk[n]);
      T h = value_entering<true, S::kWarps>(reverse_inclusive, warp_totals[parity][1], h_carry[c % 2][n]);
      for (int i = S::kItems - 1; i >= 0; --i) {  // gx_t = gp_t·C_t + h_{t+1},  h_t = a_t·gx_t
        grad_x[i] += h;
        h = a[i] * grad_x[i];
      }
      if (threadIdx.x == 0) h_carry[(c + 1) % 2][n] = h;  // thread 0 ends before the chunk's first step
      // Recompute the states step by step and collect every gradient that needs x. A time-varying B's or C's
      // gradient replaces the lane's own B or C in the tile, which no other lane reads, and goes out by add_tile.
      T share_A = 0, share_B = 0, share_C = 0;
      for (int k = 0; k < S::kPacks; ++k) {
        const Pack<T> B_t = matrix_pack<kVariableB>(B_tile, k, B_n), C_t = matrix_pack<kVariableC>(C_tile, k, C_n);
        for (int j = 0; j < S::kPackSize; ++j) {
          const int i = k * S::kPackSize + j;
          const T x_before = x;
          x = a[i] * x + steps.dt_u[i] * B_t.v[j];
          readout[i] += C_t.v[j] * x;
          const T grad_exponent = grad_x[i] * a[i] * x_before;  // with respect to Δ·A
          share_A += grad_exponent * steps.dt[i];
          grad_dt[i] += grad_exponent * A_n;
          grad_dt_u[i] += grad_x[i] * B_t.v[j];
          const T grad_B_t = grad_x[i] * steps.dt_u[i], grad_C_t = grad_pre[i] * x;
          if constexpr (kVariableB) lane_pack(B_tile, k).v[j] = grad_B_t;
          if constexpr (kVariableC) lane_pack(C_tile, k).v[j] = grad_C_t;
          share_B += grad_B_t;
          share_C += grad_C_t;
        }
      }
      if constexpr (kVariableB) add_tile(B_tile, p.grad_B + B_n_run);
      if constexpr (kVariableC) add_tile(C_tile, p.grad_C + C_n_run);
      const T shares[3] = {warp_sum(share_A), kVariableB ? T(0) : warp_sum(share_B),
                           kVariableC ? T(0) : warp_sum(share_C)};
      if (threadIdx.x % kWarp == 0) {
        for (int k = 0; k < 3; ++k) warp_sums[parity][k][threadIdx.x / kWarp] = shares[k];
      }
      pending = n;
      parity ^= 1;
    }

    // The chunk's gradients of u, delta and z, and the thread's shares of those of D and delta_bias.
    T u[S::kItems], delta[S::kItems], grad_u[S::kItems], grad_delta[S::kItems];
    load_run(p.u + row + run.first, run.valid, vectors, B_tile, u);
    load_run(p.delta + row + run.first, run.valid, vectors, B_tile, delta);
    for (int i = 0; i < S::kItems; ++i) {
      grad_u[i] = grad_pre[i] * D + grad_dt_u[i] * steps.dt[i];
      grad_delta[i] = (grad_dt[i] + grad_dt_u[i] * u[i]) * step_size_grad(delta[i], bias, p.delta_softplus);
      grad_D += grad_pre[i] * u[i];
      if (run.inside(i)) grad_bias += grad_delta[i];
    }
    store_run(grad_u, B_tile, p.grad_u + row + run.first, run.valid, vectors);
    store_run(grad_delta, B_tile, p.grad_delta + row + run.first, run.valid, vectors);
    if (p.z) {
      T z[S::kItems], grad_y[S::kItems];
      load_run(p.z + row + run.first, run.valid, vectors, B_tile, z);
      load_run(p.grad_y + row + run.first, run.valid, vectors, B_tile, grad_y);
      for (int i = 0; i < S::kItems; ++i) z[i] = grad_y[i] * (readout[i] + D * u[i]) * silu_grad(z[i]);
      store_run(z, B_tile, p.grad_z + row + run.first, run.valid, vectors);
    }
  }

  __shared__ T end_sums[2][S::kWarps];  // the warps' shares of grad_D and grad_delta_bias
  const T end_shares[2] = {warp_sum(grad_D), warp_sum(grad_bias)};
  if (threadIdx.x % kWarp == 0) {
    end_sums[0][threadIdx.x / kWarp] = end_shares[0];
    end_sums[1][threadIdx.x / kWarp] = end_shares[1];
  }
  __syncthreads();  // also: the last state's warp sums, and thread 0's last h_carry
  if (pending >= 0 && threadIdx.x == pending % S::kThreads) add_warp_sums(pending, warp_sums[parity ^ 1]);
  for (int n = threadIdx.x; n < N; n += S::kThreads) {  // each state's owner, who made its sums
    p.grad_A[state + n] = sum_A[n];
    if (!kVariableB) p.grad_B[state + n] = sum_B[n];
    if (!kVariableC) p.grad_C[state + n] = sum_C[n];
    if (p.grad_initial_state) p.grad_initial_state[state + n] = h_carry[1][n];  // chunk 0 wrote half 1
  }
  if (threadIdx.x == 0) {
    T total_D = 0, total_bias = 0;
    for (int w = 0; w < S::kWarps; ++w) total_D += end_sums[0][w], total_bias += end_sums[1][w];
    if (p.grad_D) p.grad_D[b * p.dim + d] = total_D;
    if (p.grad_delta_bias) p.grad_delta_bias[b * p.dim + d] = total_bias;
  }
}

// Calls launch(variable_B, variable_C), the two layouts as compile-time constants (std::true_type or false_type).
template <typename Launch>
void with_layouts(const MatrixView& B_view, const MatrixView& C_view, Launch&& launch) {
  const bool variable_B = B_view.t_stride != 0, variable_C = C_view.t_stride != 0;
  if (variable_B && variable_C) {
    launch(std::true_type{}, std::true_type{});
  } else if (variable_B) {
    launch(std::true_type{}, std::false_type{});
  } else if (variable_C) {
    launch(std::false_type{}, std::true_type{});
  } else {
    launch(std::false_type{}, std::false_type{});
  }
}

}  // namespace

template <typename In>
cudaError_t selective_scan_forward_cuda(const ScanArgs<compute_t<In>, In>& args, cudaStream_t stream) {
  using S = Shape<compute_t<In>>;
  with_layouts(args.B_view, args.C_view, [&](auto variable_B, auto variable_C) {
    constexpr bool kVariableB = decltype(variable_B)::value, kVariableC = decltype(variable_C)::value;
    MJ_LAUNCH(dim3(args.dim, args.batch), S::kThreads, 0, stream, forward_kernel<In, kVariableB, kVariableC>)(args);
  });
  return cudaGetLastError();
}

template <typename In>
cudaError_t selective_scan_backward_cuda(const ScanArgs<compute_t<In>, In>& args, cudaStream_t stream) {
  using S = Shape<compute_t<In>>;
  with_layouts(args.B_view, args.C_view, [&](auto variable_B, auto variable_C) {
    constexpr bool kVariableB = decltype(variable_B)::value, kVariableC = decltype(variable_C)::value;
    MJ_LAUNCH(dim3(args.dim, args.batch), S::kThreads, 0, stream, backward_kernel<In, kVariableB, kVariableC>)(args);
  });
  return cudaGetLastError();
}

#define MJ_INSTANTIATE(In)                                                                                     \
  template cudaError_t selective_scan_forward_cuda<In>(const ScanArgs<compute_t<In>, In>&, cudaStream_t); \
  template cudaError_t selective_scan_backward_cuda<In>(const ScanArgs<compute_t<In>, In>&, cudaStream_t);
MJ_INSTANTIATE(float)
MJ_INSTANTIATE(double)
MJ_INSTANTIATE(__half)
MJ_INSTANTIATE(__nv_bfloat16)

}  // namespace minijamba
