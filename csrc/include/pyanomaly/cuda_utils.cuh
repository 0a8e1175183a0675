// Small helpers shared by the .cu files: CUDA headers only, so nvcc compiles them anywhere.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pyanomaly/dtype.h"

namespace pyanomaly {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

// Host side: calls fn(T{}) with T the element type named by t (uint8 only when kAllowUInt8, so
// floating-only kernels are never instantiated for it) and returns its result; an element type not
// allowed gives cudaErrorInvalidValue.
template <bool kAllowUInt8, typename Fn>
cudaError_t dispatch_elem_type(ElemType t, Fn&& fn) {
  switch (t) {
    case ElemType::kUInt8:
      if constexpr (kAllowUInt8) {
        return fn(uint8_t{});
      } else {
        return cudaErrorInvalidValue;
      }
    case ElemType::kHalf:
      return fn(__half{});
    case ElemType::kBFloat16:
      return fn(__nv_bfloat16{});
    case ElemType::kFloat:
      return fn(float{});
    case ElemType::kDouble:
      return fn(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyanomaly
