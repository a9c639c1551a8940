// The torch entry points of the fused selective scan: check every tensor, then hand raw pointers to a kernel.
//
// A bad call must end in a Python RuntimeError that names the argument, never in a crash or a silent wrong
// answer: the kernels trust what they are given (shapes, dtypes, contiguity, device), so every one of those
// is checked here with TORCH_CHECK. Built three ways by minijamba/fused.py: for the CPU alone; with
// -DMINIJAMBA_WITH_CUDA together with selective_scan.cu, where CUDA tensors go to the GPU kernels; and with
// -DMINIJAMBA_CUDA_EMULATED together with the same .cu compiled as host C++ (cuda/emulator/), where CPU tensors
// go to the CUDA kernels run under CUDA's execution model on the CPU, and every output starts as NaN.
//
// Shapes: u, delta, z: (batch, dim, L);  A: (dim, N);  D, delta_bias: (dim,);  initial_state: (batch, dim, N);
// B, C: (dim, N) time-invariant, (batch, N, L) selective or (batch, groups, N, L) grouped.
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "causal_conv.h"
#include "cpu_math.h"
#include "selective_scan.h"

#ifdef MINIJAMBA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace minijamba {
namespace {

using at::Tensor;

// Whether u goes to the CUDA kernels (on a GPU, or emulated) rather than to the CPU twin.
bool uses_cuda_kernels([[maybe_unused]] const Tensor& u) {
#if defined(MINIJAMBA_CUDA_EMULATED)
  return true;
#elif defined(MINIJAMBA_WITH_CUDA)
  return u.is_cuda();
#else
  return false;
#endif
}

// An output the kernels overwrite: uninitialized on a GPU and the CPU, NaN under the emulator, so that an element
// a kernel forgets to write shows up in the tests.
Tensor output_like(const Tensor& like) {
#ifdef MINIJAMBA_CUDA_EMULATED
  return at::full_like(like, std::numeric_limits<double>::quiet_NaN());
#else
  return at::empty_like(like);
#endif
}

Tensor new_output(const at::TensorOptions& options, at::IntArrayRef shape) {
#ifdef MINIJAMBA_CUDA_EMULATED
  return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
#else
  return at::empty(shape, options);
#endif
}
using OptionalTensor = std::optional<Tensor>;

std::string shape_of(const Tensor& t) { return c10::str(t.sizes()); }

bool is_16_bit(const Tensor& u) { return u.scalar_type() == at::kHalf || u.scalar_type() == at::kBFloat16; }

// The dtype of A, D, delta_bias, the states and the sums over L and channels: float32 for 16-bit u (the official
// kernel's rule: 16 bits cannot carry a state through thousands of steps), u's own dtype otherwise.
at::ScalarType state_dtype(const Tensor& u) { return is_16_bit(u) ? at::kFloat : u.scalar_type(); }

// A sequence (delta, z, B, C, grad_y) has u's dtype; a parameter or state (A, D, delta_bias, initial_state,
// chunk_states, grad_last_state) has state_dtype(u).
void check_tensor(const Tensor& t, const char* name, const Tensor& u, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, " (u is ", u.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == u.device(), name, " must be on u's device ", u.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_like_u(const Tensor& t, const char* name, const Tensor& u) { check_tensor(t, name, u, u.scalar_type()); }

void check_like_state(const Tensor& t, const char* name, const Tensor& u) {
  check_tensor(t, name, u, state_dtype(u));
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", shape_of(t));
}

// B or C: checks it is one of the three shapes.
void check_matrix(const Tensor& M, const char* name, int64_t batch, int64_t dim, int64_t N, int64_t L) {
  const bool invariant = M.dim() == 2 && M.size(0) == dim && M.size(1) == N;
  const bool selective = M.dim() == 3 && M.size(0) == batch && M.size(1) == N && M.size(2) == L;
  const bool grouped = M.dim() == 4 && M.size(0) == batch && M.size(1) >= 1 && dim % M.size(1) == 0 &&
                       M.size(2) == N && M.size(3) == L;
  TORCH_CHECK(invariant || selective || grouped, name, " must be (dim, N)=(", dim, ", ", N,
              ") time-invariant, (batch, N, L)=(", batch, ", ", N, ", ", L,
              ") selective, or (batch, groups, N, L) with groups dividing dim=", dim, "; got ", shape_of(M));
}

// A checked B or C as a MatrixView (see scan_op.h), `M` being the tensor kernel_matrix returned. Its rows may be
// longer than L (padded, for the CUDA kernels); on the CPU a time-varying one is stored step-major, (..., L, N).
MatrixView matrix_view(const Tensor& M, int64_t dim, bool step_major) {
  if (M.dim() == 2) return {0, M.size(1), 1, 0, 1, M.numel()};
  const int64_t groups = M.dim() == 4 ? M.size(1) : 1, per_group = M.size(-2) * M.size(-1);
  const int64_t n_stride = step_major ? 1 : M.size(-1), t_stride = step_major ? M.size(-1) : 1;
  return {groups * per_group, per_group, n_stride, t_stride, dim / groups, M.numel()};
}

// The B or C the kernels read. The CUDA kernels load a time-varying one a whole warp's run at a time with no
// bounds checks (selective_scan.cu): unless its rows are already whole chunks and 16-byte aligned, they get a
// copy padded with zeros to whole chunks. The CPU twin reads a time-varying one step-major, (..., L, N): a step's
// N numbers side by side, so that its loops over n are unit-stride and vectorize; the (..., N, L) argument is
// transposed into that (a copy of batch · L · N numbers, 1/dim of the scan's work; x_proj writes B and C step-major
// anyway). A time-invariant (dim, N) one is read as it is.
Tensor kernel_matrix(const Tensor& M, [[maybe_unused]] const Tensor& u) {
  if (M.dim() == 2) return M;
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
  if (uses_cuda_kernels(u)) {
    const int64_t L = M.size(-1), whole = (L + kCudaChunk - 1) / kCudaChunk * kCudaChunk;
    if (L != whole || reinterpret_cast<std::uintptr_t>(M.data_ptr()) % 16 != 0) {
      return at::constant_pad_nd(M, {0, whole - L});  // a fresh tensor, aligned, even when nothing is added
    }
    return M;
  }
#endif
  return M.transpose(-1, -2).contiguous();
}

// Whether kernel_matrix stored a B or C step-major: a time-varying one on the CPU twin.
bool step_major(const Tensor& M, [[maybe_unused]] const Tensor& u) { return M.dim() > 2 && !uses_cuda_kernels(u); }

template <typename X>
X* pointer(const Tensor& t) {  // the dtype was checked: at::Half and __half, for one, are the same 16 bits
  return static_cast<X*>(t.data_ptr());
}

// ScanArgs with the input pointers and sizes filled in, and the B and C they point into (kernel_matrix).
template <typename T, typename In>
struct Inputs {
  ScanArgs<T, In> p;
  Tensor B, C;
};

// Checks every input and returns the kernels' view of them.
template <typename T, typename In>
Inputs<T, In> input_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                         const OptionalTensor& D, const OptionalTensor& z, const OptionalTensor& delta_bias,
                         const OptionalTensor& initial_state, bool delta_softplus, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.dim() == 2 ? A.size(1) : 0;
  check_like_u(delta, "delta", u);
  check_shape(delta, "delta", u.sizes());
  check_like_state(A, "A", u);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && N >= 1, "A must have shape (dim=", dim, ", N >= 1), got ",
              shape_of(A));
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
  TORCH_CHECK(!uses_cuda_kernels(u) || N <= kCudaMaxState, "A must have N <= ", kCudaMaxState,
              " on the CUDA kernels, got N=", N);
#endif
  check_like_u(B, "B", u);
  check_like_u(C, "C", u);
  check_matrix(B, "B", batch, dim, N, L);
  check_matrix(C, "C", batch, dim, N, L);
  Inputs<T, In> inputs{{}, kernel_matrix(B, u), kernel_matrix(C, u)};
  ScanArgs<T, In>& p = inputs.p;
  p.B_view = matrix_view(inputs.B, dim, step_major(B, u));
  p.C_view = matrix_view(inputs.C, dim, step_major(C, u));
  const auto optional = [&](const OptionalTensor& t, const char* name, at::IntArrayRef shape, bool sequence) {
    if (!t.has_value()) return static_cast<void*>(nullptr);
    sequence ? check_like_u(*t, name, u) : check_like_state(*t, name, u);
    check_shape(*t, name, shape);
    return t->data_ptr();
  };
  p.D = static_cast<const T*>(optional(D, "D", {dim}, false));
  p.z = static_cast<const In*>(optional(z, "z", u.sizes(), true));
  p.delta_bias = static_cast<const T*>(optional(delta_bias, "delta_bias", {dim}, false));
  p.initial_state = static_cast<const T*>(optional(initial_state, "initial_state", {batch, dim, N}, false));
  p.batch = batch, p.dim = dim, p.length = L, p.d_state = N;
  p.chunk = chunk, p.n_chunks = (L + chunk - 1) / chunk;
  p.delta_softplus = delta_softplus;
  p.u = pointer<const In>(u), p.delta = pointer<const In>(delta), p.A = pointer<const T>(A);
  p.B = pointer<const In>(inputs.B), p.C = pointer<const In>(inputs.C);
  return inputs;
}

