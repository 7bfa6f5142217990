// CUDA kernels of mimicdet::deform_conv2d: per image, an im2col kernel samples the columns
// (C_in * kh * kw, H_out * W_out) and cuBLAS multiplies them by the weight; backward recomputes
// the columns for grad_weight, forms their gradient with one GEMM, scatters it into grad_input
// with atomics (accumulated in opmath precision) and reduces it over channels for grad_offset.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "guided_deform_conv.h"
#include "guided_deform_conv_math.h"

namespace mimicdet {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; more blocks than this only adds scheduling overhead.
constexpr int64_t kMaxBlocks = 1 << 16;

int grid_size(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

struct ConvParams {
  int64_t channels;
  int height, width, kernel_h, kernel_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

ConvParams make_params(const at::Tensor& input, const at::Tensor& weight, int64_t stride_h,
                       int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h,
                       int64_t dilation_w) {
  ConvParams p;
  p.channels = input.size(1);
  p.height = static_cast<int>(input.size(2));
  p.width = static_cast<int>(input.size(3));
  p.kernel_h = static_cast<int>(weight.size(2));
  p.kernel_w = static_cast<int>(weight.size(3));
  p.out_h = static_cast<int>(conv_out_size(p.height, p.kernel_h, stride_h, pad_h, dilation_h));
  p.out_w = static_cast<int>(conv_out_size(p.width, p.kernel_w, stride_w, pad_w, dilation_w));
  p.stride_h = static_cast<int>(stride_h);
  p.stride_w = static_cast<int>(stride_w);
  p.pad_h = static_cast<int>(pad_h);
  p.pad_w = static_cast<int>(pad_w);
  p.dilation_h = static_cast<int>(dilation_h);
  p.dilation_w = static_cast<int>(dilation_w);
  return p;
}

// Sample point of kernel tap k at flat output position pos; offset points at one image.
template <typename scalar_t, typename acc_t>
__device__ inline BilinearPoint<acc_t> tap_point(const ConvParams& p, const scalar_t* offset,
                                                 int64_t pos, int k) {
  const int64_t out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t oh = pos / p.out_w, ow = pos % p.out_w;
  const acc_t h = sample_coord<acc_t>(oh, p.stride_h, p.pad_h, k / p.kernel_w, p.dilation_h,
                                      static_cast<acc_t>(offset[(2 * k) * out_hw + pos]));
  const acc_t w = sample_coord<acc_t>(ow, p.stride_w, p.pad_w, k % p.kernel_w, p.dilation_w,
                                      static_cast<acc_t>(offset[(2 * k + 1) * out_hw + pos]));
  return bilinear_point(h, w, p.height, p.width);
}

// Corner values of pt in one (H, W) plane, zero for corners outside the image.
template <typename scalar_t, typename acc_t>
__device__ inline void corner_values(const BilinearPoint<acc_t>& pt, const scalar_t* plane,
                                     const ConvParams& p, acc_t v[4]) {
#pragma unroll
  for (int corner = 0; corner < 4; ++corner) {
    v[corner] = corner_in_image(pt, corner, p.height, p.width)
                    ? static_cast<acc_t>(plane[corner_index(pt, corner, p.width)])
                    : acc_t(0);
  }
}

// columns[(c * taps + k) * out_hw + pos] = sample of channel c at tap k of position pos.
template <typename scalar_t>
__global__ void im2col_kernel(int64_t total, const scalar_t* input, const scalar_t* offset,
                              ConvParams p, scalar_t* columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t plane_size = static_cast<int64_t>(p.height) * p.width;
  const int taps = p.kernel_h * p.kernel_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pos = idx % out_hw, c = idx / out_hw;
    const scalar_t* plane = input + c * plane_size;
    for (int k = 0; k < taps; ++k) {
      const BilinearPoint<acc_t> pt = tap_point<scalar_t, acc_t>(p, offset, pos, k);
      acc_t v[4], wt[4];
      corner_values(pt, plane, p, v);
      bilinear_weights(pt, wt);
      columns[(c * taps + k) * out_hw + pos] = static_cast<scalar_t>(bilinear_interp(wt, v));
    }
  }
}

// grad_input[c, corner] += weight * grad_columns[c, k, pos]; atomics because taps overlap.
template <typename scalar_t, typename acc_t>
__global__ void col2im_kernel(int64_t total, const scalar_t* offset,
                              const scalar_t* grad_columns, ConvParams p, acc_t* grad_input) {
  const int64_t out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t plane_size = static_cast<int64_t>(p.height) * p.width;
  const int taps = p.kernel_h * p.kernel_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pos = idx % out_hw;
    const int k = static_cast<int>((idx / out_hw) % taps);
    const int64_t c = idx / (out_hw * taps);
    const BilinearPoint<acc_t> pt = tap_point<scalar_t, acc_t>(p, offset, pos, k);
    if (!pt.inside) {
      continue;
    }
    acc_t wt[4];
    bilinear_weights(pt, wt);
    const acc_t grad = static_cast<acc_t>(grad_columns[idx]);
    acc_t* plane = grad_input + c * plane_size;
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
      if (corner_in_image(pt, corner, p.height, p.width)) {
        gpuAtomicAdd(plane + corner_index(pt, corner, p.width), wt[corner] * grad);
      }
    }
  }
}

