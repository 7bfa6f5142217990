// CUDA kernels of mimicdet::deform_conv2d. Output positions of one image are processed in chunks
// whose column buffer (C_in * kh * kw, chunk) fits kColumnBudgetBytes: an im2col kernel samples
// the chunk's columns and cuBLAS multiplies them by the weight. Backward recomputes the columns
// for grad_weight (accumulated in float32 whatever the input dtype), forms their gradient with
// one GEMM, scatters it into grad_input with atomics (accumulated in opmath precision, hence not
// deterministic) and reduces it over channels for grad_offset.
//
// Each thread of the sampling kernels owns one (position, tap) and a block of channels, so the
// sampling point and its bilinear weights are computed once per (position, tap) and reused for
// every channel of the block.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include <algorithm>

#include "guided_deform_conv.h"
#include "guided_deform_conv_math.h"

namespace mimicdet {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size; more blocks than this only adds scheduling overhead.
constexpr int64_t kMaxBlocks = 1 << 16;
// Column buffer per chunk. An unchunked buffer is C_in * kh * kw * H_out * W_out elements
// (about 150 MB in float32 at P3 of an 800x1333 image, 3x3, C_in = 256); 64 MiB keeps chunks
// of thousands of positions, large enough for cuBLAS to run at full speed.
constexpr int64_t kColumnBudgetBytes = 64 << 20;
// Channels each sampling thread handles for its (position, tap): the point is computed once
// for all of them, and C_in / 32 blocks still give enough threads at the coarsest level.
constexpr int64_t kChannelsPerThread = 32;

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

// Output positions per chunk so that one chunk's columns take at most kColumnBudgetBytes.
int64_t chunk_positions(const ConvParams& p, int64_t element_size) {
  const int64_t out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t column_bytes =
      std::max<int64_t>(1, p.channels * p.kernel_h * p.kernel_w) * element_size;
  return std::clamp<int64_t>(kColumnBudgetBytes / column_bytes, 1, std::max<int64_t>(1, out_hw));
}

// One chunk of one image: positions [p0, p0 + count) of the H_out * W_out output positions.
struct Chunk {
  int64_t p0;
  int64_t count;
};

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

// Thread index -> (channel block, tap, position in chunk), position fastest so that neighbouring
// threads write neighbouring columns.
struct SampleTask {
  int64_t local;
  int k;
  int64_t c_begin, c_end;
};

__device__ inline SampleTask sample_task(int64_t idx, const ConvParams& p, int64_t count) {
  const int taps = p.kernel_h * p.kernel_w;
  SampleTask task;
  task.local = idx % count;
  task.k = static_cast<int>((idx / count) % taps);
  task.c_begin = (idx / (count * taps)) * kChannelsPerThread;
  const int64_t c_end = task.c_begin + kChannelsPerThread;
  task.c_end = c_end < p.channels ? c_end : p.channels;
  return task;
}

// columns[(c * taps + k) * count + local] = sample of channel c at tap k of position p0 + local.
template <typename scalar_t>
__global__ void im2col_kernel(int64_t total, const scalar_t* input, const scalar_t* offset,
                              ConvParams p, Chunk chunk, scalar_t* columns) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_size = static_cast<int64_t>(p.height) * p.width;
  const int taps = p.kernel_h * p.kernel_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const SampleTask task = sample_task(idx, p, chunk.count);
    const BilinearPoint<acc_t> pt =
        tap_point<scalar_t, acc_t>(p, offset, chunk.p0 + task.local, task.k);
    acc_t wt[4];
    bilinear_weights(pt, wt);
    for (int64_t c = task.c_begin; c < task.c_end; ++c) {
      acc_t v[4];
      corner_values(pt, input + c * plane_size, p, v);
      columns[(c * taps + task.k) * chunk.count + task.local] =
          static_cast<scalar_t>(bilinear_interp(wt, v));
    }
  }
}