void check_u(const Tensor& u) {
  TORCH_CHECK(u.defined(), "u must be a tensor");
  TORCH_CHECK(u.dim() == 3 && u.size(2) >= 1, "u must have shape (batch, dim, L) with L >= 1, got ", shape_of(u));
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble || is_16_bit(u),
              "u must be float16, bfloat16, float32 or float64, got ", u.scalar_type());
  TORCH_CHECK(u.is_contiguous(), "u must be contiguous");
#if defined(MINIJAMBA_WITH_CUDA)
  TORCH_CHECK(u.is_cpu() || u.is_cuda(), "u must be on the CPU or a CUDA device, got ", u.device());
#elif defined(MINIJAMBA_CUDA_EMULATED)
  TORCH_CHECK(u.is_cpu(), "u must be on the CPU (the emulated CUDA kernels run there), got ", u.device());
#else
  TORCH_CHECK(u.is_cpu(), "u must be on the CPU (this build has no CUDA kernels), got ", u.device());
#endif
}

// The dtype, device and contiguity of every tensor argument (the shapes come later): checked before a 16-bit call
// to the CPU twin widens its inputs, which would hide a wrong dtype.
void check_tensors(const Tensor& u, const std::vector<std::pair<const char*, const OptionalTensor*>>& sequences,
                  const std::vector<std::pair<const char*, const OptionalTensor*>>& states) {
  for (const auto& [name, t] : sequences) {
    if (t->has_value()) check_like_u(**t, name, u);
  }
  for (const auto& [name, t] : states) {
    if (t->has_value()) check_like_state(**t, name, u);
  }
}

