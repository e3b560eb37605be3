"""``upsample_add(base, maps)``: ``base`` plus every map bilinearly resized to its size.

Contract: ``base`` B×C×H×W, ``maps`` B×C×hᵢ×wᵢ (one dtype) →
``base + Σᵢ F.interpolate(mapᵢ, size=(H, W), mode="bilinear", align_corners=False)`` (a map of
size H×W is added as it is). It is the tail of :func:`atrc_exp.models.layers.pointwise_conv_of_concat`:
a 1×1 convolution of multi-scale features concatenated after upsampling equals the sum of the
branches' own 1×1 convolutions, each upsampled — so the convolutions run at the branches'
resolutions (for the ATRC aux heads on HRNet18: 8× fewer multiply-adds) and what remains is this
resize-and-add of wide maps.

On float32/float64 CPU tensors the C++/OpenMP kernel of ``kernels/upsample_add_cpu.cpp`` runs
(through a :class:`torch.autograd.Function`): every output plane is read and written once (the
maps interpolated along the width first, then each output row gets its two weighted rows per
map), and the backward reduces the gradient into each map in one pass per plane (the adjoint of
the interpolation, in row order: deterministic, no atomics). PyTorch's own resize of a 1080-channel
map is several times slower forward and far slower backward (a scatter per map). Everything else
(CUDA, bfloat16 under autocast, ``torch.compile`` tracing, TorchScript) uses the reference,
:func:`upsample_add_reference`.

Backends (``set_backend`` / ``ops.upsample_add.backend`` in the Hydra config):

* ``auto`` (default): the kernel where it applies, JIT-built on first use (about 30 s once,
  cached like the other kernels); if it cannot be built, the reference with a one-time warning.
* ``cpp``: the kernel where it applies, an error if it cannot be built.
* ``torch``: always the reference (and :func:`~atrc_exp.models.layers.pointwise_conv_of_concat`
  callers in the models fall back to their plain convolution of the concatenated features).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .switch import BackendSwitch

__all__ = [
    "BACKENDS",
    "conv1x1_upsample_add",
    "get_backend",
    "kernel_applies",
    "kernel_available",
    "set_backend",
    "upsample_add",
    "upsample_add_reference",
]

BACKENDS = ("auto", "cpp", "torch")
_switch = BackendSwitch("upsample_add", BACKENDS, kind="ups_cpp", fallback="using PyTorch's interpolate")
_extension = _switch.extension  # the built kernel module, or None (auto, build failed: warned once)

set_backend, get_backend = _switch.accessors("upsample_add")


def upsample_add_reference(base: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``base + Σ F.interpolate(m, size=base.shape[-2:], mode="bilinear", align_corners=False)``
    (maps of ``base``'s size added as they are), in PyTorch ops."""
    size = tuple(base.shape[-2:])
    out = base
    for m in maps:
        if tuple(m.shape[-2:]) != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        out = out + m
    return out


def kernel_applies(base: torch.Tensor, maps: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`upsample_add` runs the C++ kernel for these tensors (before building it):
    backend not ``torch``, float32/float64 CPU tensors of one dtype, 4-D with the same B and C,
    no empty map, outside ``torch.compile`` / TorchScript and CPU autocast."""
    if _switch.name == "torch" or base.device.type != "cpu" or base.dim() != 4:
        return False
    if base.dtype not in (torch.float32, torch.float64):
        return False
    for m in maps:
        if m.device.type != "cpu" or m.dtype != base.dtype or m.dim() != 4 or m.numel() == 0:
            return False
        if m.shape[:2] != base.shape[:2]:
            return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.is_autocast_enabled("cpu"):
        return False
    return True


def kernel_available(base: torch.Tensor, maps: Sequence[torch.Tensor]) -> bool:
    """:func:`kernel_applies` and the kernel is built (building it on first use under ``auto``;
    False, warned once, when it cannot be)."""
    return kernel_applies(base, maps) and _extension() is not None


def _resize_add(ext, base: torch.Tensor, maps: Sequence[torch.Tensor], inplace: bool) -> torch.Tensor:
    """The kernel's ``base + Σ resize(m)``, into ``base`` itself or a new tensor."""
    maps = [m.contiguous() for m in maps]
    return ext.forward(base if inplace else torch.empty_like(base), base, None, None, maps)


def _conv_resize_add(ext, x0: torch.Tensor, w0: torch.Tensor, maps: Sequence[torch.Tensor]):
    """The kernel's ``conv1x1(x0, w0) + Σ resize(m)``; returns it and the contiguous ``x0`` and
    C×K weight it read (what the backward needs)."""
    C, K = w0.shape[:2]
    x0 = x0.contiguous()
    w = w0.reshape(C, K).contiguous()
    out = x0.new_empty(x0.shape[0], C, *x0.shape[-2:])
    return ext.forward(out, None, x0, w, [m.contiguous() for m in maps]), x0, w


class _UpsampleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, inplace: bool, base, *maps):  # noqa: D102
        if inplace:
            ctx.mark_dirty(base)
        out = _resize_add(ext, base, maps, inplace)
        ctx.ext = ext
        ctx.sizes = [list(m.shape[-2:]) for m in maps]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        need = ctx.needs_input_grad[3:]
        dmaps = ctx.ext.backward(grad.contiguous(), None, ctx.sizes) if any(need) else [None] * len(need)
        return (None, None, grad, *dmaps)