// (grad_offset[2k, pos], grad_offset[2k + 1, pos]) = sum over channels of
// grad_column * d(sample)/d(h, w).
template <typename scalar_t>
__global__ void offset_grad_kernel(int64_t total, const scalar_t* input, const scalar_t* offset,
                                   const scalar_t* grad_columns, ConvParams p,
                                   scalar_t* grad_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t plane_size = static_cast<int64_t>(p.height) * p.width;
  const int taps = p.kernel_h * p.kernel_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t pos = idx % out_hw;
    const int k = static_cast<int>(idx / out_hw);
    const BilinearPoint<acc_t> pt = tap_point<scalar_t, acc_t>(p, offset, pos, k);
    acc_t sums[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (pt.inside) {
      for (int64_t c = 0; c < p.channels; ++c) {
        const acc_t grad = static_cast<acc_t>(grad_columns[(c * taps + k) * out_hw + pos]);
        acc_t v[4];
        corner_values(pt, input + c * plane_size, p, v);
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          sums[corner] += grad * v[corner];
        }
      }
    }
    acc_t dh, dw;
    bilinear_coord_grad(pt, sums, dh, dw);
    grad_offset[(2 * k) * out_hw + pos] = static_cast<scalar_t>(dh);
    grad_offset[(2 * k + 1) * out_hw + pos] = static_cast<scalar_t>(dw);
  }
}

}  // namespace