OptionalTensor widened(const OptionalTensor& t) { return t ? OptionalTensor(t->to(at::kFloat)) : std::nullopt; }

OptionalTensor narrowed(const OptionalTensor& t, at::ScalarType dtype) {
  return t ? OptionalTensor(t->to(dtype)) : std::nullopt;
}

// The element types of u's dtype: body(KernelTypes<T, In>{}) with In the sequences' type and T the compute type.
template <typename ComputeT, typename InputT>
struct KernelTypes {
  using T = ComputeT;
  using In = InputT;
};

template <typename Body>
void dispatch(const Tensor& u, Body&& body) {
  switch (u.scalar_type()) {
    case at::kDouble:
      return body(KernelTypes<double, double>{});
    case at::kFloat:
      return body(KernelTypes<float, float>{});
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
    case at::kHalf:
      return body(KernelTypes<float, __half>{});
    case at::kBFloat16:
      return body(KernelTypes<float, __nv_bfloat16>{});
#endif
    default:
      TORCH_CHECK(false, "u must be float32 or float64 here, got ", u.scalar_type());
  }
}

int64_t chunk_for(const Tensor& u) {
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
  if (uses_cuda_kernels(u)) return kCudaChunk;
#endif
  return kCpuChunk;
}

#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
// The grid is (dim, batch) blocks (selective_scan.cu): CUDA allows 2^31 - 1 blocks along x, 65535 along y.
template <typename T, typename In>
void check_launch_limits(const ScanArgs<T, In>& p) {
  TORCH_CHECK(p.batch <= 65535, "u must have batch <= 65535 on the CUDA kernels (one block row per batch element, ",
              "and a grid has at most 65535 rows), got batch=", p.batch);
  TORCH_CHECK(p.dim < (int64_t{1} << 31), "u must have dim < 2^31 on the CUDA kernels (one block per channel), ",
              "got dim=", p.dim);
}