class _Conv1x1UpsampleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ext, x0, w0, *maps):  # noqa: D102
        out, x0, w = _conv_resize_add(ext, x0, w0, maps)
        ctx.save_for_backward(x0, w)
        ctx.ext = ext
        ctx.w0_shape = w0.shape
        ctx.sizes = [list(m.shape[-2:]) for m in maps]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x0, w = ctx.saved_tensors
        grad = grad.contiguous()
        need_x0, need_w0 = ctx.needs_input_grad[1:3]
        got = ctx.ext.backward(grad, x0 if need_w0 else None, ctx.sizes)
        dw0 = got.pop(0).view(ctx.w0_shape) if need_w0 else None
        dx0 = F.conv2d(grad, w.t().reshape(w.shape[1], w.shape[0], 1, 1)) if need_x0 else None
        dmaps = [d if n else None for d, n in zip(got, ctx.needs_input_grad[3:])]
        return (None, dx0, dw0, *dmaps)


def upsample_add(base: torch.Tensor, maps: Sequence[torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """``base + Σ resize(m)`` (see the module docstring). ``inplace=True`` writes into ``base``
    (a tensor the caller owns and autograd does not need, e.g. a fresh convolution output) where
    the kernel runs; the reference never modifies ``base``."""
    maps = list(maps)
    if not maps:
        return base
    ext = _extension() if kernel_applies(base, maps) else None
    if ext is None:
        return upsample_add_reference(base, maps)
    inplace = inplace and base.is_contiguous()
    if not inplace:
        base = base.contiguous()
    if torch.is_grad_enabled() and (base.requires_grad or any(m.requires_grad for m in maps)):
        return _UpsampleAdd.apply(ext, inplace, base, *maps)
    return _resize_add(ext, base, maps, inplace)


def conv1x1_upsample_add(x0: torch.Tensor, w0: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``F.conv2d(x0, w0) + Σ resize(m)`` for a 1×1 ``w0`` (C×K×1×1, no bias; ``x0`` B×K×H×W, maps
    B×C×hᵢ×wᵢ): the product with ``x0`` inside the kernel, never written apart (see the module
    docstring); the reference is ``F.conv2d`` then :func:`upsample_add_reference`."""
    maps = list(maps)
    ext = None
    if w0.dim() == 4 and tuple(w0.shape[-2:]) == (1, 1) and x0.dim() == 4 and w0.dtype == x0.dtype:
        base_like = x0.new_empty(()).expand(x0.shape[0], w0.shape[0], *x0.shape[-2:])
        if kernel_applies(base_like, maps) and w0.device == x0.device:
            ext = _extension()
    if ext is None:
        return upsample_add_reference(F.conv2d(x0, w0), maps)
    if torch.is_grad_enabled() and (
        x0.requires_grad or w0.requires_grad or any(m.requires_grad for m in maps)
    ):
        return _Conv1x1UpsampleAdd.apply(ext, x0, w0, *maps)
    return _conv_resize_add(ext, x0, w0, maps)[0]
