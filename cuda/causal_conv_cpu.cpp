// The causal depthwise conv + SiLU of the Mamba block on the CPU, forward and backward in one pass each.
//
// In torch the conv is d_conv shifted multiply-adds over (batch, dim, L) tensors, a concatenation with the cached
// window, the bias and the SiLU: ten passes over memory forward and more backward, each a kernel launch of its own,
// and they cost as much as a third of the scan in a training step. Here one task owns one batch element and walks its
// sequence once. Every loop runs along the channels d, which are contiguous in x (the in_proj output, channels-last)
// and in the transposed weights, so each vectorizes; a block of kStepBlock steps is computed into a channels-last
// tile and then written to (batch, dim, L), the layout the scan reads, by a transpose that stays in L1/L2.
//
// The backward recomputes the pre-activation s from x (d_conv multiply-adds, cheaper than storing it) and, with
// gs = grad_out · silu'(s),
//     grad_window[i] = Σ_j weight[j] · gs[i - j],   grad_weight[j] = Σ_t gs[t] · window[t + j],   grad_bias = Σ_t gs[t],
// the first split into grad_x (window rows K - 1 on) and grad_prefix (the cached K - 1 rows). grad_weight and
// grad_bias add up over the batch: each task adds into its own copy, summed by the caller, so no two tasks write the
// same number and a run repeats bit for bit. The sums over t run from t = 0 up.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "causal_conv.h"
#include "cpu_math.h"
#include "scan_op.h"

namespace minijamba {
namespace {

constexpr int64_t kStepBlock = 32;  // steps per tile: kStepBlock · dim numbers, 32 KB at dim 256

// One batch element's window rows: row i < K - 1 is the prefix (copied channels-last into `head`), row i >= K - 1
// is x at step i - (K - 1).
template <typename T>
struct Window {
  const T *x, *head;
  int64_t dim, step_stride, K;
  const T* row(int64_t i) const { return i < K - 1 ? head + i * dim : x + (i - (K - 1)) * step_stride; }
};

// head holds K + 1 rows of dim: the prefix (K - 1 rows), then two rows of scratch.
template <typename T>
Window<T> window_of(const ConvArgs<T>& p, int64_t b, std::vector<T>& head) {
  const int64_t K = p.d_conv, dim = p.dim;
  for (int64_t i = 0; i < K - 1; ++i)
    for (int64_t d = 0; d < dim; ++d) head[i * dim + d] = p.prefix ? p.prefix[(b * dim + d) * (K - 1) + i] : T(0);
  return {p.x + b * p.x_batch_stride, head.data(), dim, p.x_step_stride, K};
}

// s[d] = bias[d] + Σ_j weight_t[j·dim + d] · window row (t + j)[d], for one step t.
template <typename T>
inline void pre_activation(const ConvArgs<T>& p, const Window<T>& win, const T* __restrict weight_t, int64_t t,
                           T* __restrict s) {
  const int64_t dim = p.dim;
  for (int64_t d = 0; d < dim; ++d) s[d] = p.bias ? p.bias[d] : T(0);
  for (int64_t j = 0; j < p.d_conv; ++j) {
    const T *__restrict in = win.row(t + j), *__restrict w = weight_t + j * dim;
    for (int64_t d = 0; d < dim; ++d) s[d] += w[d] * in[d];
  }
}

template <typename T>
void forward_batch(const ConvArgs<T>& p, int64_t b, const T* weight_t, std::vector<T>& head, std::vector<T>& tile) {
  const int64_t dim = p.dim, L = p.length;
  const Window<T> win = window_of(p, b, head);
  for (int64_t t0 = 0; t0 < L; t0 += kStepBlock) {
    const int64_t steps = std::min(kStepBlock, L - t0);
    for (int64_t k = 0; k < steps; ++k) {
      T* __restrict s = tile.data() + k * dim;
      pre_activation(p, win, weight_t, t0 + k, s);
      for (int64_t d = 0; d < dim; ++d) s[d] = silu(s[d]);
    }
    for (int64_t d = 0; d < dim; ++d)  // the tile, transposed into (batch, dim, L)
      for (int64_t k = 0; k < steps; ++k) p.out[(b * dim + d) * L + t0 + k] = tile[k * dim + d];
  }
}

template <typename T>
void backward_batch(const ConvArgs<T>& p, int64_t b, const T* weight_t, std::vector<T>& head, std::vector<T>& gs,
                    T* __restrict grad_weight_t, T* __restrict grad_bias) {
  const int64_t dim = p.dim, L = p.length, K = p.d_conv;
  const Window<T> win = window_of(p, b, head);
  for (int64_t t0 = 0; t0 < L; t0 += kStepBlock) {  // gs[t, d] = grad_out · silu'(s), channels-last
    const int64_t steps = std::min(kStepBlock, L - t0);
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t k = 0; k < steps; ++k) gs[(t0 + k) * dim + d] = p.grad_out[(b * dim + d) * L + t0 + k];
    for (int64_t k = 0; k < steps; ++k) {
      T* __restrict g = gs.data() + (t0 + k) * dim;
      T* __restrict s = head.data() + (K - 1) * dim;  // scratch row after the prefix rows
      pre_activation(p, win, weight_t, t0 + k, s);
      for (int64_t d = 0; d < dim; ++d) g[d] *= silu_grad(s[d]);
    }
  }
  for (int64_t t = 0; t < L; ++t) {  // the weights' and the bias's gradients, summed from t = 0
    const T* __restrict g = gs.data() + t * dim;
    for (int64_t d = 0; d < dim; ++d) grad_bias[d] += g[d];
    for (int64_t j = 0; j < K; ++j) {
      const T* __restrict in = win.row(t + j);
      T* __restrict gw = grad_weight_t + j * dim;
      for (int64_t d = 0; d < dim; ++d) gw[d] += g[d] * in[d];
    }
  }
  // Window row i gets Σ_j weight[j] · gs[i - j] over the steps t = i - j in [0, L).
  for (int64_t i = 0; i < L + K - 1; ++i) {
    const bool is_x = i >= K - 1;
    T* __restrict out = is_x ? p.grad_x + (b * L + i - (K - 1)) * dim : head.data() + K * dim;
    std::fill_n(out, dim, T(0));
    for (int64_t j = 0; j < K; ++j) {
      const int64_t t = i - j;
      if (t < 0 || t >= L) continue;
      const T *__restrict g = gs.data() + t * dim, *__restrict w = weight_t + j * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] += w[d] * g[d];
    }
    if (!is_x && p.grad_prefix) {
      for (int64_t d = 0; d < dim; ++d) p.grad_prefix[(b * dim + d) * (K - 1) + i] = out[d];
    }
  }
}