void check_launch(cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "selective scan CUDA launch failed: ", cudaGetErrorString(error));
}

// The stream to launch on: torch's current one for u's GPU; the emulator runs each launch to completion.
cudaStream_t stream_for([[maybe_unused]] const Tensor& u) {
#ifdef MINIJAMBA_WITH_CUDA
  return c10::cuda::getCurrentCUDAStream(u.get_device());
#else
  return nullptr;
#endif
}

// Makes u's GPU current for a launch (nothing to do under the emulator).
struct DeviceGuard {
#ifdef MINIJAMBA_WITH_CUDA
  explicit DeviceGuard(const Tensor& u) : guard(u.device()) {}
  c10::cuda::CUDAGuard guard;
#else
  explicit DeviceGuard(const Tensor&) {}
#endif
};
#endif

// y, last_state and (if save_chunk_states, for the backward) the state at the start of every chunk:
// (batch, dim, ceil(L / chunk), N). The states are float32 for 16-bit u, y has u's dtype.
std::vector<Tensor> forward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                            const OptionalTensor& D, const OptionalTensor& z, const OptionalTensor& delta_bias,
                            const OptionalTensor& initial_state, bool delta_softplus, bool save_chunk_states) {
  check_u(u);
  const OptionalTensor delta_ = delta, A_ = A, B_ = B, C_ = C;
  check_tensors(u, {{"delta", &delta_}, {"B", &B_}, {"C", &C_}, {"z", &z}},
               {{"A", &A_}, {"D", &D}, {"delta_bias", &delta_bias}, {"initial_state", &initial_state}});
  if (is_16_bit(u) && !uses_cuda_kernels(u)) {
    // The CPU twin computes in float32 and float64 only: 16-bit sequences are widened to float32 here and y is
    // rounded back, which is what the CUDA kernels do element by element (the states are float32 either way).
    std::vector<Tensor> out = forward(u.to(at::kFloat), delta.to(at::kFloat), A, B.to(at::kFloat),
                                      C.to(at::kFloat), D, widened(z), delta_bias, initial_state, delta_softplus,
                                      save_chunk_states);
    out[0] = out[0].to(u.scalar_type());
    return out;
  }
  std::vector<Tensor> out;
  dispatch(u, [&](auto types) {
    using T = typename decltype(types)::T;
    using In = typename decltype(types)::In;
    Inputs<T, In> inputs =
        input_args<T, In>(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_for(u));
    ScanArgs<T, In>& p = inputs.p;
    const auto states = u.options().dtype(state_dtype(u));
    const Tensor y = output_like(u), last_state = new_output(states, {p.batch, p.dim, p.d_state});
    const Tensor chunk_states = save_chunk_states ? new_output(states, {p.batch, p.dim, p.n_chunks, p.d_state})
                                                  : at::empty({0}, states);
    p.y = pointer<In>(y), p.last_state = pointer<T>(last_state);
    p.chunk_states = save_chunk_states ? pointer<T>(chunk_states) : nullptr;
    out = {y, last_state, chunk_states};
    if (u.numel() == 0) return;
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
    if (uses_cuda_kernels(u)) {
      check_launch_limits(p);
      const DeviceGuard guard(u);
      check_launch(selective_scan_forward_cuda<In>(p, stream_for(u)));
      return;
    }
#endif
#ifndef MINIJAMBA_CUDA_EMULATED  // that build has no CPU twin: every tensor went to the kernels above
    if constexpr (std::is_same_v<T, In>) selective_scan_forward_cpu(p);
#endif
  });
  return out;
}

