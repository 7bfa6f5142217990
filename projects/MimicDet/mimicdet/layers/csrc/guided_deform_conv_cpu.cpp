// CPU kernels of mimicdet::deform_conv2d.
//
// Images are copied into a zero-bordered channels-last buffer (H + 2, W + 2, C_in) so that the
// four bilinear corners of a sample are four contiguous channel vectors and corners outside the
// image read the zero border without branches. Output positions are processed in chunks whose
// column blocks (positions x taps x C_in) take kColumnChunkBytes in total: the forward pass gives
// each thread its own chunks (build the block, one single-threaded GEMM, no barrier in between,
// which also keeps it fast when other processes compete for the cores); the backward pass builds
// one block in parallel, runs its two GEMMs and scatters its gradient over disjoint channel
// ranges.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <vector>

#include "guided_deform_conv.h"
#include "guided_deform_conv_math.h"

namespace mimicdet {
namespace {

// Bytes of column blocks alive at once: large enough for efficient GEMMs (hundreds of positions
// per block at C_in = 256, 5x5), small enough to stay in a server L3 until its GEMM reads it.
constexpr int64_t kColumnChunkBytes = 16 << 20;
// Channels per scatter block in the backward pass; fewer would make threads fight over taps.
constexpr int64_t kMinChannelsPerBlock = 16;
// Multiply-adds below which an op call stays on one thread (a barrier costs more than the work).
constexpr int64_t kMinParallelWork = 1 << 22;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The channel loops get an AVX2+FMA (x86-64-v3) clone besides the baseline one; the loader picks
// it on CPUs that have those units, so the portable build still uses them.
#define MIMICDET_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
// Forces the loop bodies into each clone, so that each is compiled for that clone's target.
#define MIMICDET_INLINE inline __attribute__((always_inline))
#else
#define MIMICDET_SIMD_CLONES
#define MIMICDET_INLINE inline
#endif

struct Geometry {
  int64_t channels, height, width, kernel_h, kernel_w, out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;

