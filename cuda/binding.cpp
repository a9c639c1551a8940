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

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

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

Tensor new_output(const Tensor& like, at::IntArrayRef shape) {
#ifdef MINIJAMBA_CUDA_EMULATED
  return like.new_full(shape, std::numeric_limits<double>::quiet_NaN());
#else
  return like.new_empty(shape);
#endif
}
using OptionalTensor = std::optional<Tensor>;

std::string shape_of(const Tensor& t) { return c10::str(t.sizes()); }

void check_like_u(const Tensor& t, const char* name, const Tensor& u) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.scalar_type() == u.scalar_type(), name, " must have u's dtype ", u.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == u.device(), name, " must be on u's device ", u.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", shape_of(t));
}

// B or C: its layout as a MatrixView (see scan_op.h), after checking it is one of the three shapes.
MatrixView matrix_view(const Tensor& M, const char* name, int64_t batch, int64_t dim, int64_t N, int64_t L) {
  const bool invariant = M.dim() == 2 && M.size(0) == dim && M.size(1) == N;
  const bool selective = M.dim() == 3 && M.size(0) == batch && M.size(1) == N && M.size(2) == L;
  const bool grouped = M.dim() == 4 && M.size(0) == batch && M.size(1) >= 1 && dim % M.size(1) == 0 &&
                       M.size(2) == N && M.size(3) == L;
  TORCH_CHECK(invariant || selective || grouped, name, " must be (dim, N)=(", dim, ", ", N,
              ") time-invariant, (batch, N, L)=(", batch, ", ", N, ", ", L,
              ") selective, or (batch, groups, N, L) with groups dividing dim=", dim, "; got ", shape_of(M));
  if (invariant) return {0, N, 1, 0, 1, M.numel()};
  const int64_t groups = grouped ? M.size(1) : 1;
  return {groups * N * L, N * L, L, 1, dim / groups, M.numel()};
}

// Checks every input and returns ScanArgs with the input pointers and sizes filled in.
template <typename T>
ScanArgs<T> input_args(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                       const OptionalTensor& D, const OptionalTensor& z, const OptionalTensor& delta_bias,
                       const OptionalTensor& initial_state, bool delta_softplus, int64_t chunk) {
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.dim() == 2 ? A.size(1) : 0;
  check_like_u(delta, "delta", u);
  check_shape(delta, "delta", u.sizes());
  check_like_u(A, "A", u);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && N >= 1, "A must have shape (dim=", dim, ", N >= 1), got ",
              shape_of(A));
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
  TORCH_CHECK(!uses_cuda_kernels(u) || N <= kCudaMaxState, "A must have N <= ", kCudaMaxState,
              " on the CUDA kernels, got N=", N);
#endif
  check_like_u(B, "B", u);
  check_like_u(C, "C", u);
  ScanArgs<T> p{};
  p.B_view = matrix_view(B, "B", batch, dim, N, L);
  p.C_view = matrix_view(C, "C", batch, dim, N, L);
  const auto optional = [&](const OptionalTensor& t, const char* name, at::IntArrayRef shape) -> const T* {
    if (!t.has_value()) return nullptr;
    check_like_u(*t, name, u);
    check_shape(*t, name, shape);
    return t->data_ptr<T>();
  };
  p.D = optional(D, "D", {dim});
  p.z = optional(z, "z", u.sizes());
  p.delta_bias = optional(delta_bias, "delta_bias", {dim});
  p.initial_state = optional(initial_state, "initial_state", {batch, dim, N});
  p.batch = batch, p.dim = dim, p.length = L, p.d_state = N;
  p.chunk = chunk, p.n_chunks = (L + chunk - 1) / chunk;
  p.delta_softplus = delta_softplus;
  p.u = u.data_ptr<T>(), p.delta = delta.data_ptr<T>(), p.A = A.data_ptr<T>();
  p.B = B.data_ptr<T>(), p.C = C.data_ptr<T>();
  return p;
}

void check_u(const Tensor& u) {
  TORCH_CHECK(u.defined(), "u must be a tensor");
  TORCH_CHECK(u.dim() == 3 && u.size(2) >= 1, "u must have shape (batch, dim, L) with L >= 1, got ", shape_of(u));
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, "u must be float32 or float64, got ",
              u.scalar_type());
  TORCH_CHECK(u.is_contiguous(), "u must be contiguous");
#if defined(MINIJAMBA_WITH_CUDA)
  TORCH_CHECK(u.is_cpu() || u.is_cuda(), "u must be on the CPU or a CUDA device, got ", u.device());
#elif defined(MINIJAMBA_CUDA_EMULATED)
  TORCH_CHECK(u.is_cpu(), "u must be on the CPU (the emulated CUDA kernels run there), got ", u.device());
#else
  TORCH_CHECK(u.is_cpu(), "u must be on the CPU (this build has no CUDA kernels), got ", u.device());
#endif
}

int64_t chunk_for(const Tensor& u) {
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
  if (uses_cuda_kernels(u)) return kCudaChunk;
#endif
  return kCpuChunk;
}

