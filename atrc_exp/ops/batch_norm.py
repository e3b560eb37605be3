"""``batch_norm_act``: :func:`torch.nn.functional.batch_norm` with an optional fused ReLU.

Same arguments and semantics as ``F.batch_norm`` (running statistics updated in place with
``momentum``, the unbiased batch variance for ``running_var``), plus ``relu``. In training mode
(batch statistics) on float32/float64 CPU tensors the C++/OpenMP kernel of
``kernels/batch_norm_cpu.cpp`` computes statistics, normalisation and ReLU in one pass over
memory (the backward in another): in isolation 3-6× faster forward+backward than PyTorch's CPU
batch norm followed by a ReLU, inside a training step (inputs coming from DRAM) about 20% less
batch-norm time for the ATRC model (``python benchmarks/bench_batch_norm.py``; numbers in
``benchmarks/RESULTS.md``); same numbers up to float rounding. Everything else (CUDA, bfloat16 under autocast, eval mode, ``torch.compile`` tracing,
non-contiguous inputs) runs ``F.batch_norm`` and ``F.relu``.

Backends (``set_backend`` / ``ops.batch_norm.backend`` in the Hydra config):

* ``auto`` (default): the kernel where it applies, JIT-built on first use (about 40 s once,
  cached like the local-attention kernels); if it cannot be built, PyTorch's with a one-time
  warning.
* ``cpp``: the kernel where it applies, an error if it cannot be built.
* ``torch``: always ``F.batch_norm`` (+ ``F.relu``).

The same extension and switch serve :func:`softplus` (the global-context blocks' queries and
keys): PyTorch's CPU softplus calls the scalar ``log1p``, about 8× slower than the kernel's
vectorised pass; the gradient is PyTorch's own ``softplus_backward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .switch import BackendSwitch

__all__ = [
    "BACKENDS",
    "batch_norm_act",
    "batch_norm_act_batch_stats",
    "constant_vector",
    "get_backend",
    "set_backend",
    "softplus",
]

BACKENDS = ("auto", "cpp", "torch")
_switch = BackendSwitch("batch_norm", BACKENDS, kind="bn_cpp", fallback="using PyTorch's batch norm")
_extension = _switch.extension  # the built kernel module, or None (auto, build failed: warned once)

set_backend, get_backend = _switch.accessors("batch_norm_act")


def _kernel_applies(x: torch.Tensor, training: bool, weight, bias) -> bool:
    if _switch.name == "torch" or not training or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.float64) or x.dim() < 2 or not x.is_contiguous():
        return False
    if x.numel() == 0 or x.numel() // x.shape[1] <= 1:  # F.batch_norm raises its own error for M = 1
        return False
    for p in (weight, bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    return True


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, relu: bool, ext):  # noqa: D102
        y, mean, invstd, var = ext.forward(x, weight, bias, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.relu = relu
        ctx.ext = ext
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _gm, _gv):  # noqa: D102
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dw, db = ctx.ext.backward(grad.contiguous(), x, weight, bias, mean, invstd, ctx.relu)
        return dx, dw, db, None, None, None


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant_vector(value: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """A length-``n`` vector of ``value`` with ``like``'s dtype and device, made once per
    (value, n, dtype, device) and shared (read it, never write it): the weight or bias of a batch
    norm that has none, without an allocation and fill per call; a fresh one while
    ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return like.new_full((n,), value)
    key = (value, n, like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # usable with autograd even if first made in inference
            t = _CONSTANTS[key] = like.new_full((n,), value)
    return t


def _run_kernel(ext, x, weight, bias, eps: float, relu: bool):
    """The kernel's ``(y, batch mean, unbiased batch variance)``; a missing weight / bias is ones /
    zeros."""
    C = x.shape[1]
    w = weight if weight is not None else constant_vector(1.0, C, x)
    b = bias if bias is not None else constant_vector(0.0, C, x)
    return _BatchNormAct.apply(x, w.contiguous(), b.contiguous(), float(eps), bool(relu), ext)


def batch_norm_act_batch_stats(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Training-mode ``batch_norm_act`` without running statistics, through the kernel only:
    ``(y, batch mean, unbiased batch variance)`` (the statistics detached), or None where the
    kernel does not apply (then call :func:`batch_norm_act`). Lets a caller update several modules'
    running statistics from one call (``torch._foreach_*`` over their buffers)."""
    ext = _extension() if _kernel_applies(x, True, weight, bias) else None
    return None if ext is None else _run_kernel(ext, x, weight, bias, eps, relu)


def batch_norm_act(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = False,
) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``
    followed by ``F.relu`` when ``relu``; x is N×C×... . With ``training`` the running statistics
    (if given) are updated in place: ``r ← (1 − momentum)·r + momentum·batch`` (unbiased variance).
    """
    ext = _extension() if _kernel_applies(x, training, weight, bias) else None
    if ext is None:
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y, inplace=True) if relu else y
    y, mean, var = _run_kernel(ext, x, weight, bias, eps, relu)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1.0 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return y


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, beta: float, threshold: float, ext):  # noqa: D102
        ctx.save_for_backward(x)
        ctx.beta, ctx.threshold = beta, threshold
        return ext.softplus(x, beta, threshold)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(grad, x, ctx.beta, ctx.threshold), None, None, None


def softplus(x: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``F.softplus(x, beta, threshold)``: ``x`` where ``x·beta > threshold``, else
    ``log1p(exp(x·beta))/beta``. On float32/float64 CPU tensors whose samples ``x[n]`` are contiguous
    (a channel slice of a larger NCHW tensor qualifies) one vectorised C++ pass (within 3e-7
    relative of the float64 result; 0 where it is below the normal floats); elsewhere (CUDA,
    other dtypes, ``torch.compile`` tracing, backend ``torch``) ``F.softplus``. The output is
    contiguous."""
    ext = None
    if (
        _switch.name != "torch"
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() >= 1
        and x.numel() > 0
        and x[0].is_contiguous()
        and not (torch.compiler.is_compiling() or torch.jit.is_scripting())
    ):
        ext = _extension()
    if ext is None:
        return F.softplus(x, beta, threshold)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Softplus.apply(x, float(beta), float(threshold), ext)
    return ext.softplus(x, float(beta), float(threshold))
