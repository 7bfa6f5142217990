// Operator schemas and backend registrations of mimicdet::deform_conv2d. Importing the Python
// module `mimicdet._C` (or torch.ops.load_library on it) runs these static registrations.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/autocast_mode.h>

#include "guided_deform_conv.h"
#include "guided_deform_conv_math.h"

namespace mimicdet {

void check_deform_conv2d_args(const at::Tensor& input, const at::Tensor& offset,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                              int64_t dilation_h, int64_t dilation_w) {
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: input must be 4-D (N, C_in, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(offset.dim() == 4,
              "deform_conv2d: offset must be 4-D (N, 2 * kh * kw, H_out, W_out), got shape ",
              offset.sizes());
  TORCH_CHECK(weight.dim() == 4,
              "deform_conv2d: weight must be 4-D (C_out, C_in, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(offset.device() == input.device() && weight.device() == input.device(),
              "deform_conv2d: input, offset and weight must be on one device, got ",
              input.device(), ", ", offset.device(), ", ", weight.device());
  TORCH_CHECK(offset.scalar_type() == input.scalar_type() &&
                  weight.scalar_type() == input.scalar_type(),
              "deform_conv2d: input, offset and weight must have one dtype, got ",
              input.scalar_type(), ", ", offset.scalar_type(), ", ", weight.scalar_type());
  TORCH_CHECK(stride_h > 0 && stride_w > 0, "deform_conv2d: stride must be positive, got (",
              stride_h, ", ", stride_w, ")");
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0,
              "deform_conv2d: dilation must be positive, got (", dilation_h, ", ", dilation_w,
              ")");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "deform_conv2d: padding must be non-negative, got (",
              pad_h, ", ", pad_w, ")");
  TORCH_CHECK(weight.size(1) == input.size(1), "deform_conv2d: weight shape ", weight.sizes(),
              " expects ", weight.size(1), " input channels but input shape ", input.sizes(),
              " has ", input.size(1), " (groups are not supported)");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(kh > 0 && kw > 0, "deform_conv2d: empty kernel in weight shape ", weight.sizes());
  TORCH_CHECK(offset.size(0) == input.size(0), "deform_conv2d: offset shape ", offset.sizes(),
              " has batch size ", offset.size(0), " but input shape ", input.sizes(), " has ",
              input.size(0));
  TORCH_CHECK(offset.size(1) == 2 * kh * kw, "deform_conv2d: offset shape ", offset.sizes(),
              " must have 2 * kh * kw = ", 2 * kh * kw, " channels for a ", kh, "x", kw,
              " kernel (offset groups are not supported)");
  const int64_t out_h = conv_out_size(input.size(2), kh, stride_h, pad_h, dilation_h);
  const int64_t out_w = conv_out_size(input.size(3), kw, stride_w, pad_w, dilation_w);
  TORCH_CHECK(out_h > 0 && out_w > 0, "deform_conv2d: input shape ", input.sizes(),
              " is too small for a ", kh, "x", kw, " kernel with padding (", pad_h, ", ", pad_w,
              ") and dilation (", dilation_h, ", ", dilation_w, ")");
  TORCH_CHECK(offset.size(2) == out_h && offset.size(3) == out_w, "deform_conv2d: offset shape ",
              offset.sizes(), " must have the output spatial size (", out_h, ", ", out_w, ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "deform_conv2d: bias shape ",
                bias->sizes(), " must be (C_out,) = (", weight.size(0), ",)");
    TORCH_CHECK(bias->device() == input.device() && bias->scalar_type() == input.scalar_type(),
                "deform_conv2d: bias must match the input device and dtype, got ", bias->device(),
                " ", bias->scalar_type());
  }
}

}  // namespace mimicdet

TORCH_LIBRARY(mimicdet, m) {
  // The fake (meta) kernels and the autograd formula are registered from this Python module.
  m.set_python_module("mimicdet.layers.guided_deform_conv");
  m.def(
      "deform_conv2d(Tensor input, Tensor offset, Tensor weight, Tensor? bias, int stride_h, "
      "int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w) -> Tensor");
  m.def(
      "_deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor offset, Tensor weight, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace mimicdet {
namespace {

// Autocast: the kernels compute in float32 (as torchvision's deform_conv2d does under autocast),
// so a half-precision input meeting a float32 weight is cast up instead of failing the dtype
// check, and the result is returned in the input's dtype for the next autocast op.
template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor deform_conv2d_autocast(const at::Tensor& input, const at::Tensor& offset,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                                  int64_t dilation_h, int64_t dilation_w) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mimicdet::deform_conv2d", "")
                       .typed<decltype(deform_conv2d_forward_cpu)>();
  const auto to_float = [](const at::Tensor& t) {
    return at::autocast::cached_cast(at::kFloat, t, device_type);
  };
  const std::optional<at::Tensor> bias_float =
      bias.has_value() ? std::optional<at::Tensor>(to_float(*bias)) : std::nullopt;
  return op.call(to_float(input), to_float(offset), to_float(weight), bias_float, stride_h,
                 stride_w, pad_h, pad_w, dilation_h, dilation_w)
      .to(input.scalar_type());
}

#ifndef WITH_CUDA
// Registered for the CUDA key in a CPU-only build, so that a CUDA tensor gets a message saying
// how to rebuild instead of the dispatcher's "could not run ... with arguments from the CUDA
// backend".
constexpr const char* kBuiltWithoutCuda =
    "mimicdet::deform_conv2d got CUDA tensors, but the installed mimicdet._C was built without "
    "CUDA kernels (no GPU was visible when it was built). Rebuild it where nvcc is installed: "
    "`make clean-build && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" make setup` (or "
    "`FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" pip install --no-deps --no-build-isolation "
    "-e .`), listing the compute capabilities of your GPUs.";

at::Tensor forward_without_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, kBuiltWithoutCuda);
  return {};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_without_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    int64_t, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, kBuiltWithoutCuda);
  return {};
}
#endif

}  // namespace
}  // namespace mimicdet

TORCH_LIBRARY_IMPL(mimicdet, CPU, m) {
  m.impl("deform_conv2d", &mimicdet::deform_conv2d_forward_cpu);
  m.impl("_deform_conv2d_backward", &mimicdet::deform_conv2d_backward_cpu);
}

TORCH_LIBRARY_IMPL(mimicdet, CUDA, m) {
#ifdef WITH_CUDA
  m.impl("deform_conv2d", &mimicdet::deform_conv2d_forward_cuda);
  m.impl("_deform_conv2d_backward", &mimicdet::deform_conv2d_backward_cuda);
#else
  m.impl("deform_conv2d", &mimicdet::forward_without_cuda);
  m.impl("_deform_conv2d_backward", &mimicdet::backward_without_cuda);
#endif
}

TORCH_LIBRARY_IMPL(mimicdet, AutocastCPU, m) {
  m.impl("deform_conv2d", &mimicdet::deform_conv2d_autocast<c10::DispatchKey::AutocastCPU,
                                                            c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(mimicdet, AutocastCUDA, m) {
  m.impl("deform_conv2d", &mimicdet::deform_conv2d_autocast<c10::DispatchKey::AutocastCUDA,
                                                            c10::DeviceType::CUDA>);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mimicdet compiled ops; use them through torch.ops.mimicdet or mimicdet.layers";
#ifdef WITH_CUDA
  m.attr("BUILT_WITH_CUDA") = true;
#else
  m.attr("BUILT_WITH_CUDA") = false;
#endif
}