#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
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
// (batch, dim, ceil(L / chunk), N).
std::vector<Tensor> forward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                            const OptionalTensor& D, const OptionalTensor& z, const OptionalTensor& delta_bias,
                            const OptionalTensor& initial_state, bool delta_softplus, bool save_chunk_states) {
  check_u(u);
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    auto p = input_args<scalar_t>(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_for(u));
    const Tensor y = output_like(u), last_state = new_output(u, {p.batch, p.dim, p.d_state});
    const Tensor chunk_states = save_chunk_states ? new_output(u, {p.batch, p.dim, p.n_chunks, p.d_state})
                                                  : u.new_empty({0});
    p.y = y.data_ptr<scalar_t>(), p.last_state = last_state.data_ptr<scalar_t>();
    p.chunk_states = save_chunk_states ? chunk_states.data_ptr<scalar_t>() : nullptr;
    out = {y, last_state, chunk_states};
    if (u.numel() == 0) return;
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
    if (uses_cuda_kernels(u)) {
      const DeviceGuard guard(u);
      check_launch(selective_scan_forward_cuda(p, stream_for(u)));
      return;
    }
#endif
#ifndef MINIJAMBA_CUDA_EMULATED  // that build has no CPU twin: every tensor went to the kernels above
    selective_scan_forward_cpu(p);
#endif
  });
  return out;
}

// Gradients of (u, delta, A, B, C, D, z, delta_bias, initial_state); None where the input was None.
std::vector<OptionalTensor> backward(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                     const Tensor& C, const OptionalTensor& D, const OptionalTensor& z,
                                     const OptionalTensor& delta_bias, const OptionalTensor& initial_state,
                                     bool delta_softplus, const Tensor& chunk_states, const Tensor& grad_y,
                                     const OptionalTensor& grad_last_state) {
  check_u(u);
  std::vector<OptionalTensor> grads;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    auto p = input_args<scalar_t>(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk_for(u));
    check_like_u(chunk_states, "chunk_states", u);
    check_shape(chunk_states, "chunk_states", {p.batch, p.dim, p.n_chunks, p.d_state});
    check_like_u(grad_y, "grad_y", u);
    check_shape(grad_y, "grad_y", u.sizes());
    p.chunk_states = chunk_states.data_ptr<scalar_t>();
    p.grad_y = grad_y.data_ptr<scalar_t>();
    if (grad_last_state.has_value()) {
      check_like_u(*grad_last_state, "grad_last_state", u);
      check_shape(*grad_last_state, "grad_last_state", {p.batch, p.dim, p.d_state});
      p.grad_last_state = grad_last_state->data_ptr<scalar_t>();
    }

    // The CPU twin gives each task its own copy of the gradients that sum over channels or batch; CUDA adds
    // into a single zeroed copy with atomics.
    int64_t copies = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.batch * p.dim));
    if (uses_cuda_kernels(u)) copies = 1;
    const auto shared = [&](const Tensor& like) {
      std::vector<int64_t> shape{copies};
      shape.insert(shape.end(), like.sizes().begin(), like.sizes().end());
      return at::zeros(shape, like.options());
    };
    const Tensor grad_u = output_like(u), grad_delta = output_like(u);
    const Tensor grad_A = shared(A), grad_B = shared(B), grad_C = shared(C);
    const OptionalTensor grad_D = D ? OptionalTensor(shared(*D)) : std::nullopt;
    const OptionalTensor grad_z = z ? OptionalTensor(output_like(u)) : std::nullopt;
    const OptionalTensor grad_bias = delta_bias ? OptionalTensor(shared(*delta_bias)) : std::nullopt;
    const OptionalTensor grad_initial = initial_state ? OptionalTensor(output_like(*initial_state)) : std::nullopt;
    const auto ptr = [](const OptionalTensor& t) { return t ? t->data_ptr<scalar_t>() : nullptr; };
    p.grad_u = grad_u.data_ptr<scalar_t>(), p.grad_delta = grad_delta.data_ptr<scalar_t>();
    p.grad_A = grad_A.data_ptr<scalar_t>(), p.grad_B = grad_B.data_ptr<scalar_t>();
    p.grad_C = grad_C.data_ptr<scalar_t>(), p.grad_D = ptr(grad_D), p.grad_z = ptr(grad_z);
    p.grad_delta_bias = ptr(grad_bias), p.grad_initial_state = ptr(grad_initial);
    if (u.numel() > 0) {
#if defined(MINIJAMBA_WITH_CUDA) || defined(MINIJAMBA_CUDA_EMULATED)
      if (uses_cuda_kernels(u)) {
        const DeviceGuard guard(u);
        check_launch(selective_scan_backward_cuda(p, stream_for(u)));
      }
#endif
#ifndef MINIJAMBA_CUDA_EMULATED
      if (!uses_cuda_kernels(u)) selective_scan_backward_cpu(p, copies);
#endif
    }
    const auto summed = [](const OptionalTensor& t) { return t ? OptionalTensor(t->sum(0)) : std::nullopt; };
    grads = {grad_u, grad_delta, summed(grad_A), summed(grad_B), summed(grad_C), summed(grad_D), grad_z,
             summed(grad_bias), grad_initial};
  });
  return grads;
}

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
  m.def("cpu_math_float32", &minijamba::cpu_math_float32, "cpu_math.h's exp or log1p, elementwise (for their tests)",
        py::arg("x"), py::arg("function"));
}