  int64_t taps() const { return kernel_h * kernel_w; }
  int64_t out_positions() const { return out_h * out_w; }
  int64_t padded_row() const { return (width + 2) * channels; }
};

Geometry make_geometry(const at::Tensor& input, const at::Tensor& weight, int64_t stride_h,
                       int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                       int64_t dilation_w) {
  Geometry g;
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.out_h = conv_out_size(g.height, g.kernel_h, stride_h, pad_h, dilation_h);
  g.out_w = conv_out_size(g.width, g.kernel_w, stride_w, pad_w, dilation_w);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.dilation_w = dilation_w;
  return g;
}

// Output positions per column block when `blocks` blocks share kColumnChunkBytes.
int64_t chunk_positions(const Geometry& g, int64_t element_size, int64_t blocks) {
  const int64_t row_bytes = std::max<int64_t>(1, g.taps() * g.channels) * element_size;
  return std::clamp<int64_t>(kColumnChunkBytes / blocks / row_bytes, 1, g.out_positions());
}

// pts[p * taps + k] = sample point of tap k at output position p0 + p of one image, for p in
// [begin, end).
template <typename T>
void compute_points(const Geometry& g, const T* offset, int64_t p0, int64_t begin, int64_t end,
                    BilinearPoint<T>* pts) {
  const int64_t taps = g.taps(), out_hw = g.out_positions();
  for (int64_t p = begin; p < end; ++p) {
    const int64_t pos = p0 + p, oh = pos / g.out_w, ow = pos % g.out_w;
    for (int64_t k = 0; k < taps; ++k) {
      const T h = sample_coord(oh, g.stride_h, g.pad_h, k / g.kernel_w, g.dilation_h,
                               offset[(2 * k) * out_hw + pos]);
      const T w = sample_coord(ow, g.stride_w, g.pad_w, k % g.kernel_w, g.dilation_w,
                               offset[(2 * k + 1) * out_hw + pos]);
      pts[p * taps + k] =
          bilinear_point(h, w, static_cast<int>(g.height), static_cast<int>(g.width));
    }
  }
}

// Element offset of corner 0 of `pt` in the zero-bordered channels-last image.
template <typename T>
inline int64_t padded_corner(const Geometry& g, const BilinearPoint<T>& pt) {
  return (static_cast<int64_t>(pt.h_low + 1) * (g.width + 2) + pt.w_low + 1) * g.channels;
}

// columns[t, c] = sample of channel c at point pts[t], for t in [begin, end).
template <typename T>
MIMICDET_INLINE void build_columns_impl(const Geometry& g, const T* image,
                                        const BilinearPoint<T>* pts, int64_t begin, int64_t end,
                                        T* columns) {
  const int64_t C = g.channels, row = g.padded_row();
  for (int64_t t = begin; t < end; ++t) {
    T* dst = columns + t * C;
    const BilinearPoint<T>& pt = pts[t];
    if (!pt.inside) {
      std::fill(dst, dst + C, T(0));
      continue;
    }
    T wt[4];
    bilinear_weights(pt, wt);
    const T w0 = wt[0], w1 = wt[1], w2 = wt[2], w3 = wt[3];
    const T* v0 = image + padded_corner(g, pt);
    const T* v1 = v0 + C;
    const T* v2 = v0 + row;
    const T* v3 = v2 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      dst[c] = w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
    }
  }
}

MIMICDET_SIMD_CLONES void build_columns(const Geometry& g, const float* image,
                                        const BilinearPoint<float>* pts, int64_t begin,
                                        int64_t end, float* columns) {
  build_columns_impl(g, image, pts, begin, end, columns);
}

MIMICDET_SIMD_CLONES void build_columns(const Geometry& g, const double* image,
                                        const BilinearPoint<double>* pts, int64_t begin,
                                        int64_t end, double* columns) {
  build_columns_impl(g, image, pts, begin, end, columns);
}

// Copies input (N, C, H, W) into the interior of a zeroed (N, H + 2, W + 2, C) buffer.
at::Tensor padded_channels_last(const at::Tensor& input) {
  const int64_t height = input.size(2), width = input.size(3);
  at::Tensor image =
      at::zeros({input.size(0), height + 2, width + 2, input.size(1)}, input.options());
  image.narrow(1, 1, height).narrow(2, 1, width).copy_(input.permute({0, 2, 3, 1}));
  return image;
}

// For channels [c0, c1): scatters the column gradients into grad_image (same layout as image)
// and writes the partial offset gradients part[t] = (d/dh, d/dw) of those channels.
template <typename T>
MIMICDET_INLINE void scatter_block_impl(const Geometry& g, const T* image,
                                        const BilinearPoint<T>* pts, int64_t n_taps,
                                        const T* grad_columns, int64_t c0, int64_t c1,
                                        T* grad_image, T* part) {
  const int64_t C = g.channels, row = g.padded_row();
  for (int64_t t = 0; t < n_taps; ++t) {
    const BilinearPoint<T>& pt = pts[t];
    if (!pt.inside) {
      part[2 * t] = T(0);
      part[2 * t + 1] = T(0);
      continue;
    }
    T wt[4];
    bilinear_weights(pt, wt);
    const T w0 = wt[0], w1 = wt[1], w2 = wt[2], w3 = wt[3];
    const int64_t corner = padded_corner(g, pt);
    const T* v0 = image + corner;
    const T* v1 = v0 + C;
    const T* v2 = v0 + row;
    const T* v3 = v2 + C;
    T* g0 = grad_image + corner;
    T* g1 = g0 + C;
    T* g2 = g0 + row;
    T* g3 = g2 + C;
    const T* gc = grad_columns + t * C;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = c0; c < c1; ++c) {
      const T grad = gc[c];
      g0[c] += w0 * grad;
      g1[c] += w1 * grad;
      g2[c] += w2 * grad;
      g3[c] += w3 * grad;
      s0 += grad * v0[c];
      s1 += grad * v1[c];
      s2 += grad * v2[c];
      s3 += grad * v3[c];
    }
    // The coordinate gradient is linear in the corner values, so per-corner sums suffice.
    const T sums[4] = {s0, s1, s2, s3};
    bilinear_coord_grad(pt, sums, part[2 * t], part[2 * t + 1]);
  }
}

MIMICDET_SIMD_CLONES void scatter_block(const Geometry& g, const float* image,
                                        const BilinearPoint<float>* pts, int64_t n_taps,
                                        const float* grad_columns, int64_t c0, int64_t c1,
                                        float* grad_image, float* part) {
  scatter_block_impl(g, image, pts, n_taps, grad_columns, c0, c1, grad_image, part);
}