// Gradients of (u, delta, A, B, C, D, z, delta_bias, initial_state); None where the input was None. Each has its
// input's dtype.
std::vector<OptionalTensor> backward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                     const Tensor& C, const OptionalTensor& D, const OptionalTensor& z,
                                     const OptionalTensor& delta_bias, const OptionalTensor& initial_state,
                                     bool delta_softplus, const Tensor& chunk_states, const Tensor& grad_y,
                                     const OptionalTensor& grad_last_state) {
  check_u(u);
  const OptionalTensor delta_ = delta, A_ = A, B_ = B, C_ = C, chunk_states_ = chunk_states, grad_y_ = grad_y;
  check_tensors(u, {{"delta", &delta_}, {"B", &B_}, {"C", &C_}, {"z", &z}, {"grad_y", &grad_y_}},
               {{"A", &A_}, {"D", &D}, {"delta_bias", &delta_bias}, {"initial_state", &initial_state},
                {"chunk_states", &chunk_states_}, {"grad_last_state", &grad_last_state}});
  if (is_16_bit(u) && !uses_cuda_kernels(u)) {  // widened for the CPU twin as in forward, gradients rounded back
    const at::ScalarType dtype = u.scalar_type();
    std::vector<OptionalTensor> grads =
        backward(u.to(at::kFloat), delta.to(at::kFloat), A, B.to(at::kFloat), C.to(at::kFloat), D, widened(z),
                 delta_bias, initial_state, delta_softplus, chunk_states, grad_y.to(at::kFloat), grad_last_state);
    for (const int i : {0, 1, 3, 4, 6}) grads[i] = narrowed(grads[i], dtype);  // u, delta, B, C, z
    return grads;
  }
  std::vector<OptionalTensor> grads;
  dispatch(u, [&](auto types) {
    using T = typename decltype(types)::T;
    using In = typename decltype(types)::In;
    Inputs<T, In> inputs =
        input_args<T, In>(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_for(u));
    ScanArgs<T, In>& p = inputs.p;
    check_like_state(chunk_states, "chunk_states", u);
    check_shape(chunk_states, "chunk_states", {p.batch, p.dim, p.n_chunks, p.d_state});
    check_like_u(grad_y, "grad_y", u);
    check_shape(grad_y, "grad_y", u.sizes());
    p.chunk_states = pointer<T>(chunk_states);
    p.grad_y = pointer<const In>(grad_y);
    if (grad_last_state.has_value()) {
      check_like_state(*grad_last_state, "grad_last_state", u);
      check_shape(*grad_last_state, "grad_last_state", {p.batch, p.dim, p.d_state});
      p.grad_last_state = pointer<const T>(*grad_last_state);
    }

    // The gradients that sum over channels or batch come in copies, summed below. The CPU twin gives each task
    // its own zeroed copy. The CUDA kernels write one copy per batch element, each slot once (the
    // time-invariant ones), or add into one zeroed copy with atomics (a selective or grouped B, C, shaped like
    // the padded inputs.B, inputs.C: see selective_scan.h). All of them are in the compute type, and rounded to
    // B's and C's dtype once summed.
    const auto states = u.options().dtype(state_dtype(u));
    const bool on_cuda = uses_cuda_kernels(u);
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.batch * p.dim));
    const auto copies = [&](const Tensor& like, bool per_block) {
      std::vector<int64_t> shape{on_cuda ? (per_block ? p.batch : 1) : tasks};
      shape.insert(shape.end(), like.sizes().begin(), like.sizes().end());
      return on_cuda && per_block ? new_output(states, shape) : at::zeros(shape, states);
    };
    const Tensor grad_u = output_like(u), grad_delta = output_like(u);
    const Tensor grad_A = copies(A, true), grad_B = copies(inputs.B, B.dim() == 2);
    const Tensor grad_C = copies(inputs.C, C.dim() == 2);
    const OptionalTensor grad_D = D ? OptionalTensor(copies(*D, true)) : std::nullopt;
    const OptionalTensor grad_z = z ? OptionalTensor(output_like(u)) : std::nullopt;
    const OptionalTensor grad_bias = delta_bias ? OptionalTensor(copies(*delta_bias, true)) : std::nullopt;
    const OptionalTensor grad_initial = initial_state ? OptionalTensor(output_like(*initial_state)) : std::nullopt;
    const auto ptr_in = [](const OptionalTensor& t) { return t ? pointer<In>(*t) : nullptr; };
    const auto ptr_t = [](const OptionalTensor& t) { return t ? pointer<T>(*t) : nullptr; };
    p.grad_u = pointer<In>(grad_u), p.grad_delta = pointer<In>(grad_delta), p.grad_z = ptr_in(grad_z);
    p.grad_A = pointer<T>(grad_A), p.grad_B = pointer<T>(grad_B), p.grad_C = pointer<T>(grad_C);
    p.grad_D = ptr_t(grad_D), p.grad_delta_bias = ptr_t(grad_bias), p.grad_initial_state = ptr_t(grad_initial);
    if (u.numel() > 0) {
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
      if (on_cuda) {
        check_launch_limits(p);
        const DeviceGuard guard(u);
        check_launch(selective_scan_backward_cuda<In>(p, stream_for(u)));
      }
#endif
#ifndef MINIJAMBA_CUDA_EMULATED
      if constexpr (std::is_same_v<T, In>) {
        if (!on_cuda) selective_scan_backward_cpu(p, tasks);
      }
#endif
    }
    const auto summed = [](const OptionalTensor& t) { return t ? OptionalTensor(t->sum(0)) : std::nullopt; };
    const auto matrix_grad = [&](const Tensor& copies, const Tensor& M) {  // M's layout and dtype, no padding
      const Tensor sum = step_major(M, u) ? copies.sum(0).transpose(-1, -2) : copies.sum(0).narrow(-1, 0, M.size(-1));
      return OptionalTensor(sum.contiguous().to(M.scalar_type()));
    };
    grads = {grad_u,         grad_delta, summed(grad_A), matrix_grad(grad_B, B), matrix_grad(grad_C, C),
             summed(grad_D), grad_z,     summed(grad_bias), grad_initial};
  });
  return grads;
}

