// The CPU twin of the fused selective-scan kernel: the same algorithm shape as selective_scan.cu, on cores.
//
// Mamba §3.3.2: the scan is memory-bound, so the fast version never writes the (batch, dim, L, N) states to
// memory. Here one task owns a (batch, channel) pair and streams its sequence through once, reading u, delta
// and z along L and writing y; tasks run in parallel over batch · dim with at::parallel_for. A core has no
// block of threads to spend on a parallel scan, so each task runs the recurrence in order (work L · N, the
// least there is), a chunk of `chunk` = 64 steps at a time: first the chunk's step sizes dt_k = softplus(delta_k +
// bias) and dt_k·u_k (loops along k, which vectorize), then for each step k, in one loop over n that vectorizes,
//     x[n] = e^(dt_k · A[n]) · x[n] + dt_k · u_k · B_k[n]     (the decay: almost all of the arithmetic, cpu_math.h)
// and the readout y_k = D · u_k + Σ_n C_k[n] · x[n], then the gate y_k · silu(z_k) in a loop of its own. B and C are
// read step-major, B_k[n] = B[b, t, n] (binding.cpp transposes them so), so that a step's N numbers are side by
// side. Only the running state x is kept: the state of the whole sequence is never stored. The sums over n are
// `dot`s: eight running sums added pairwise, a fixed order (a run repeats bit for bit) that vectorizes, where the
// reference's n = 0, 1, ... is a chain of scalar additions that cost as much as the decays.
//
// The backward recomputes instead of storing: the forward saves the state at every chunk start
// (O(L / chunk · N) per channel), and the backward walks the chunks from last to first, recomputes one chunk's
// tile of states ((chunk + 1) × N, 4 KB at N = 16: it stays in L1) from its saved start, and runs the reverse
// recurrence of the gradient through it,
//     gx_k = gp_k · C_k + h_{k+1},   h_k = a_k · gx_k        (h_k: gradient with respect to the state x_{k-1}),
// where gp_k is the gradient of the pre-gate output, into a second tile; every other gradient is then a product
// or a sum over n of tiles, each a loop that vectorizes. Sums run in one fixed order (dots over n, over t from the
// last step), so a run repeats bit for bit. The maths of a step is in scan_op.h, shared with CUDA.
//
// The gradients of A, D, delta_bias and time-invariant B and C are sums over all L steps. Added one term at a time
// into one running total, each addition rounds relative to the total, and the error of L additions grows like
// sqrt(L)·eps (measured: dD 8× less accurate than torch's sum at L = 2048). So they are summed blocked: each
// chunk's terms into a partial sum of at most 64 terms, and the partial into the running total, which then takes
// L / 64 roundings instead of L, as the chunked torch scan's autograd does (python -m minijamba.bench accuracy).
//
// Every loop is plain arithmetic on arrays: the float32 path is compiled for x86-64-v3 (AVX2 and FMA) and for any
// x86-64 and picked at load time (MJ_VECTORIZE, cpu_math.h), so that the compiler vectorizes it at the width the CPU
// has. floor_task below is the forward's compute floor, which `python -m minijamba.bench scan` measures.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "selective_scan.h"

namespace minijamba {
namespace {

// Enough (t, n) updates per task that starting a thread pays for itself.
constexpr int64_t kMinWorkPerTask = 1 << 15;

int64_t grain_size(const int64_t length, const int64_t d_state) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, length * d_state));
}

// One (batch, channel) pair: its rows of u, delta, z, its A, B, C, D and delta_bias, so the loops read like maths.
// B and C come step-major (binding.cpp's kernel_matrix): step t's N numbers at B + t·Bt, side by side, with Bt = N
// (time-varying) or 0 (time-invariant: the same N numbers at every step).
template <typename T>
struct Channel {
  const T *u, *delta, *z, *A, *B, *C;
  T D, bias;
  int64_t row, state;  // offsets of its (L,) rows in (batch, dim, L) and of its (N,) state in (batch, dim, N)
  int64_t Bt, Ct;      // strides of B and C along t

