// Entry points of the mimicdet::deform_conv2d operator (torchvision.ops.deform_conv2d semantics
// without the modulation mask, one weight group and one offset group).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace mimicdet {

// Shape/device/dtype checks shared by every backend; raises c10::Error naming the bad shape.
void check_deform_conv2d_args(const at::Tensor& input, const at::Tensor& offset,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w);

// input (N, C_in, H, W), offset (N, 2 * kh * kw, H_out, W_out) holding (dy, dx) per kernel tap,
// weight (C_out, C_in, kh, kw), bias (C_out) or None -> output (N, C_out, H_out, W_out).
at::Tensor deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& offset,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t stride_h,
                                     int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                     int64_t dilation_h, int64_t dilation_w);

// Returns (grad_input, grad_offset, grad_weight); grad_bias is grad_output.sum((0, 2, 3)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w);

#ifdef WITH_CUDA
at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& offset,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t stride_h,
                                      int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                      int64_t dilation_h, int64_t dilation_w);

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
    const at::Tensor& weight, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w);
#endif

}  // namespace mimicdet
