// CUDA's small vector types for the emulator (cuda/emulator/): plain structs with CUDA's sizes and alignments.
//
// On a GPU, float4 is 16-byte aligned so that one thread can load it with a single 128-bit instruction; the
// alignments below are CUDA's, so that a kernel which casts a pointer to float4* must respect them here too
// (UBSan's alignment check, in `make cuda-emulated-asan`, reports a misaligned one). Host-safe: no macros, so
// it can follow torch's headers. dim3 is the launch configuration's type; uint3 the type of threadIdx/blockIdx.
#pragma once

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 is one 128-bit load");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 is one 64-bit load");

inline constexpr float2 make_float2(float x, float y) { return {x, y}; }
inline constexpr float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline constexpr double2 make_double2(double x, double y) { return {x, y}; }
inline constexpr int2 make_int2(int x, int y) { return {x, y}; }
inline constexpr int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline constexpr uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline constexpr uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return {x, y, z, w};
}