// The weights transposed to (K, dim), so that loops along d read them contiguously.
template <typename T>
std::vector<T> transposed_weight(const ConvArgs<T>& p) {
  std::vector<T> weight_t(p.d_conv * p.dim);
  for (int64_t d = 0; d < p.dim; ++d)
    for (int64_t j = 0; j < p.d_conv; ++j) weight_t[j * p.dim + d] = p.weight[d * p.d_conv + j];
  return weight_t;
}

MJ_VECTORIZE void forward_batch_f32(const ConvArgs<float>& p, int64_t b, const float* w, std::vector<float>& head,
                                    std::vector<float>& tile) {
  forward_batch(p, b, w, head, tile);
}
MJ_VECTORIZE void backward_batch_f32(const ConvArgs<float>& p, int64_t b, const float* w, std::vector<float>& head,
                                     std::vector<float>& gs, float* grad_weight_t, float* grad_bias) {
  backward_batch(p, b, w, head, gs, grad_weight_t, grad_bias);
}

}  // namespace

template <typename T>
void causal_conv_silu_forward_cpu(const ConvArgs<T>& p) {
  const std::vector<T> weight_t = transposed_weight(p);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> head((p.d_conv + 1) * p.dim), tile(kStepBlock * p.dim);
    for (int64_t b = begin; b < end; ++b) {
      if constexpr (std::is_same_v<T, float>) {
        forward_batch_f32(p, b, weight_t.data(), head, tile);
      } else {
        forward_batch(p, b, weight_t.data(), head, tile);
      }
    }
  });
}

template <typename T>
void causal_conv_silu_backward_cpu(const ConvArgs<T>& p, const int64_t n_tasks) {
  const std::vector<T> weight_t = transposed_weight(p);
  // Task k owns batch elements [k·batch/n_tasks, (k+1)·batch/n_tasks) and adds into copy k of grad_weight (kept
  // transposed here, (K, dim), and transposed back below) and of grad_bias.
  std::vector<T> grad_weight_t(n_tasks * p.d_conv * p.dim, T(0));
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> head((p.d_conv + 1) * p.dim), gs(p.length * p.dim);
    for (int64_t k = begin; k < end; ++k) {
      T *gw = grad_weight_t.data() + k * p.d_conv * p.dim, *gb = p.grad_bias + k * p.dim;
      for (int64_t b = k * p.batch / n_tasks; b < (k + 1) * p.batch / n_tasks; ++b) {
        if constexpr (std::is_same_v<T, float>) {
          backward_batch_f32(p, b, weight_t.data(), head, gs, gw, gb);
        } else {
          backward_batch(p, b, weight_t.data(), head, gs, gw, gb);
        }
      }
    }
  });
  for (int64_t k = 0; k < n_tasks; ++k)
    for (int64_t d = 0; d < p.dim; ++d)
      for (int64_t j = 0; j < p.d_conv; ++j)
        p.grad_weight[(k * p.dim + d) * p.d_conv + j] = grad_weight_t[(k * p.d_conv + j) * p.dim + d];
}

template void causal_conv_silu_forward_cpu<float>(const ConvArgs<float>&);
template void causal_conv_silu_forward_cpu<double>(const ConvArgs<double>&);
template void causal_conv_silu_backward_cpu<float>(const ConvArgs<float>&, int64_t);
template void causal_conv_silu_backward_cpu<double>(const ConvArgs<double>&, int64_t);

}  // namespace minijamba
