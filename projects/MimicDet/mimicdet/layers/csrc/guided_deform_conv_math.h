// Per-element arithmetic of deformable convolution, shared by the CPU and CUDA kernels so that
// the CPU tests exercise exactly the sampling and gradient math the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MIMICDET_HD __host__ __device__
#else
#define MIMICDET_HD
#endif

namespace mimicdet {

// Size of a convolution output along one axis; <= 0 means the kernel does not fit.
MIMICDET_HD inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                         int64_t dilation) {
  return (in + 2 * pad - (dilation * (kernel - 1) + 1)) / stride + 1;
}

// Input coordinate sampled by output index `out` and kernel tap `tap` after adding `offset`.
template <typename T>
MIMICDET_HD inline T sample_coord(int64_t out, int64_t stride, int64_t pad, int64_t tap,
                                  int64_t dilation, T offset) {
  return static_cast<T>(out * stride - pad + tap * dilation) + offset;
}

// A bilinear sample location: top-left corner (h_low, w_low) and fractional parts (lh, lw).
// `inside` is false when the point lies so far out that all four corners are outside the
// image; such a sample is zero and has zero gradient (the torchvision convention).
template <typename T>
struct BilinearPoint {
  int h_low;
  int w_low;
  T lh;
  T lw;
  bool inside;
};

template <typename T>
MIMICDET_HD inline BilinearPoint<T> bilinear_point(T h, T w, int height, int width) {
  BilinearPoint<T> pt;
  // Written as a positive test so NaN coordinates count as outside (no undefined int cast).
  pt.inside = h > T(-1) && h < T(height) && w > T(-1) && w < T(width);
  if (!pt.inside) {
    pt.h_low = -1;
    pt.w_low = -1;
    pt.lh = T(0);
    pt.lw = T(0);
    return pt;
  }
  const T hf = floor(h);
  const T wf = floor(w);
  pt.h_low = static_cast<int>(hf);
  pt.w_low = static_cast<int>(wf);
  pt.lh = h - hf;
  pt.lw = w - wf;
  return pt;
}

// Corner order used everywhere: 0 = (h_low, w_low), 1 = (h_low, w_low + 1),
// 2 = (h_low + 1, w_low), 3 = (h_low + 1, w_low + 1).
template <typename T>
MIMICDET_HD inline bool corner_in_image(const BilinearPoint<T>& pt, int corner, int height,
                                        int width) {
  const int h = pt.h_low + (corner >> 1);
  const int w = pt.w_low + (corner & 1);
  return pt.inside && h >= 0 && h < height && w >= 0 && w < width;
}

// Flat index of a corner in an unpadded (height x width) plane; valid only if corner_in_image.
template <typename T>
MIMICDET_HD inline int64_t corner_index(const BilinearPoint<T>& pt, int corner, int width) {
  return static_cast<int64_t>(pt.h_low + (corner >> 1)) * width + pt.w_low + (corner & 1);
}

// Bilinear weights of the four corners; they are also d(sample)/d(corner value).
template <typename T>
MIMICDET_HD inline void bilinear_weights(const BilinearPoint<T>& pt, T wt[4]) {
  const T hh = pt.inside ? T(1) - pt.lh : T(0);
  const T lh = pt.inside ? pt.lh : T(0);
  const T hw = T(1) - pt.lw;
  wt[0] = hh * hw;
  wt[1] = hh * pt.lw;
  wt[2] = lh * hw;
  wt[3] = lh * pt.lw;
}

// Sample value from the four corner values (corners outside the image must be passed as 0).
template <typename T>
MIMICDET_HD inline T bilinear_interp(const T wt[4], const T v[4]) {
  return wt[0] * v[0] + wt[1] * v[1] + wt[2] * v[2] + wt[3] * v[3];
}

// d(sample)/dh and d(sample)/dw from the corner values (outside corners passed as 0). Linear in
// v, so passing per-corner sums over channels of grad * value gives the summed gradient.
template <typename T>
MIMICDET_HD inline void bilinear_coord_grad(const BilinearPoint<T>& pt, const T v[4], T& dh,
                                            T& dw) {
  if (!pt.inside) {
    dh = T(0);
    dw = T(0);
    return;
  }
  dh = (T(1) - pt.lw) * (v[2] - v[0]) + pt.lw * (v[3] - v[1]);
  dw = (T(1) - pt.lh) * (v[1] - v[0]) + pt.lh * (v[3] - v[2]);
}

}  // namespace mimicdet