#ifndef MINIJAMBA_CUDA_EMULATED
// The Mamba block's conv + SiLU on the CPU (causal_conv_cpu.cpp): x (batch, L, dim) channels-last with unit stride
// along dim (the in_proj output's slice), weight (dim, K), bias (dim,) or None, prefix (batch, dim, K - 1) or None
// (the cached inputs before x; None: zeros) -> silu(conv) as (batch, dim, L), contiguous.
void check_conv(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, const OptionalTensor& prefix) {
  TORCH_CHECK(x.defined() && x.dim() == 3, "x must have shape (batch, L, dim), got ",
              x.defined() ? shape_of(x) : "None");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.is_cpu(), "x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) <= 1, "x must have unit stride along dim (channels-last), got strides ",
              c10::str(x.strides()));
  const int64_t batch = x.size(0), dim = x.size(2);
  const OptionalTensor weight_ = weight;
  for (const auto& [name, t] : {std::pair{"weight", &weight_}, {"bias", &bias}, {"prefix", &prefix}}) {
    if (!t->has_value()) continue;
    const Tensor& v = **t;
    TORCH_CHECK(v.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
                v.scalar_type());
    TORCH_CHECK(v.is_cpu(), name, " must be on the CPU, got ", v.device());
    TORCH_CHECK(v.is_contiguous(), name, " must be contiguous");
  }
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == dim && weight.size(1) >= 1, "weight must have shape (dim=", dim,
              ", d_conv >= 1), got ", shape_of(weight));
  if (bias) check_shape(*bias, "bias", {dim});
  if (prefix) check_shape(*prefix, "prefix", {batch, dim, weight.size(1) - 1});
}

template <typename T>
ConvArgs<T> conv_args(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, const OptionalTensor& prefix) {
  ConvArgs<T> p{};
  p.batch = x.size(0), p.length = x.size(1), p.dim = x.size(2), p.d_conv = weight.size(1);
  p.x_batch_stride = x.stride(0), p.x_step_stride = x.stride(1);
  p.x = pointer<const T>(x), p.weight = pointer<const T>(weight);
  p.bias = bias ? pointer<const T>(*bias) : nullptr, p.prefix = prefix ? pointer<const T>(*prefix) : nullptr;
  return p;
}

Tensor conv_forward(const Tensor& x, const Tensor& weight, const OptionalTensor& bias, const OptionalTensor& prefix) {
  check_conv(x, weight, bias, prefix);
  const Tensor out = at::empty({x.size(0), x.size(2), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward", [&] {
    ConvArgs<scalar_t> p = conv_args<scalar_t>(x, weight, bias, prefix);
    p.out = pointer<scalar_t>(out);
    causal_conv_silu_forward_cpu(p);
  });
  return out;
}

