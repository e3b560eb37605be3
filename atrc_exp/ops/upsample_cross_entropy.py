"""``upsample_cross_entropy``: bilinear upsampling fused into the (weighted) cross-entropy.

``upsample_cross_entropy(logits, target, weight) -> Σ_i weight_i · CE(z_i, target_i)`` where
``logits`` are low-resolution class logits B×C×h×w, ``z = F.interpolate(logits, size=(H, W),
mode="bilinear", align_corners=False)`` the full-resolution ones (never materialised), ``target``
B×H×W int64 class indices in [0, C) and ``weight`` B×H×W (0 for ignored pixels). It equals
``(weight * F.cross_entropy(z, target, reduction="none")).sum()`` up to float rounding, forward
and backward. :func:`upsample_cross_entropy_ignore` (what :func:`atrc_exp.losses.cross_entropy_loss`
calls) takes the raw target with its ignore index and optional class weights instead of per-pixel
weights, and also returns the sum of the weights (the mean's denominator).

Why: the loss of a dense classification output at the input resolution is the costliest part
of the step that scales with the number of classes. PyTorch's path writes the full-resolution
logits, reads them for the log-softmax, writes the log-probabilities, and in the backward writes
a full-resolution gradient and reads it for the upsampling's backward — each 16× the size of the
network's output for a 4× upsampling (15.7 MB for 2×40×192×256). The C++/OpenMP kernel of
``kernels/upsample_cross_entropy_cpu.cpp`` interpolates the logits of one output row at a time
in cache, saves only the per-pixel log-sum-exp, and scatters the backward into the low-resolution
gradient directly (deterministic: no atomics). CPU, float32/float64; everything else takes
PyTorch's path in :func:`atrc_exp.losses.cross_entropy_loss`. ``make bench-ce``: 2×40×48×64 →
192×256 forward 3.8 → 2.0 ms, forward + backward 7.6 → 5.0 ms (2 threads); an ATRC training step
−37 ms and −108 MiB peak memory (``benchmarks/RESULTS.md``).

The same extension computes the aux normals target (:func:`nearest_centroid_index`: the nearest
of K centroids per pixel without the B×K×H×W similarity map).

Backends (``set_backend`` / ``ops.upsample_cross_entropy.backend`` in the Hydra config):

* ``auto`` (default): the kernel where it applies, JIT-built on first use (about 40 s once,
  cached like the other kernels); if it cannot be built, PyTorch's path with a one-time warning.
* ``cpp``: the kernel where it applies, an error if it cannot be built.
* ``torch``: always PyTorch's path (upsample, then the cross-entropy).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .switch import BackendSwitch

__all__ = [
    "BACKENDS",
    "get_backend",
    "kernel_applies",
    "nearest_centroid_index",
    "set_backend",
    "upsample_cross_entropy",
    "upsample_cross_entropy_ignore",
]

BACKENDS = ("auto", "cpp", "torch")
_switch = BackendSwitch(
    "upsample_cross_entropy", BACKENDS, kind="ce_cpp", fallback="upsampling before the cross-entropy instead"
)
_extension = _switch.extension  # the built kernel module, or None (auto, build failed: warned once)

set_backend, get_backend = _switch.accessors("upsample_cross_entropy")


def kernel_applies(logits: torch.Tensor) -> bool:
    """Whether :func:`upsample_cross_entropy` can run on ``logits`` (B×C×h×w): the backend is not
    ``torch``, a float32/float64 CPU tensor, not under ``torch.compile``, and the kernel builds."""
    if _switch.name == "torch" or logits.device.type != "cpu" or logits.dim() != 4:
        return False
    if logits.dtype not in (torch.float32, torch.float64) or logits.numel() == 0:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    return _extension() is not None


class _UpsampleCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, class_weight, ignore_index: int, ext):  # noqa: D102
        total, lse, den = ext.forward(x, target, weight, class_weight, ignore_index)
        ctx.save_for_backward(x, target, lse)
        ctx.weights = (weight, class_weight, ignore_index)
        ctx.ext = ext
        ctx.mark_non_differentiable(den)
        return total, den

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_den):  # noqa: D102
        x, target, lse = ctx.saved_tensors
        weight, class_weight, ignore_index = ctx.weights
        dx = ctx.ext.backward(grad, x, target, weight, class_weight, ignore_index, lse)
        return dx, None, None, None, None, None


def _checked_extension(logits: torch.Tensor, target: torch.Tensor):
    if target.dim() != 3 or logits.dim() != 4 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"upsample_cross_entropy: logits {tuple(logits.shape)} need a B×H×W target of the same "
            f"batch, got {tuple(target.shape)}"
        )
    ext = _extension()
    if ext is None:
        raise RuntimeError("upsample_cross_entropy: the kernel is unavailable; check kernel_applies() first")
    return ext


def upsample_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ weight · cross_entropy(bilinear_resize(logits, target.shape[-2:]), target)`` (0-dim, the
    dtype of ``logits``) with the kernel; ``logits`` B×C×h×w, ``target`` B×H×W int64 in [0, C),
    ``weight`` B×H×W. Call only where :func:`kernel_applies`; the gradient reaches ``logits``
    only."""
    ext = _checked_extension(logits, target)
    if weight.shape != target.shape:
        raise ValueError(
            f"upsample_cross_entropy: weight {tuple(weight.shape)} must have the target's shape "
            f"{tuple(target.shape)}"
        )
    w = weight.to(logits.dtype).contiguous()
    return _UpsampleCrossEntropy.apply(logits.contiguous(), target.contiguous(), w, None, -1, ext)[0]


def upsample_cross_entropy_ignore(
    logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_i w_i · CE_i, Σ_i w_i)`` over the full-resolution pixels, ``w_i`` = 0 where ``target``
    (B×H×W int64) equals ``ignore_index``, else ``class_weight[target_i]`` (1 without class
    weights): the numerator and denominator of PyTorch's weighted-mean cross-entropy, with the
    ignore test and the class weights inside the kernel (no per-pixel tensors built in Python).
    The denominator carries no gradient. Call only where :func:`kernel_applies`."""
    ext = _checked_extension(logits, target)
    cw = None if class_weight is None else class_weight.to(logits.dtype).contiguous()
    total, den = _UpsampleCrossEntropy.apply(
        logits.contiguous(), target.contiguous(), None, cw, int(ignore_index), ext
    )
    return total, den


def nearest_centroid_index(normals: torch.Tensor, centroids: torch.Tensor, eps: float = 1e-12):
    """Index (int64 B×H×W) of the centroid with the largest ``c_k · n̂`` per pixel, the first on
    ties, where ``n̂`` is ``normals`` (B×3×H×W) L2-normalised per pixel as
    :func:`atrc_exp.losses.l2_normalize_channels` and ``centroids`` (K×3) are already normalised;
    or None where the kernel does not apply (not float32 CPU tensors, backend ``torch``, under
    ``torch.compile``, no kernel) or a similarity is NaN: the caller takes PyTorch's path then."""
    if normals.dtype != torch.float32 or centroids.dtype != torch.float32 or not kernel_applies(normals):
        return None
    if centroids.device.type != "cpu" or bool(torch.isnan(centroids).any()):
        return None
    idx, nan = _extension().nearest_centroid(normals.contiguous(), centroids.contiguous(), float(eps))
    return None if bool(nan) else idx
