// The Mamba block's causal depthwise conv and its SiLU, fused for the CPU (causal_conv_cpu.cpp); binding.cpp checks
// the tensors and fills ConvArgs, these only compute.
#pragma once

#include <cstdint>

namespace minijamba {

// out[b, d, t] = silu(bias[d] + Σ_j weight[d, j] · window[b, t + j, d]), j < K = d_conv, where the window is the
// K - 1 inputs before the sequence (prefix[b, d, i], zeros when prefix is nullptr) followed by x[b, t, d].
// x is channels-last, (batch, L, dim) with x_batch_stride, x_step_stride and unit stride along d: the in_proj output
// it is a slice of. out and grad_out are (batch, dim, L) contiguous, the layout the scan reads.
template <typename T>
struct ConvArgs {
  int64_t batch, dim, length, d_conv;
  int64_t x_batch_stride, x_step_stride;
  const T *x, *weight, *bias, *prefix;  // weight (dim, K), bias (dim,) or nullptr, prefix (batch, dim, K - 1) or nullptr
  T* out;
  // backward only
  const T* grad_out;
  T *grad_x, *grad_prefix;    // (batch, L, dim) contiguous, (batch, dim, K - 1) or nullptr
  T *grad_weight, *grad_bias;  // n_tasks copies of (dim, K) and (dim,), to be summed
};

template <typename T>
void causal_conv_silu_forward_cpu(const ConvArgs<T>& args);

template <typename T>
void causal_conv_silu_backward_cpu(const ConvArgs<T>& args, int64_t n_tasks);

}  // namespace minijamba
