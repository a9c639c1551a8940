// Finding a kernel's __shared__ variables, so that the emulator can fill them with NaN before every block.
//
// Under the emulator `__shared__` is `static`: a kernel's shared arrays are function-local statics. Nothing in C++
// lists a function's statics, and GCC ignores section attributes on statics inside templates (so they cannot
// be gathered in a section of their own), but the shared library's ELF symbol table names every one of them:
// a static `carry` of the function whose mangled name is _ZN...forward_kernel...E is the object symbol
// _ZZN...forward_kernel...E5carry. This reads the symbol table of the file the kernel was loaded from, finds the
// kernel's own name by its address, and takes every writable zero-initialized (.bss) object named
// _ZZ<kernel>E...: the __shared__ variables declared in the kernel's body. (Those of a __device__ function it
// calls are per block too, but not found: nothing in the symbol table says which kernel calls which function.)
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#pragma GCC visibility push(hidden)
namespace mj_emu {
namespace detail {

struct SharedVariable {
  void* address;
  size_t size;
};

struct KernelSymbols {
  std::string name;                     // demangled, "minijamba::(anonymous namespace)::forward_kernel<double>(...)"
  std::vector<SharedVariable> shared;  // the __shared__ variables, by address
  std::string problem;                  // why they could not be found (then `shared` is empty), or ""
};

// The kernel whose code is at `kernel`.
KernelSymbols find_kernel_symbols(const void* kernel);

}  // namespace detail
}  // namespace mj_emu
#pragma GCC visibility pop
