// Python binding + input checks for the CUDA local-attention kernels (local_attention_cuda.cu).
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> la_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        int64_t kernel_size);
std::vector<at::Tensor> la_backward_cuda(const at::Tensor& gout, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& lse, int64_t kernel_size);

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
  return la_forward_cuda(q, k, v, ks);
}

std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& lse, int64_t ks) {
  check_inputs({g, q, k, v}, ks);
  const auto acc = (q.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.is_cuda() && lse.is_contiguous() && lse.scalar_type() == acc && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(2) && lse.size(2) == q.size(3),
              "local_attention (cuda): bad lse tensor");
  return la_backward_cuda(g, q, k, v, lse, ks);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "local attention forward (CUDA): returns [out, lse]");
  m.def("backward", &backward, "local attention backward (CUDA): returns [dq, dk, dv]");
}