// Gradients of (x as (batch, L, dim) contiguous, weight, bias or None, prefix or None) for grad_out (batch, dim, L).
std::vector<OptionalTensor> conv_backward(const Tensor& x, const Tensor& weight, const OptionalTensor& bias,
                                          const OptionalTensor& prefix, const Tensor& grad_out) {
  check_conv(x, weight, bias, prefix);
  TORCH_CHECK(grad_out.defined() && grad_out.scalar_type() == x.scalar_type() && grad_out.is_cpu() &&
                  grad_out.is_contiguous(),
              "grad_out must be a contiguous CPU tensor of x's dtype ", x.scalar_type());
  check_shape(grad_out, "grad_out", {x.size(0), x.size(2), x.size(1)});
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), x.size(0)));
  const Tensor grad_x = at::zeros({x.size(0), x.size(1), x.size(2)}, x.options());
  const Tensor grad_weight = at::zeros({tasks, weight.size(0), weight.size(1)}, x.options());
  const Tensor grad_bias = at::zeros({tasks, x.size(2)}, x.options());
  const OptionalTensor grad_prefix = prefix ? OptionalTensor(at::zeros_like(*prefix)) : std::nullopt;
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_backward", [&] {
      ConvArgs<scalar_t> p = conv_args<scalar_t>(x, weight, bias, prefix);
      p.grad_out = pointer<const scalar_t>(grad_out), p.grad_x = pointer<scalar_t>(grad_x);
      p.grad_prefix = grad_prefix ? pointer<scalar_t>(*grad_prefix) : nullptr;
      p.grad_weight = pointer<scalar_t>(grad_weight), p.grad_bias = pointer<scalar_t>(grad_bias);
      causal_conv_silu_backward_cpu(p, tasks);
    });
  }
  return {grad_x, grad_weight.sum(0), bias ? OptionalTensor(grad_bias.sum(0)) : std::nullopt, grad_prefix};
}
#endif

// cpu_math.h's exp or log1p ("exp" or "log1p") on a float32 CPU tensor, so the tests can measure its error.
Tensor cpu_math_float32(const Tensor& x, const std::string& function) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu() && x.is_contiguous(),
              "x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(function == "exp" || function == "log1p", "function must be 'exp' or 'log1p', got '", function, "'");
  float (*f)(float) = function == "exp" ? exp_float : log1p_float;
  Tensor out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  float* result = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) result[i] = f(in[i]);
  return out;
}

}  // namespace
}  // namespace minijamba

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "The fused selective scan (minijamba/cuda): forward and backward, CPU twin and CUDA kernels.";
  m.def("forward", &minijamba::forward, "y, last_state, chunk_states", py::arg("u"), py::arg("delta"), py::arg("A"),
        py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("initial_state"),
        py::arg("delta_softplus"), py::arg("save_chunk_states"));
  m.def("backward", &minijamba::backward, "gradients of u, delta, A, B, C, D, z, delta_bias, initial_state",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("initial_state"), py::arg("delta_softplus"), py::arg("chunk_states"),
        py::arg("grad_y"), py::arg("grad_last_state"));
#ifdef MINIJAMBA_CUDA_EMULATED
  m.def("set_schedule", &mj_emu::set_schedule,
        "the order in which the emulator runs a block's threads from now on (see cuda/emulator/cuda_emulator.h)",
        py::arg("name"), py::arg("seed") = 0);
  m.def("schedules", &mj_emu::schedules, "the names set_schedule takes");
#endif
#ifndef MINIJAMBA_CUDA_EMULATED
  m.def(
      "scan_floor",
      [](int64_t steps, int64_t d_state, int64_t tasks) {
        TORCH_CHECK(steps >= 1 && d_state >= 1 && tasks >= 1, "steps, d_state and tasks must be >= 1");
        return minijamba::selective_scan_floor_cpu(steps, d_state, tasks);
      },
      "the CPU twin's compute floor, run for timing (bench scan)", py::arg("steps"), py::arg("d_state"),
      py::arg("tasks"));
  m.def("conv_forward", &minijamba::conv_forward, "silu(causal depthwise conv) as (batch, dim, L)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("prefix"));
  m.def("conv_backward", &minijamba::conv_backward, "gradients of x, weight, bias, prefix", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("prefix"), py::arg("grad_out"));
#endif
  m.def("cpu_math_float32", &minijamba::cpu_math_float32, "cpu_math.h's exp or log1p, elementwise (for their tests)",
        py::arg("x"), py::arg("function"));
}
