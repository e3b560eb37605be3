// The CUDA local-attention launchers for double (one dtype per translation unit: parallel builds).
#include "local_attention_cuda.cuh"

namespace atrc_la {
template void forward_impl<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, int);
template void backward_impl<double>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, int);
}  // namespace atrc_la