at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t stride_h,
                                      int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                      int64_t dilation_h, int64_t dilation_w) {
  check_deform_conv2d_args(input, offset, weight, bias, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w);
  TORCH_CHECK(input.is_cuda(), "deform_conv2d_forward_cuda: input must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvParams p = make_params(input, weight, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w);
  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t taps = p.kernel_h * p.kernel_w, out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  at::Tensor output = at::empty({batch, out_channels, p.out_h, p.out_w}, input.options());
  const at::Tensor input_c = input.contiguous(), offset_c = offset.contiguous();
  const at::Tensor weight2d = weight.reshape({out_channels, p.channels * taps});
  at::Tensor out2d = output.view({batch, out_channels, out_hw});
  at::Tensor columns = at::empty({p.channels * taps, out_hw}, input.options());
  const int64_t total = p.channels * out_hw;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "mimicdet_deform_conv2d_cuda", [&] {
        for (int64_t n = 0; n < batch; ++n) {
          if (total > 0) {
            im2col_kernel<scalar_t><<<grid_size(total), kThreads, 0, stream>>>(
                total, input_c[n].const_data_ptr<scalar_t>(),
                offset_c[n].const_data_ptr<scalar_t>(), p, columns.mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          at::Tensor out_n = out2d[n];
          at::mm_out(out_n, weight2d, columns);
        }
      });
  if (bias.has_value()) {
    output.add_(bias->view({1, out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w) {
  check_deform_conv2d_args(input, offset, weight, std::nullopt, stride_h, stride_w, pad_h, pad_w,
                           dilation_h, dilation_w);
  TORCH_CHECK(input.is_cuda() && grad_output.device() == input.device(),
              "deform_conv2d_backward_cuda: grad_output (", grad_output.device(),
              ") and input (", input.device(), ") must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(input.device());
  const ConvParams p = make_params(input, weight, stride_h, stride_w, pad_h, pad_w, dilation_h,
                                   dilation_w);
  const int64_t batch = input.size(0), out_channels = weight.size(0);
  const int64_t taps = p.kernel_h * p.kernel_w, out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({batch, out_channels, p.out_h, p.out_w}),
              "deform_conv2d backward: grad_output shape ", grad_output.sizes(),
              " must be the output shape (", batch, ", ", out_channels, ", ", p.out_h, ", ",
              p.out_w, ")");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "deform_conv2d backward: grad_output dtype ", grad_output.scalar_type(),
              " must match the input dtype ", input.scalar_type());
  const at::ScalarType acc_type = at::toOpMathType(input.scalar_type());
  const at::Tensor input_c = input.contiguous(), offset_c = offset.contiguous();
  const at::Tensor weight2d = weight.reshape({out_channels, p.channels * taps});
  const at::Tensor grad2d = grad_output.contiguous().view({batch, out_channels, out_hw});
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_offset = at::empty(offset.sizes(), offset.options());
  at::Tensor grad_weight_acc =
      at::zeros({out_channels, p.channels * taps}, weight.options().dtype(acc_type));
  at::Tensor grad_input_acc =
      at::empty({p.channels, p.height, p.width}, input.options().dtype(acc_type));
  at::Tensor columns = at::empty({p.channels * taps, out_hw}, input.options());
  const int64_t sample_total = p.channels * out_hw, column_total = sample_total * taps;
  const int64_t offset_total = taps * out_hw;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "mimicdet_deform_conv2d_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        for (int64_t n = 0; n < batch; ++n) {
          const scalar_t* input_n = input_c[n].const_data_ptr<scalar_t>();
          const scalar_t* offset_n = offset_c[n].const_data_ptr<scalar_t>();
          const at::Tensor grad_n = grad2d[n];
          if (sample_total > 0) {
            im2col_kernel<scalar_t><<<grid_size(sample_total), kThreads, 0, stream>>>(
                sample_total, input_n, offset_n, p, columns.mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          grad_weight_acc.add_(at::mm(grad_n, columns.t()));
          // The sampled columns are no longer needed: reuse their buffer for their gradient.
          at::mm_out(columns, weight2d.t(), grad_n);
          grad_input_acc.zero_();
          if (column_total > 0) {
            col2im_kernel<scalar_t, acc_t><<<grid_size(column_total), kThreads, 0, stream>>>(
                column_total, offset_n, columns.const_data_ptr<scalar_t>(), p,
                grad_input_acc.mutable_data_ptr<acc_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          grad_input[n].copy_(grad_input_acc);
          if (offset_total > 0) {
            offset_grad_kernel<scalar_t><<<grid_size(offset_total), kThreads, 0, stream>>>(
                offset_total, input_n, offset_n, columns.const_data_ptr<scalar_t>(), p,
                grad_offset[n].mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      });
  at::Tensor grad_weight = grad_weight_acc.to(weight.scalar_type()).view(weight.sizes());
  return {grad_input, grad_offset, grad_weight};
}

}  // namespace mimicdet
