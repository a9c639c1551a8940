// cuda/selective_scan.cu, unmodified, compiled as host C++ and run under CUDA's execution model on the CPU.
//
// include/cuda_runtime.h stands in for CUDA's: it defines MJ_LAUNCH (the .cu's one launch syntax) as a call into
// the emulator, before the .cu would define it as the triple chevron. cuda_emulator.h says what the emulation
// checks and what it cannot.
#include <cuda_runtime.h>

#include "../selective_scan.cu"
