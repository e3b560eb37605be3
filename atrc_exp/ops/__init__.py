"""Custom ops: ATRC's local attention with C++/OpenMP, CUDA and PyTorch backends; the fused CPU
batch norm + ReLU (:mod:`atrc_exp.ops.batch_norm`)."""

from .local_attention import available_backends, get_backend, local_attention, set_backend

__all__ = ["local_attention", "set_backend", "get_backend", "available_backends"]