MIMICDET_SIMD_CLONES void scatter_block(const Geometry& g, const double* image,
                                        const BilinearPoint<double>* pts, int64_t n_taps,
                                        const double* grad_columns, int64_t c0, int64_t c1,
                                        double* grad_image, double* part) {
  scatter_block_impl(g, image, pts, n_taps, grad_columns, c0, c1, grad_image, part);
}

// Scatters column gradients over `blocks` disjoint channel ranges in parallel (race-free) and
// leaves per-block partial offset gradients in partial[b][t], reduced in block order by the
// caller (deterministic).
template <typename T>
void scatter_column_grads(const Geometry& g, const T* image, const BilinearPoint<T>* pts,
                          int64_t count, const T* grad_columns, T* grad_image, T* partial,
                          int64_t blocks) {
  const int64_t C = g.channels, n_taps = count * g.taps();
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      scatter_block(g, image, pts, n_taps, grad_columns, C * b / blocks, C * (b + 1) / blocks,
                    grad_image, partial + b * n_taps * 2);
    }
  });
}

}  // namespace

at::Tensor deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t stride_h,
                                     int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                     int64_t dilation_h, int64_t dilation_w) {
  check_deform_conv2d_args(input, offset, weight, bias, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w);
  const Geometry g = make_geometry(input, weight, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w);
  const int64_t batch = input.size(0), out_channels = weight.size(0), taps = g.taps();
  const int64_t out_hw = g.out_positions();
  at::Tensor output = at::empty({batch, out_channels, g.out_h, g.out_w}, input.options());
  const at::Tensor offset_c = offset.contiguous();
  // (kh * kw * C_in, C_out): rows in the (tap, channel) order of the column block.
  const at::Tensor weight_t =
      weight.permute({2, 3, 1, 0}).reshape({taps * g.channels, out_channels});
  at::Tensor out2d = output.view({batch, out_channels, out_hw});
  // Multiply-adds of the GEMMs; below kMinParallelWork threads cost more than they save.
  const int64_t work = batch * out_hw * taps * g.channels * out_channels;
  const int64_t threads =
      work < kMinParallelWork ? 1 : std::max<int64_t>(1, at::get_num_threads());
  // One block per thread; no smaller than needed to give every thread work.
  const int64_t per_thread = std::max<int64_t>(1, (batch * out_hw + threads - 1) / threads);
  const int64_t max_chunk =
      std::min(chunk_positions(g, input.element_size(), threads), per_thread);
  // Equal chunks: a short remainder chunk would run a needlessly inefficient GEMM.
  const int64_t chunks_per_image = (out_hw + max_chunk - 1) / max_chunk;
  const int64_t chunk = (out_hw + chunks_per_image - 1) / chunks_per_image;
  const int64_t total_chunks = batch * chunks_per_image;

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "mimicdet_deform_conv2d_cpu", [&] {
    const at::Tensor image = padded_channels_last(input);
    const int64_t image_size = image.numel() / std::max<int64_t>(1, batch);
    const int64_t grain = threads == 1 ? std::max<int64_t>(1, total_chunks) : 1;
    at::parallel_for(0, total_chunks, grain, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's "below autograd" dispatch state.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor columns = at::empty({chunk, taps * g.channels}, input.options());
      at::Tensor product = at::empty({chunk, out_channels}, input.options());
      std::vector<BilinearPoint<scalar_t>> pts(chunk * taps);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = q / chunks_per_image, p0 = (q % chunks_per_image) * chunk;
        const int64_t count = std::min(chunk, out_hw - p0);
        compute_points(g, offset_c[n].const_data_ptr<scalar_t>(), p0, 0, count, pts.data());
        build_columns(g, image.const_data_ptr<scalar_t>() + n * image_size, pts.data(), 0,
                      count * taps, columns.mutable_data_ptr<scalar_t>());
        // Inside the parallel region BLAS runs single-threaded on this thread's block.
        at::Tensor product_n = product.narrow(0, 0, count);
        at::mm_out(product_n, columns.narrow(0, 0, count), weight_t);
        out2d[n].narrow(1, p0, count).copy_(product_n.t());
      }
    });
  });
  if (bias.has_value()) {
    output.add_(bias->view({1, out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w) {
  check_deform_conv2d_args(input, offset, weight, std::nullopt, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w);
  const Geometry g = make_geometry(input, weight, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w);
  const int64_t batch = input.size(0), out_channels = weight.size(0), taps = g.taps();
  const int64_t out_hw = g.out_positions();
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({batch, out_channels, g.out_h, g.out_w}),
              "deform_conv2d backward: grad_output shape ", grad_output.sizes(),
              " must be the output shape (", batch, ", ", out_channels, ", ", g.out_h, ", ",
              g.out_w, ")");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "deform_conv2d backward: grad_output dtype ", grad_output.scalar_type(),
              " must match the input dtype ", input.scalar_type());

  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  at::Tensor grad_weight_cl = at::zeros({out_channels, taps * g.channels}, weight.options());
  if (batch == 0) {
    return {grad_input, grad_offset, at::zeros_like(weight)};
  }
  const at::Tensor offset_c = offset.contiguous();
  const at::Tensor weight_cl =
      weight.permute({0, 2, 3, 1}).contiguous().view({out_channels, taps * g.channels});
  const at::Tensor grad2d = grad_output.contiguous().view({batch, out_channels, out_hw});
  const bool serial = batch * out_hw * taps * g.channels * out_channels < kMinParallelWork;
  const int64_t threads = serial ? 1 : std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks = std::clamp<int64_t>(g.channels / kMinChannelsPerBlock, 1, threads);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "mimicdet_deform_conv2d_backward_cpu", [&] {
    const at::Tensor image_all = padded_channels_last(input);
    at::Tensor grad_image = at::empty_like(image_all[0]);
    at::Tensor grad_interior = grad_image.narrow(0, 1, g.height).narrow(1, 1, g.width);
    const int64_t chunk = chunk_positions(g, sizeof(scalar_t), 1);
    at::Tensor columns = at::empty({chunk * taps * g.channels}, input.options());
    std::vector<BilinearPoint<scalar_t>> pts(chunk * taps);
    std::vector<scalar_t> partial(blocks * chunk * taps * 2);
    for (int64_t n = 0; n < batch; ++n) {
      const scalar_t* image = image_all[n].const_data_ptr<scalar_t>();
      grad_image.zero_();
      const scalar_t* offset_n = offset_c[n].const_data_ptr<scalar_t>();
      scalar_t* grad_offset_n = grad_offset[n].mutable_data_ptr<scalar_t>();
      for (int64_t p0 = 0; p0 < out_hw; p0 += chunk) {
        const int64_t count = std::min(chunk, out_hw - p0), n_taps = count * taps;
        scalar_t* cols_ptr = columns.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, count, serial ? count : 16, [&](int64_t begin, int64_t end) {
          compute_points(g, offset_n, p0, begin, end, pts.data());
          build_columns(g, image, pts.data(), begin * taps, end * taps, cols_ptr);
        });
        at::Tensor cols = columns.narrow(0, 0, n_taps * g.channels).view({count, -1});
        const at::Tensor grad_slice = grad2d[n].narrow(1, p0, count);
        grad_weight_cl.addmm_(grad_slice, cols);
        // The sampled columns are no longer needed: reuse their buffer for their gradient.
        at::mm_out(cols, grad_slice.t(), weight_cl);
        scatter_column_grads(g, image, pts.data(), count, cols.const_data_ptr<scalar_t>(),
                             grad_image.mutable_data_ptr<scalar_t>(), partial.data(), blocks);
        // Serial: a few adds per tap, cheaper than another parallel region's barrier.
        for (int64_t t = 0; t < n_taps; ++t) {
          scalar_t dh = 0, dw = 0;
          for (int64_t b = 0; b < blocks; ++b) {
            dh += partial[(b * n_taps + t) * 2];
            dw += partial[(b * n_taps + t) * 2 + 1];
          }
          const int64_t p = p0 + t / taps, k = t % taps;
          grad_offset_n[(2 * k) * out_hw + p] = dh;
          grad_offset_n[(2 * k + 1) * out_hw + p] = dw;
        }
      }
      grad_input[n].copy_(grad_interior.permute({2, 0, 1}));
    }
  });
  at::Tensor grad_weight = grad_weight_cl.view({out_channels, g.kernel_h, g.kernel_w, g.channels})
                               .permute({0, 3, 1, 2})
                               .contiguous();
  return {grad_input, grad_offset, grad_weight};
}

}  // namespace mimicdet