  Channel(const ScanArgs<T>& p, const int64_t b, const int64_t d)
      : u(p.u + (b * p.dim + d) * p.length),
        delta(p.delta + (b * p.dim + d) * p.length),
        z(p.z ? p.z + (b * p.dim + d) * p.length : nullptr),
        A(p.A + d * p.d_state),
        B(p.B + p.B_view.offset(b, d)),
        C(p.C + p.C_view.offset(b, d)),
        D(p.D ? p.D[d] : T(0)),
        bias(p.delta_bias ? p.delta_bias[d] : T(0)),
        row((b * p.dim + d) * p.length),
        state((b * p.dim + d) * p.d_state),
        Bt(p.B_view.t_stride),
        Ct(p.C_view.t_stride) {}
};

// One task's scratch for a chunk of steps t0 + k, k < chunk: dt[k], dt_u[k] = dt[k]·u, the decays [k·N + n], the
// states tile [k·N + n] (the state before step k, k = 0..chunk) and the readout pre[k]; for the backward, the tile
// grad_x [k·N + n], per step the gradients of the pre-gate output, of dt and of dt·u, and the chunk's partial sums
// over its steps of grad_A, and of grad_B and grad_C when those are time-invariant.
template <typename T>
struct Workspace {
  std::vector<T> dt, dt_u, decays, states, pre, grad_x, grad_pre, grad_dt, grad_dt_u, grad_A_chunk,
      grad_B_chunk, grad_C_chunk;
  explicit Workspace(const ScanArgs<T>& p)
      : dt(p.chunk),
        dt_u(p.chunk),
        decays(p.chunk * p.d_state),
        states((p.chunk + 1) * p.d_state),
        pre(p.chunk),
        grad_x(p.chunk * p.d_state),
        grad_pre(p.chunk),
        grad_dt(p.chunk),
        grad_dt_u(p.chunk),
        grad_A_chunk(p.d_state),
        grad_B_chunk(p.d_state),
        grad_C_chunk(p.d_state) {}
};

// Σ_n a[n]·b[n], in a fixed order that vectorizes: eight running sums (sum j takes the n ≡ j mod 8 below the last
// multiple of 8), added pairwise, then the remaining n in order. Summed in order n = 0, 1, ..., as the reference
// does, a dot product is a chain of dependent scalar additions that costs as much as a step's N decays.
template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, const int64_t N) {
  T lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t whole = N - N % 8;
  for (int64_t n0 = 0; n0 < whole; n0 += 8)
    for (int64_t j = 0; j < 8; ++j) lane[j] += a[n0 + j] * b[n0 + j];
  T sum = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
  for (int64_t n = whole; n < N; ++n) sum += a[n] * b[n];
  return sum;
}

// Step 1's per-step part for steps t0..t1-1: dt[k] = Δ (softplus(delta + bias) if asked) and dt_u[k] = Δ·u.
template <typename T>
void step_sizes(const ScanArgs<T>& p, const Channel<T>& ch, const int64_t t0, const int64_t t1, Workspace<T>& w) {
  const int64_t steps = t1 - t0;
  const T *__restrict delta = ch.delta + t0, *__restrict u = ch.u + t0, bias = ch.bias;
  T *__restrict dt = w.dt.data(), *__restrict dt_u = w.dt_u.data();
  if (p.delta_softplus) {  // two loops, so that neither has a branch and both vectorize
    for (int64_t k = 0; k < steps; ++k) dt[k] = step_size(delta[k], bias, true);
  } else {
    for (int64_t k = 0; k < steps; ++k) dt[k] = step_size(delta[k], bias, false);
  }
  for (int64_t k = 0; k < steps; ++k) dt_u[k] = dt[k] * u[k];
}

