// Host-side declarations of the CUDA local-attention launchers (kernels in local_attention_cuda.cuh).
// One explicit instantiation per dtype lives in its own translation unit (local_attention_cuda_<dtype>.cu)
// so that ninja compiles the four in parallel; local_attention_cuda.cpp dispatches on the dtype.
#pragma once

#include <ATen/ATen.h>

namespace atrc_la {

// out: empty_like(q); lse: B x H x W in the accumulation type (float, double for double inputs).
template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                  int kernel_size);

// dq, dk, dv: empty_like(q); lse from forward_impl.
template <typename scalar_t>
void backward_impl(const at::Tensor& gout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, int kernel_size);

}  // namespace atrc_la