// grad_input[c, corner] += weight * grad_columns[c, k, local]; atomics because taps overlap.
template <typename scalar_t, typename acc_t>
__global__ void col2im_kernel(int64_t total, const scalar_t* offset,
                              const scalar_t* grad_columns, ConvParams p, Chunk chunk,
                              acc_t* grad_input) {
  const int64_t plane_size = static_cast<int64_t>(p.height) * p.width;
  const int taps = p.kernel_h * p.kernel_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const SampleTask task = sample_task(idx, p, chunk.count);
    const BilinearPoint<acc_t> pt =
        tap_point<scalar_t, acc_t>(p, offset, chunk.p0 + task.local, task.k);
    if (!pt.inside) {
      continue;
    }
    acc_t wt[4];
    bilinear_weights(pt, wt);
    for (int64_t c = task.c_begin; c < task.c_end; ++c) {
      const acc_t grad =
          static_cast<acc_t>(grad_columns[(c * taps + task.k) * chunk.count + task.local]);
      acc_t* plane = grad_input + c * plane_size;
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (corner_in_image(pt, corner, p.height, p.width)) {
          gpuAtomicAdd(plane + corner_index(pt, corner, p.width), wt[corner] * grad);
        }
      }
    }
  }
}

// (grad_offset[2k, pos], grad_offset[2k + 1, pos]) = sum over channels of
// grad_column * d(sample)/d(h, w), for the chunk's positions.
template <typename scalar_t>
__global__ void offset_grad_kernel(int64_t total, const scalar_t* input, const scalar_t* offset,
                                   const scalar_t* grad_columns, ConvParams p, Chunk chunk,
                                   scalar_t* grad_offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_hw = static_cast<int64_t>(p.out_h) * p.out_w;
  const int64_t plane_size = static_cast<int64_t>(p.height) * p.width;
  const int taps = p.kernel_h * p.kernel_w;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t local = idx % chunk.count, pos = chunk.p0 + local;
    const int k = static_cast<int>(idx / chunk.count);
    const BilinearPoint<acc_t> pt = tap_point<scalar_t, acc_t>(p, offset, pos, k);
    acc_t sums[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (pt.inside) {
      for (int64_t c = 0; c < p.channels; ++c) {
        const acc_t grad = static_cast<acc_t>(grad_columns[(c * taps + k) * chunk.count + local]);
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

// Threads of the sampling kernels for one chunk: (channel blocks, taps, positions).
int64_t sample_threads(const ConvParams& p, int64_t count) {
  const int64_t channel_blocks = (p.channels + kChannelsPerThread - 1) / kChannelsPerThread;
  return channel_blocks * p.kernel_h * p.kernel_w * count;
}

// grad_weight_acc (float32 or float64) += grad_slice @ columns^T. Half-precision operands are
// multiplied into a float32 product, so neither the GEMM's sum nor the per-chunk partial result
// is rounded to half before it is accumulated.
void accumulate_weight_grad(at::Tensor& grad_weight_acc, const at::Tensor& grad_slice,
                            const at::Tensor& columns) {
  if (grad_slice.scalar_type() == grad_weight_acc.scalar_type()) {
    grad_weight_acc.addmm_(grad_slice, columns.t());
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  grad_weight_acc.add_(at::mm(grad_slice, columns.t(), grad_weight_acc.scalar_type()));
#else
  grad_weight_acc.addmm_(grad_slice.to(grad_weight_acc.scalar_type()),
                         columns.t().to(grad_weight_acc.scalar_type()));
#endif
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
  if (output.numel() == 0) {
    return output;
  }
  const at::Tensor input_c = input.contiguous(), offset_c = offset.contiguous();
  const at::Tensor weight2d = weight.reshape({out_channels, p.channels * taps});
  at::Tensor out2d = output.view({batch, out_channels, out_hw});
  const int64_t chunk_size = chunk_positions(p, input.element_size());
  at::Tensor columns = at::empty({p.channels * taps * chunk_size}, input.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "mimicdet_deform_conv2d_cuda", [&] {
        for (int64_t n = 0; n < batch; ++n) {
          for (int64_t p0 = 0; p0 < out_hw; p0 += chunk_size) {
            const Chunk chunk{p0, std::min(chunk_size, out_hw - p0)};
            at::Tensor cols =
                columns.narrow(0, 0, p.channels * taps * chunk.count).view({-1, chunk.count});
            const int64_t total = sample_threads(p, chunk.count);
            if (total > 0) {  // C_in == 0 has nothing to sample (and a 0-block launch fails)
              im2col_kernel<scalar_t><<<grid_size(total), kThreads, 0, stream>>>(
                  total, input_c[n].const_data_ptr<scalar_t>(),
                  offset_c[n].const_data_ptr<scalar_t>(), p, chunk,
                  cols.mutable_data_ptr<scalar_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            // A column slice of the (C_out, H_out * W_out) output: cuBLAS writes it in place
            // with leading dimension H_out * W_out.
            at::Tensor out_slice = out2d[n].narrow(1, p0, chunk.count);
            at::mm_out(out_slice, weight2d, cols);
          }
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
  // The atomicAdd scatter into grad_input sums in a run-dependent order, like torch's own
  // scatter-add kernels: raise (or warn) under torch.use_deterministic_algorithms(True).
  at::globalContext().alertNotDeterministic("mimicdet::deform_conv2d backward (CUDA)");
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
  // Zeros, not empty: an empty batch or output returns them as they are.
  at::Tensor grad_input = at::zeros(input.sizes(), input.options());
  at::Tensor grad_offset = at::zeros(offset.sizes(), offset.options());
  at::Tensor grad_weight_acc =
      at::zeros({out_channels, p.channels * taps}, weight.options().dtype(acc_type));
  if (batch == 0 || out_hw == 0) {
    return {grad_input, grad_offset, grad_weight_acc.to(weight.scalar_type()).view(weight.sizes())};
  }
  const at::Tensor input_c = input.contiguous(), offset_c = offset.contiguous();
  const at::Tensor weight2d = weight.reshape({out_channels, p.channels * taps});
  const at::Tensor grad2d = grad_output.contiguous().view({batch, out_channels, out_hw});
  // grad_input of one image in opmath precision, so half-precision atomics do not lose sums.
  at::Tensor grad_input_acc =
      at::empty({p.channels, p.height, p.width}, input.options().dtype(acc_type));
  const int64_t chunk_size = chunk_positions(p, input.element_size());
  at::Tensor columns = at::empty({p.channels * taps * chunk_size}, input.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "mimicdet_deform_conv2d_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        for (int64_t n = 0; n < batch; ++n) {
          const scalar_t* input_n = input_c[n].const_data_ptr<scalar_t>();
          const scalar_t* offset_n = offset_c[n].const_data_ptr<scalar_t>();
          grad_input_acc.zero_();
          for (int64_t p0 = 0; p0 < out_hw; p0 += chunk_size) {
            const Chunk chunk{p0, std::min(chunk_size, out_hw - p0)};
            at::Tensor cols =
                columns.narrow(0, 0, p.channels * taps * chunk.count).view({-1, chunk.count});
            const at::Tensor grad_slice = grad2d[n].narrow(1, p0, chunk.count);
            const int64_t sample_total = sample_threads(p, chunk.count);
            if (sample_total > 0) {  // C_in == 0: nothing to sample or scatter
              im2col_kernel<scalar_t><<<grid_size(sample_total), kThreads, 0, stream>>>(
                  sample_total, input_n, offset_n, p, chunk, cols.mutable_data_ptr<scalar_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            accumulate_weight_grad(grad_weight_acc, grad_slice, cols);
            // The sampled columns are no longer needed: reuse their buffer for their gradient.
            at::mm_out(cols, weight2d.t(), grad_slice);
            if (sample_total > 0) {
              col2im_kernel<scalar_t, acc_t><<<grid_size(sample_total), kThreads, 0, stream>>>(
                  sample_total, offset_n, cols.const_data_ptr<scalar_t>(), p, chunk,
                  grad_input_acc.mutable_data_ptr<acc_t>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
            const int64_t offset_total = taps * chunk.count;
            offset_grad_kernel<scalar_t><<<grid_size(offset_total), kThreads, 0, stream>>>(
                offset_total, input_n, offset_n, cols.const_data_ptr<scalar_t>(), p, chunk,
                grad_offset[n].mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
          grad_input[n].copy_(grad_input_acc);
        }
      });
  at::Tensor grad_weight = grad_weight_acc.to(weight.scalar_type()).view(weight.sizes());
  return {grad_input, grad_offset, grad_weight};
}

}  // namespace mimicdet