// The forward of steps t0..t1-1: the step sizes, then the recurrence and the readout in one pass over k (nothing but
// the running state x is stored), then the gate:
//     x[n] = e^(dt_k·A[n]) · x[n] + dt_k·u_k · B_k[n],   y_k = (D·u_k + Σ_n C_k[n]·x[n]) · silu(z_k),
// the loop over n vectorized, the sum over n a `dot`.
template <typename T>
void forward_chunk(const ScanArgs<T>& p, const Channel<T>& ch, const int64_t t0, const int64_t t1, Workspace<T>& w,
                   T* __restrict x) {
  const int64_t N = p.d_state, steps = t1 - t0;
  step_sizes(p, ch, t0, t1, w);
  const T *__restrict A = ch.A, *__restrict u = ch.u + t0, *__restrict z = ch.z ? ch.z + t0 : nullptr;
  T* __restrict y = p.y + ch.row + t0;
  for (int64_t k = 0; k < steps; ++k) {
    const T *__restrict B_k = ch.B + (t0 + k) * ch.Bt, *__restrict C_k = ch.C + (t0 + k) * ch.Ct;
    const T dt = w.dt[k], dt_u = w.dt_u[k];
    for (int64_t n = 0; n < N; ++n) x[n] = exp_(dt * A[n]) * x[n] + dt_u * B_k[n];
    y[k] = ch.D * u[k] + dot(C_k, x, N);
  }
  if (z) {  // the gate in a loop of its own, which vectorizes (its silu costs as much as a step's N decays)
    for (int64_t k = 0; k < steps; ++k) y[k] *= silu(z[k]);
  }
}

// The recurrence again for the backward, keeping what it needs: decays[k·N + n] = e^(dt_k·A[n]) and the states tile,
// states[(k+1)·N + n] = decays[k·N + n] · states[k·N + n] + dt_k·u_k·B_k[n]; states[0..N) must hold the state
// before t0. The same arithmetic as forward_chunk, so the recomputed states are the forward's, bit for bit.
template <typename T>
void recompute_chunk(const ScanArgs<T>& p, const Channel<T>& ch, const int64_t t0, const int64_t t1,
                     Workspace<T>& w) {
  const int64_t N = p.d_state, steps = t1 - t0;
  step_sizes(p, ch, t0, t1, w);
  const T* __restrict A = ch.A;
  for (int64_t k = 0; k < steps; ++k) {
    const T* __restrict B_k = ch.B + (t0 + k) * ch.Bt;
    const T *__restrict before = w.states.data() + k * N, dt = w.dt[k], dt_u = w.dt_u[k];
    T *__restrict after = w.states.data() + (k + 1) * N, *__restrict a = w.decays.data() + k * N;
    for (int64_t n = 0; n < N; ++n) {
      a[n] = exp_(dt * A[n]);
      after[n] = a[n] * before[n] + dt_u * B_k[n];
    }
  }
}

// The readout without the gate, from the states tile: pre[k] = D·u_k + Σ_n C_k[n]·x_k[n], summed over n in order.
template <typename T>
void readout(const ScanArgs<T>& p, const Channel<T>& ch, const int64_t t0, const int64_t t1, Workspace<T>& w) {
  const int64_t N = p.d_state, steps = t1 - t0;
  for (int64_t k = 0; k < steps; ++k) {
    const T *__restrict C_k = ch.C + (t0 + k) * ch.Ct, *__restrict x = w.states.data() + (k + 1) * N;
    w.pre[k] = ch.D * ch.u[t0 + k] + dot(C_k, x, N);
  }
}

template <typename T>
void forward_channel(const ScanArgs<T>& p, const int64_t b, const int64_t d, Workspace<T>& w) {
  const Channel<T> ch(p, b, d);
  const int64_t N = p.d_state;
  T* x = w.states.data();  // the running state
  for (int64_t n = 0; n < N; ++n) x[n] = p.initial_state ? p.initial_state[ch.state + n] : T(0);
  for (int64_t c = 0; c < p.n_chunks; ++c) {
    const int64_t t0 = c * p.chunk, t1 = std::min(p.length, t0 + p.chunk);
    if (p.chunk_states) std::copy(x, x + N, p.chunk_states + ch.state * p.n_chunks + c * N);
    forward_chunk(p, ch, t0, t1, w, x);
  }
  std::copy(x, x + N, p.last_state + ch.state);
}

