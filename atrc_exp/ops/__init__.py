"""ATRC's custom op: the local-context attention, with C++/OpenMP, CUDA and PyTorch backends."""

from .local_attention import available_backends, get_backend, local_attention, set_backend

__all__ = ["local_attention", "set_backend", "get_backend", "available_backends"]
