// Python binding, input checks and dtype dispatch for the CUDA local-attention kernels
// (local_attention_cuda.cuh, one instantiation per dtype in local_attention_cuda_<dtype>.cu).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "local_attention_cuda.h"

namespace {

void check_inputs(const std::vector<at::Tensor>& ts, int64_t k) {
  TORCH_CHECK(k >= 1 && k % 2 == 1, "local_attention: kernel_size must be a positive odd integer, got ", k);
  const auto& q = ts[0];
  TORCH_CHECK(q.dim() == 4, "local_attention: expected B x C x H x W tensors, got rank ", q.dim());
  for (const auto& t : ts) {
    TORCH_CHECK(t.is_cuda(), "local_attention (cuda): tensors must be CUDA tensors");
    TORCH_CHECK(t.device() == q.device(), "local_attention (cuda): tensors must be on the same device");
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "local_attention: dtype mismatch");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                    t.scalar_type() == at::kBFloat16,
                "local_attention (cuda): unsupported dtype ", t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), "local_attention: shape mismatch");
    TORCH_CHECK(t.is_contiguous(), "local_attention (cuda): inputs must be contiguous");
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ks) {
  check_inputs({q, k, v}, ks);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = (q.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(2), q.size(3)}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(),
                                  "la_forward_cuda",
                                  [&] { atrc_la::forward_impl<scalar_t>(q, k, v, out, lse, static_cast<int>(ks)); });
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lse, int64_t ks) {
  check_inputs({g, q, k, v}, ks);
  const auto acc = (q.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.is_cuda() && lse.is_contiguous() && lse.scalar_type() == acc && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(3),
              "local_attention (cuda): bad lse tensor");
  const c10::cuda::CUDAGuard guard(q.device());
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(),
                                  "la_backward_cuda", [&] {
                                    atrc_la::backward_impl<scalar_t>(g, q, k, v, lse, dq, dk, dv, static_cast<int>(ks));
                                  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "local attention forward (CUDA): returns [out, lse]");
  m.def("backward", &backward, "local attention backward (CUDA): returns [dq, dk, dv]");
}