// The gradients one task accumulates for inputs shared across channels or batch: its own slice of each buffer.
template <typename T>
struct SharedGrads {
  T *A, *B, *C, *D, *delta_bias;
};

template <typename T>
void backward_channel(const ScanArgs<T>& p, const SharedGrads<T>& g, const int64_t b, const int64_t d,
                      Workspace<T>& w, T* __restrict h) {
  const Channel<T> ch(p, b, d);
  const int64_t N = p.d_state;
  T *grad_B = g.B + p.B_view.offset(b, d), *grad_C = g.C + p.C_view.offset(b, d), *grad_A = g.A + d * N;
  // h[n]: the gradient with respect to the state before the step being undone; at first, after the last one.
  for (int64_t n = 0; n < N; ++n) h[n] = p.grad_last_state ? p.grad_last_state[ch.state + n] : T(0);
  T grad_D = 0, grad_bias = 0;
  T *__restrict gx = w.grad_x.data(), *__restrict gp = w.grad_pre.data();
  T *__restrict gdt = w.grad_dt.data(), *__restrict gdt_u = w.grad_dt_u.data();
  const T* __restrict A = ch.A;

  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * p.chunk, t1 = std::min(p.length, t0 + p.chunk), steps = t1 - t0;
    const T *__restrict grad_y = p.grad_y + ch.row + t0, *__restrict u = ch.u + t0;
    const T *__restrict x_before = w.states.data(), *__restrict a = w.decays.data();
    std::copy_n(p.chunk_states + ch.state * p.n_chunks + c * N, N, w.states.data());
    recompute_chunk(p, ch, t0, t1, w);  // the chunk's states, from the one the forward saved at its start
    if (ch.z) {  // gp: gradient of the pre-gate output C·x + D·u; and the gate's own gradient
      readout(p, ch, t0, t1, w);
      const T *__restrict z = ch.z + t0, *__restrict pre = w.pre.data();
      T* __restrict grad_z = p.grad_z + ch.row + t0;
      for (int64_t k = 0; k < steps; ++k) {  // silu(z) = z·σ(z), silu'(z) = σ(z)·(1 + z·(1 - σ(z))): one σ
        const T s = sigmoid(z[k]);
        grad_z[k] = grad_y[k] * pre[k] * (s * (T(1) + z[k] * (T(1) - s)));
        gp[k] = grad_y[k] * (z[k] * s);
      }
    } else {
      std::copy_n(grad_y, steps, gp);
    }

    // The reverse recurrence gx_k = gp_k·C_k + h, h = a_k·gx_k, from the chunk's last step to its first.
    for (int64_t k = steps - 1; k >= 0; --k) {
      const T *__restrict C_k = ch.C + (t0 + k) * ch.Ct, *__restrict a_k = a + k * N, gp_k = gp[k];
      T* __restrict gx_k = gx + k * N;
      for (int64_t n = 0; n < N; ++n) {
        gx_k[n] = gp_k * C_k[n] + h[n];
        h[n] = a_k[n] * gx_k[n];
      }
    }

    // C and B: grad_C[t, n] += gp_t·x_t[n], grad_B[t, n] += gx_t[n]·dt_t·u_t (time-invariant: the chunk's terms
    // summed from its last step, then added to the total); dt·u: gdt_u[k] = Σ_n gx_k[n]·B_k[n], summed from n = 0.
    if (ch.Ct != 0) {
      for (int64_t k = 0; k < steps; ++k) {
        const T *__restrict x_after = x_before + (k + 1) * N, gp_k = gp[k];
        T* __restrict grad_C_k = grad_C + (t0 + k) * ch.Ct;
        for (int64_t n = 0; n < N; ++n) grad_C_k[n] += gp_k * x_after[n];
      }
    } else {
      T* __restrict chunk_C = w.grad_C_chunk.data();
      std::fill_n(chunk_C, N, T(0));
      for (int64_t k = steps - 1; k >= 0; --k) {
        const T *__restrict x_after = x_before + (k + 1) * N, gp_k = gp[k];
        for (int64_t n = 0; n < N; ++n) chunk_C[n] += gp_k * x_after[n];
      }
      for (int64_t n = 0; n < N; ++n) grad_C[n] += chunk_C[n];
    }
    if (ch.Bt != 0) {
      for (int64_t k = 0; k < steps; ++k) {
        const T *__restrict gx_k = gx + k * N, dt_u = w.dt_u[k];
        T* __restrict grad_B_k = grad_B + (t0 + k) * ch.Bt;
        for (int64_t n = 0; n < N; ++n) grad_B_k[n] += gx_k[n] * dt_u;
      }
    } else {
      T* __restrict chunk_B = w.grad_B_chunk.data();
      std::fill_n(chunk_B, N, T(0));
      for (int64_t k = steps - 1; k >= 0; --k) {
        const T *__restrict gx_k = gx + k * N, dt_u = w.dt_u[k];
        for (int64_t n = 0; n < N; ++n) chunk_B[n] += gx_k[n] * dt_u;
      }
      for (int64_t n = 0; n < N; ++n) grad_B[n] += chunk_B[n];
    }
    for (int64_t k = 0; k < steps; ++k) gdt_u[k] = dot(gx + k * N, ch.B + (t0 + k) * ch.Bt, N);

    // The exponent dt·A of a = e^(dt·A): its gradient gx·x_before·a overwrites gx; then A (the chunk's terms
    // summed from its last step, then added to the total) and dt (summed over n from 0).
    for (int64_t i = 0; i < steps * N; ++i) gx[i] = gx[i] * x_before[i] * a[i];
    T* __restrict grad_A_chunk = w.grad_A_chunk.data();
    std::fill_n(grad_A_chunk, N, T(0));
    for (int64_t k = steps - 1; k >= 0; --k)
      for (int64_t n = 0; n < N; ++n) grad_A_chunk[n] += gx[k * N + n] * w.dt[k];
    for (int64_t n = 0; n < N; ++n) grad_A[n] += grad_A_chunk[n];
    for (int64_t k = 0; k < steps; ++k) gdt[k] = dot(gx + k * N, A, N);

    // u and delta (through dt = softplus(delta + bias)); D and delta_bias: the chunk's terms summed from its last
    // step, then added to the totals.
    T *__restrict grad_u = p.grad_u + ch.row + t0, *__restrict grad_delta = p.grad_delta + ch.row + t0;
    const T *__restrict delta = ch.delta + t0, *__restrict dt = w.dt.data(), D = ch.D, bias = ch.bias;
    for (int64_t k = 0; k < steps; ++k) grad_u[k] = gp[k] * D + gdt_u[k] * dt[k];
    for (int64_t k = 0; k < steps; ++k) grad_delta[k] = gdt[k] + gdt_u[k] * u[k];
    if (p.delta_softplus) {
      for (int64_t k = 0; k < steps; ++k) grad_delta[k] *= step_size_grad(delta[k], bias, true);
    }
    T chunk_D = 0, chunk_bias = 0;
    for (int64_t k = steps - 1; k >= 0; --k) {
      chunk_D += gp[k] * u[k];
      chunk_bias += grad_delta[k];
    }
    grad_D += chunk_D;
    grad_bias += chunk_bias;
  }
  if (g.D) g.D[d] += grad_D;
  if (g.delta_bias) g.delta_bias[d] += grad_bias;
  if (p.grad_initial_state) std::copy(h, h + N, p.grad_initial_state + ch.state);
}

