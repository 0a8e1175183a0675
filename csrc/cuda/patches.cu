// CUDA kernels of the patch ops. extract_patches: one thread per output element (consecutive threads
// write consecutive px), reading uint8/half/bf16/float/double images through their strides.
// Its backward: one thread per input pixel, a gather over the patch elements that read it.
// fold_patches: one thread per output pixel; its backward: one warp per patch value, reduced in a
// fixed order. No atomics: every result is deterministic.
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "pyanomaly/cuda_utils.cuh"
#include "pyanomaly/patches_params.h"

namespace pyanomaly {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 22;  // the loops are grid-strided beyond this

template <typename... T>
using acc_for = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

__device__ __forceinline__ float widen(uint8_t v) { return static_cast<float>(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load(const T* p) {
  return static_cast<acc_t>(widen(*p));
}

template <typename T, typename A>
__device__ __forceinline__ T narrow(A v) {
  if constexpr (std::is_same_v<T, __half>) {
    if constexpr (std::is_same_v<A, double>) return __double2half(v);
    else return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if constexpr (std::is_same_v<A, double>) return __double2bfloat16(v);
    else return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

// Smallest i with i * stride + size > y (the first window of extent size that covers y).
__device__ __forceinline__ int64_t first_covering(int64_t y, int64_t size, int64_t stride) {
  return y - size + 1 <= 0 ? 0 : (y - size + stride) / stride;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

unsigned int blocks_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

__device__ __forceinline__ int64_t thread_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename in_t, typename out_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    extract_patches_kernel(const __grid_constant__ ExtractPatchesParams p, int64_t numel) {
  using acc_t = acc_for<out_t>;
  const PatchGeometry& g = p.geo;
  const in_t* images = static_cast<const in_t*>(p.images);
  out_t* out = static_cast<out_t*>(p.out);
  const index_t pw = g.pw, ph = g.ph, cs = g.out_channels, n2w = g.n2w, n2h = g.n2h, n1w = g.n1w, n1h = g.n1h;
  for (int64_t idx = thread_index(); idx < numel; idx += thread_count()) {
    index_t t = static_cast<index_t>(idx);  // idx = (b, i1, j1, i2, j2, c, py, px)
    const index_t px = t % pw;
    t /= pw;
    const index_t py = t % ph;
    t /= ph;
    const index_t c = t % cs;
    t /= cs;
    const index_t j2 = t % n2w;
    t /= n2w;
    const index_t i2 = t % n2h;
    t /= n2h;
    const index_t j1 = t % n1w;
    t /= n1w;
    const index_t i1 = t % n1h;
    const index_t b = t / n1h;
    const int64_t y = i1 * g.s1h + i2 * g.s2h + py;
    int64_t x = j1 * g.s1w + j2 * g.s2w + px;
    if (p.hflip != nullptr && p.hflip[b]) x = g.width - 1 - x;
    const in_t* src = images + b * p.images_stride[0] + y * p.images_stride[2] + x * p.images_stride[3];
    acc_t raw;
    if (g.grayscale) {
      const int64_t sc = p.images_stride[1];
      raw = acc_t(0.299) * load<acc_t>(src) + acc_t(0.587) * load<acc_t>(src + sc) +
            acc_t(0.114) * load<acc_t>(src + 2 * sc);
    } else {
      raw = load<acc_t>(src + c * p.images_stride[1]);
    }
    const int a = p.n_affine > 1 ? static_cast<int>(c) : 0;
    out[idx] = narrow<out_t>(raw * static_cast<acc_t>(p.scale[a]) + static_cast<acc_t>(p.shift[a]));
  }
}

template <typename grad_t, typename img_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    extract_patches_backward_kernel(const __grid_constant__ ExtractPatchesBackwardParams p, int64_t numel) {
  using acc_t = acc_for<grad_t, img_t>;
  const PatchGeometry& g = p.geo;
  const grad_t* grad = static_cast<const grad_t*>(p.grad);
  img_t* grad_images = static_cast<img_t*>(p.grad_images);
  const int64_t* gs = p.grad_stride;
  const int64_t span_h = (g.n2h - 1) * g.s2h + g.ph, span_w = (g.n2w - 1) * g.s2w + g.pw;
  const index_t width = g.width, height = g.height, cs = g.out_channels;
  for (int64_t idx = thread_index(); idx < numel; idx += thread_count()) {
    index_t t = static_cast<index_t>(idx);  // idx = (b, c', y, x)
    const index_t x = t % width;
    t /= width;
    const index_t y = t % height;
    t /= height;
    const index_t c = t % cs;
    const index_t b = t / cs;
    const int64_t xo = (p.hflip != nullptr && p.hflip[b]) ? g.width - 1 - x : x;  // the column that read x
    const grad_t* base = grad + b * gs[0] + c * gs[5];
    acc_t sum = 0;
    const int64_t i1_last = min64(g.n1h - 1, y / g.s1h);
    for (int64_t i1 = first_covering(y, span_h, g.s1h); i1 <= i1_last; ++i1) {
      const int64_t ry = y - i1 * g.s1h;
      const int64_t i2_last = min64(g.n2h - 1, ry / g.s2h);
      for (int64_t i2 = first_covering(ry, g.ph, g.s2h); i2 <= i2_last; ++i2) {
        const grad_t* row = base + i1 * gs[1] + i2 * gs[3] + (ry - i2 * g.s2h) * gs[6];
        const int64_t j1_last = min64(g.n1w - 1, xo / g.s1w);
        for (int64_t j1 = first_covering(xo, span_w, g.s1w); j1 <= j1_last; ++j1) {
          const int64_t rx = xo - j1 * g.s1w;
          const int64_t j2_last = min64(g.n2w - 1, rx / g.s2w);
          for (int64_t j2 = first_covering(rx, g.pw, g.s2w); j2 <= j2_last; ++j2) {
            sum += load<acc_t>(row + j1 * gs[2] + j2 * gs[4] + (rx - j2 * g.s2w) * gs[7]);
          }
        }
      }
    }
    const double scale = p.scale[p.n_affine > 1 ? static_cast<int>(c) : 0];
    if (g.grayscale) {
      const int64_t plane = g.height * g.width;
      img_t* dst = grad_images + static_cast<int64_t>(b) * 3 * plane + static_cast<int64_t>(y) * g.width + x;
      dst[0] = narrow<img_t>(sum * static_cast<acc_t>(scale * 0.299));
      dst[plane] = narrow<img_t>(sum * static_cast<acc_t>(scale * 0.587));
      dst[2 * plane] = narrow<img_t>(sum * static_cast<acc_t>(scale * 0.114));
    } else {
      grad_images[idx] = narrow<img_t>(sum * static_cast<acc_t>(scale));  // C == C': idx is (b, c, y, x)
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fold_patches_kernel(const __grid_constant__ FoldPatchesParams p,
                                                                 int64_t numel) {
  using acc_t = acc_for<T>;
  const FoldShape& f = p.shape;
  const T* values = static_cast<const T*>(p.values);
  T* out = static_cast<T*>(p.out);
  const int64_t* vs = p.values_stride;
  for (int64_t idx = thread_index(); idx < numel; idx += thread_count()) {
    int64_t t = idx;  // idx = (b, c, y, x)
    const int64_t x = t % f.width;
    t /= f.width;
    const int64_t y = t % f.height;
    t /= f.height;
    const int64_t c = t % f.channels;
    const int64_t b = t / f.channels;
    const int64_t i_first = first_covering(y, f.size_h, f.stride_h), i_last = min64(f.nh - 1, y / f.stride_h);
    const int64_t j_first = first_covering(x, f.size_w, f.stride_w), j_last = min64(f.nw - 1, x / f.stride_w);
    const T* src = values + b * vs[0] + c * vs[3];
    acc_t sum = 0;  // summed per patch column, then across columns: the CPU kernel's order
    for (int64_t j = j_first; j <= j_last; ++j) {
      acc_t column = 0;
      for (int64_t i = i_first; i <= i_last; ++i) column += load<acc_t>(src + i * vs[1] + j * vs[2]);
      sum += column;
    }
    const int64_t ny = i_last - i_first + 1, nx = j_last - j_first + 1;
    const int64_t count = (ny > 0 && nx > 0) ? ny * nx : 0;
    out[idx] = narrow<T>(count == 0 ? acc_t(0) : (p.mean ? sum / static_cast<acc_t>(count) : sum));
  }
}

// One warp per patch value: lanes stride over the window, then a fixed-order shuffle reduction.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    fold_patches_backward_kernel(const __grid_constant__ FoldPatchesBackwardParams p, int64_t numel) {
  using acc_t = acc_for<T>;
  const FoldShape& f = p.shape;
  const T* grad = static_cast<const T*>(p.grad);
  T* grad_values = static_cast<T*>(p.grad_values);
  const int64_t* gs = p.grad_stride;
  const int lane = threadIdx.x % kWarp;
  const int64_t window = f.size_h * f.size_w;
  for (int64_t v = thread_index() / kWarp; v < numel; v += thread_count() / kWarp) {
    int64_t t = v;  // v = (b, i, j, c)
    const int64_t c = t % f.channels;
    t /= f.channels;
    const int64_t j = t % f.nw;
    t /= f.nw;
    const int64_t i = t % f.nh;
    const int64_t b = t / f.nh;
    const T* src = grad + b * gs[0] + c * gs[1];
    acc_t sum = 0;
    for (int64_t e = lane; e < window; e += kWarp) {
      const int64_t y = i * f.stride_h + e / f.size_w, x = j * f.stride_w + e % f.size_w;
      acc_t value = load<acc_t>(src + y * gs[2] + x * gs[3]);
      if (p.mean) {
        const int64_t ny = min64(f.nh - 1, y / f.stride_h) - first_covering(y, f.size_h, f.stride_h) + 1;
        const int64_t nx = min64(f.nw - 1, x / f.stride_w) - first_covering(x, f.size_w, f.stride_w) + 1;
        value /= static_cast<acc_t>(ny * nx);
      }
      sum += value;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) grad_values[v] = narrow<T>(sum);
  }
}

constexpr int64_t kInt32Max = 2147483647;

}  // namespace

cudaError_t launch_extract_patches(const ExtractPatchesParams& p, cudaStream_t stream) {
  const PatchGeometry& g = p.geo;
  const int64_t numel = g.batch * g.n1h * g.n1w * g.n2h * g.n2w * g.out_channels * g.ph * g.pw;
  if (numel == 0) return cudaSuccess;
  return cuda::dispatch_elem_type<true>(p.images_type, [&](auto in_tag) {
    using in_t = decltype(in_tag);
    return cuda::dispatch_elem_type<false>(p.out_type, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      if (numel <= kInt32Max) {
        extract_patches_kernel<in_t, out_t, uint32_t><<<blocks_for(numel), kThreads, 0, stream>>>(p, numel);
      } else {
        extract_patches_kernel<in_t, out_t, int64_t><<<blocks_for(numel), kThreads, 0, stream>>>(p, numel);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_extract_patches_backward(const ExtractPatchesBackwardParams& p, cudaStream_t stream) {
  const PatchGeometry& g = p.geo;
  const int64_t numel = g.batch * g.out_channels * g.height * g.width;
  if (numel == 0) return cudaSuccess;
  return cuda::dispatch_elem_type<false>(p.grad_type, [&](auto grad_tag) {
    using grad_t = decltype(grad_tag);
    return cuda::dispatch_elem_type<false>(p.images_type, [&](auto img_tag) {
      using img_t = decltype(img_tag);
      if (numel <= kInt32Max) {
        extract_patches_backward_kernel<grad_t, img_t, uint32_t><<<blocks_for(numel), kThreads, 0, stream>>>(p, numel);
      } else {
        extract_patches_backward_kernel<grad_t, img_t, int64_t><<<blocks_for(numel), kThreads, 0, stream>>>(p, numel);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_fold_patches(const FoldPatchesParams& p, cudaStream_t stream) {
  const int64_t numel = p.shape.batch * p.shape.channels * p.shape.height * p.shape.width;
  if (numel == 0) return cudaSuccess;
  return cuda::dispatch_elem_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    fold_patches_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(p, numel);
    return cudaGetLastError();
  });
}

cudaError_t launch_fold_patches_backward(const FoldPatchesBackwardParams& p, cudaStream_t stream) {
  const int64_t numel = p.shape.batch * p.shape.nh * p.shape.nw * p.shape.channels;
  if (numel == 0) return cudaSuccess;
  return cuda::dispatch_elem_type<false>(p.type, [&](auto tag) {
    using T = decltype(tag);
    fold_patches_backward_kernel<T><<<blocks_for(numel * kWarp), kThreads, 0, stream>>>(p, numel);
    return cudaGetLastError();
  });
}

}  // namespace pyanomaly
