"""Custom ops: ATRC's local attention with C++/OpenMP, CUDA and PyTorch backends; the CPU training
kernels — batch norm + ReLU (:mod:`atrc_exp.ops.batch_norm`), bilinear upsampling fused into the
cross-entropy (:mod:`atrc_exp.ops.upsample_cross_entropy`), the label-context attention
(:mod:`atrc_exp.ops.label_attention`) and the resize-and-add of multi-scale maps
(:mod:`atrc_exp.ops.upsample_add`)."""

from .local_attention import available_backends, get_backend, local_attention, set_backend

__all__ = ["local_attention", "set_backend", "get_backend", "available_backends"]