// The float32 path, one copy per instruction set (MJ_VECTORIZE, cpu_math.h); float64 is there for the tests.
MJ_VECTORIZE void forward_channel_f32(const ScanArgs<float>& p, int64_t b, int64_t d, Workspace<float>& w) {
  forward_channel(p, b, d, w);
}
MJ_VECTORIZE void backward_channel_f32(const ScanArgs<float>& p, const SharedGrads<float>& g, int64_t b, int64_t d,
                                       Workspace<float>& w, float* h) {
  backward_channel(p, g, b, d, w, h);
}

// The forward's compute floor (bench scan): per (step, state) only the arithmetic no forward can skip, the decay
// e^(dt·A) and two multiply-adds (the state x = a·x + dt·u·B, the readout's C·x), on a tile that stays in L1, at the
// forward's vector width. Returns a sum of the states, so that none of it can be optimized away.
template <typename T>
T floor_task(const int64_t steps, const int64_t N) {
  std::vector<T> A(N), x(N, T(0)), readout(N, T(0)), tile(kCpuChunk * N), dt(kCpuChunk);
  for (int64_t n = 0; n < N; ++n) A[n] = -T(n + 1);
  for (int64_t k = 0; k < kCpuChunk; ++k) dt[k] = T(0.01) * T(k + 1);
  for (int64_t i = 0; i < kCpuChunk * N; ++i) tile[i] = T(0.5) + T(i % 7);
  for (int64_t k = 0; k < steps; ++k) {
    const T *__restrict row = tile.data() + (k % kCpuChunk) * N, d = dt[k % kCpuChunk];
    T *__restrict state = x.data(), *__restrict y = readout.data();
    for (int64_t n = 0; n < N; ++n) {
      state[n] = exp_(d * A[n]) * state[n] + d * row[n];
      y[n] += row[n] * state[n];
    }
  }
  T sum = 0;
  for (int64_t n = 0; n < N; ++n) sum += x[n] + readout[n];
  return sum;
}

