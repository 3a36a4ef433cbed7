// Element conversions and 16-byte vector access shared by the kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#ifndef __CUDA_ARCH__
#include <string.h>
#endif

namespace dropfuse {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  __device__ __forceinline__ static float to_f32(float v) { return v; }
  __device__ __forceinline__ static float from_f32(float v) { return v; }
  template <int V>
  __device__ __forceinline__ static void from_f32(const float (&f)[V], float (&out)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = f[j];
  }
};
template <>
struct Elem<__half> {
  __device__ __forceinline__ static float to_f32(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_f32(float v) { return __float2half_rn(v); }
  // Pairs: one packed conversion (F2FP) rounds two values.
  template <int V>
  __device__ __forceinline__ static void from_f32(const float (&f)[V], __half (&out)[V]) {
    static_assert(V % 2 == 0, "pairs");
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      const __half2 h = __floats2half2_rn(f[j], f[j + 1]);
      out[j] = __low2half(h);
      out[j + 1] = __high2half(h);
    }
  }
};
template <>
struct Elem<__nv_bfloat16> {
  // bf16 -> f32 is the bits shifted up by 16. Written as a shift, the compiler puts it on the
  // multiply pipe (IMAD.SHL / IMAD.U32); Philox's XORs keep the integer ALU pipe busier (Nsight
  // Compute on an H200: ALU the most used pipe), and a byte permute there measured 4-5% slower.
  __device__ __forceinline__ static float to_f32(__nv_bfloat16 v) {
    return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);
  }
  __device__ __forceinline__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
  template <int V>
  __device__ __forceinline__ static void from_f32(const float (&f)[V], __nv_bfloat16 (&out)[V]) {
    static_assert(V % 2 == 0, "pairs");
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(f[j], f[j + 1]);
      out[j] = __low2bfloat16(h);
      out[j + 1] = __high2bfloat16(h);
    }
  }
};

// Elements per 16-byte vector.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// Tuning knob (DROPFUSE_NVCC_FLAGS=-DDROPFUSE_STREAMING=1): evict-first cache hints on the 16-byte
// data accesses (ld/st.global.cs), for measuring whether they help a single streaming pass.
#ifndef DROPFUSE_STREAMING
#define DROPFUSE_STREAMING 0
#endif

#ifndef __CUDA_ARCH__
// Host C++ (the CPU emulation of tests/host_emu compiles the kernels as host code): the 16-byte
// accesses below read and write the elements with memcpy instead of through a uint4 lvalue, which
// would be type punning (undefined behaviour in C++: the elements are T objects). A misaligned
// vector address stops the program, as the GPU's misaligned-address fault would. The device
// code (the __CUDA_ARCH__ branches) is untouched.
__host__ __device__ inline void host_vec_check(const void *p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) __builtin_trap();
}
#endif

// V elements: one 16-byte access when VEC (pointer 16-byte aligned), V scalar accesses otherwise.
template <typename T, int V, bool VEC>
__device__ __forceinline__ void load_elems(const T *p, T (&out)[V]) {
  if constexpr (VEC) {
    static_assert(V * sizeof(T) == 16, "vector access is 16 bytes");
#ifdef __CUDA_ARCH__
#if DROPFUSE_STREAMING
    const uint4 raw = __ldcs(reinterpret_cast<const uint4 *>(p));
#else
    const uint4 raw = *reinterpret_cast<const uint4 *>(p);
#endif
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = e[j];
#else  // host C++
    host_vec_check(p);
    memcpy(out, p, 16);
#endif  // __CUDA_ARCH__
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = p[j];
  }
}

template <typename T, int V, bool VEC>
__device__ __forceinline__ void store_elems(T *p, const T (&in)[V]) {
  if constexpr (VEC) {
    static_assert(V * sizeof(T) == 16, "vector access is 16 bytes");
#ifdef __CUDA_ARCH__
    uint4 raw;
    T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = in[j];
#if DROPFUSE_STREAMING
    __stcs(reinterpret_cast<uint4 *>(p), raw);
#else
    *reinterpret_cast<uint4 *>(p) = raw;
#endif
#else  // host C++
    host_vec_check(p);
    memcpy(p, in, 16);
#endif  // __CUDA_ARCH__
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = in[j];
  }
}

}  // namespace dropfuse