MJ_VECTORIZE float floor_task_f32(int64_t steps, int64_t N) { return floor_task<float>(steps, N); }

}  // namespace

template <typename T>
void selective_scan_forward_cpu(const ScanArgs<T>& p) {
  at::parallel_for(0, p.batch * p.dim, grain_size(p.length, p.d_state), [&](int64_t begin, int64_t end) {
    Workspace<T> w(p);
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        forward_channel_f32(p, i / p.dim, i % p.dim, w);
      } else {
        forward_channel(p, i / p.dim, i % p.dim, w);
      }
    }
  });
}

template <typename T>
void selective_scan_backward_cpu(const ScanArgs<T>& p, const int64_t n_tasks) {
  // Task k owns channels [k·total/n_tasks, (k+1)·total/n_tasks) and adds into slice k of each shared
  // gradient buffer (p.grad_A etc. hold n_tasks copies, summed by the caller): no atomics, no races, and the
  // same sum order on every run.
  const int64_t total = p.batch * p.dim, A_size = p.dim * p.d_state;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> w(p);
    std::vector<T> h(p.d_state);
    for (int64_t k = begin; k < end; ++k) {
      const SharedGrads<T> g{p.grad_A + k * A_size, p.grad_B + k * p.B_view.numel, p.grad_C + k * p.C_view.numel,
                             p.grad_D ? p.grad_D + k * p.dim : nullptr,
                             p.grad_delta_bias ? p.grad_delta_bias + k * p.dim : nullptr};
      for (int64_t i = k * total / n_tasks; i < (k + 1) * total / n_tasks; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          backward_channel_f32(p, g, i / p.dim, i % p.dim, w, h.data());
        } else {
          backward_channel(p, g, i / p.dim, i % p.dim, w, h.data());
        }
      }
    }
  });
}

float selective_scan_floor_cpu(const int64_t steps, const int64_t d_state, const int64_t tasks) {
  std::vector<float> sums(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) sums[k] = floor_task_f32(steps, d_state);
  });
  float total = 0;
  for (const float v : sums) total += v;
  return total;
}

template void selective_scan_forward_cpu<float>(const ScanArgs<float>&);
template void selective_scan_forward_cpu<double>(const ScanArgs<double>&);
template void selective_scan_backward_cpu<float>(const ScanArgs<float>&, int64_t);
template void selective_scan_backward_cpu<double>(const ScanArgs<double>&, int64_t);

}  // namespace minijamba
