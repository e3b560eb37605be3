"""``label_attention(query, key, value)``: the attention of ATRC's label-context blocks.

Contract (what ``LabelContextBlock.attend`` computes): ``query`` B×d×H×W (any strides), ``key``
B×d×K×1 and ``value`` B×d_v×K×1 (K = number of classes, small: 2 to 40; d_v = d in the blocks), all
of one dtype; with N = H·W,

    out[b, :, n] = Σ_k softmax_k(⟨query[b, :, n], key[b, :, k]⟩ / √d) · value[b, :, k]

returned as B×d_v×H×W. :func:`label_attention_add` adds it into a given tensor instead (the ATRC
module folds the ``out_proj`` convolution into the values — d_v = its output width — and sums the
label blocks of a target in place: ``ATRCModule.fold`` in :mod:`atrc_exp.models.relational_head`).
:func:`label_attention_reference` is the PyTorch formulation (two ``bmm``, a softmax over the last
dimension, transposes); the result of the reference is a non-contiguous view (strides (N·d, 1,
d)), the kernel's is NCHW-contiguous: same values up to float rounding.

On float32/float64 CPU tensors the C++/OpenMP kernel of ``kernels/label_attention_cpu.cpp`` runs
(forward and backward, through a :class:`torch.autograd.Function`): it works on tiles of 64 pixels
in NCHW layout, keeps the tile's K×64 scores and probabilities in L1, vectorises every product over
pixels and recomputes the probabilities in the backward instead of saving them (only q, k and v
are saved). The pixel reductions of the key/value gradients are deterministic: fixed chunks of 256
pixels, summed in chunk order, whatever the number of threads. Everything else uses the reference:
CUDA, other dtypes (bfloat16 under autocast; also any float32 call while CPU autocast is on, as the
reference's matmuls would run in bfloat16 there), ``torch.compile`` tracing and TorchScript, empty
tensors or shapes the reference itself rejects.

Backends (``set_backend``; the Hydra key ``ops.label_attention.backend``):

* ``auto`` (default): the kernel where it applies, JIT-built on first use (about 30 s once,
  cached like the other kernels); if it cannot be built, the reference with a one-time warning.
* ``cpp``: the kernel where it applies, an error if it cannot be built.
* ``torch``: always the reference.

Speed (``python benchmarks/bench_label_attention.py``: float32, B = 2, N = 48×64, 2 threads,
median ms per call, reference and kernel timed alternately in one process; 2-core AMD EPYC Zen 4
VM, 2026-11-30; repeated runs vary by about ±10%):

====== ======== ========== ===== ============ ============== =====
d, K   ref fwd  kernel fwd ×     ref fwd+bwd  kernel fwd+bwd ×
====== ======== ========== ===== ============ ============== =====
33, 2  0.52     0.05       ~10   1.30         0.21           ~6
33, 40 0.47     0.23       2.0   1.30         0.87           1.5
67, 40 0.77     0.40       1.9   2.24         1.53           1.5
====== ======== ========== ===== ============ ============== =====

The kernel calls alone (no autograd, inputs in cache) take 0.21 + 0.51 ms for d = 33, K = 40 and
0.03 + 0.06 ms for K = 2; the rest of the op's forward + backward is the Python autograd.Function
(about 0.05 ms) and inputs coming from L3. With K = 40 the work is arithmetic (7 products of
d×K×N multiply-adds per forward + backward; the kernel runs at about 80% of the machine's FMA
peak), so the gain there is bounded; with small K the reference is dominated by its memory
passes, layout copies and per-op overheads.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .switch import BackendSwitch

__all__ = [
    "BACKENDS",
    "get_backend",
    "kernel_applies",
    "label_attention",
    "label_attention_add",
    "label_attention_reference",
    "set_backend",
]

BACKENDS = ("auto", "cpp", "torch")
_switch = BackendSwitch("label_attention", BACKENDS, kind="label_cpp", fallback="using the PyTorch reference")
_extension = _switch.extension  # the built kernel module, or None (auto, build failed: warned once)

set_backend, get_backend = _switch.accessors("label_attention")


def label_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The PyTorch formulation: query B×d×H×W, key B×d×K×1, value B×d_v×K×1 → B×d_v×H×W."""
    B, d, H, W = query.shape
    dv = value.shape[1]
    key = key.reshape(B, d, -1)  # B×d×K
    value = value.reshape(B, dv, -1).transpose(1, 2)  # B×K×d_v
    query = query.reshape(B, d, -1).transpose(1, 2)  # B×N×d
    sim = torch.matmul(query, key).div_(d**0.5)  # B×N×K
    sim = sim.softmax(dim=-1)
    out = torch.matmul(sim, value).transpose(1, 2)  # B×d_v×N
    return out.view(B, dv, H, W)


def _kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    if _switch.name == "torch" or query.dim() != 4 or key.dim() < 3:
        return False
    if query.dtype not in (torch.float32, torch.float64):
        return False
    for t in (query, key, value):
        if t.device.type != "cpu" or t.dtype != query.dtype or t.numel() == 0:
            return False
    B, d = query.shape[:2]
    if tuple(key.shape[:2]) != (B, d) or value.shape[0] != B or value.shape[2:] != key.shape[2:]:
        return False  # the reference raises (or broadcasts) as it always did
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return True


def _images_contiguous(x: torch.Tensor) -> bool:
    """Whether every ``x[b]`` is contiguous (the batch stride may be anything)."""
    expect = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


def _grad_layout(grad: torch.Tensor) -> torch.Tensor:
    """The kernel reads a gradient whose images are apart (a channel slice of a wider map's) in
    place; anything else is made contiguous."""
    return grad if _images_contiguous(grad) else grad.contiguous()


class _LabelAttention(torch.autograd.Function):
    """The kernel's attention; with ``base``, added into it in place (``base`` marked dirty, its
    gradient passes through). ``base`` comes first: autograd's in-place update of a view
    (``CopySlices``) takes the first gradient a Function returns as the one of the tensor it
    modified."""

    @staticmethod
    def forward(ctx, base, q, k, v, ext):  # noqa: D102
        scale = q.shape[1] ** -0.5
        if base is not None:
            ctx.mark_dirty(base)
        out = ext.forward(q, k, v, scale, base)
        ctx.save_for_backward(q, k, v)
        ctx.ext = ext
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        q, k, v = ctx.saved_tensors
        if any(ctx.needs_input_grad[1:4]):
            dq, dk, dv = ctx.ext.backward(_grad_layout(grad), q, k, v, ctx.scale)
        else:
            dq = dk = dv = None
        return grad if ctx.needs_input_grad[0] else None, dq, dk, dv, None


def _run_kernel(ext, query, key, value, base=None) -> torch.Tensor:
    """The kernel on the op's inputs (and ``base`` to add into), through autograd where needed.
    The kernel flattens the trailing dimensions itself (no view nodes in the autograd graph) and
    reads a query whose images are apart (a channel slice of a wider map) in place."""
    q = query if _images_contiguous(query) else query.contiguous()
    k, v = key.contiguous(), value.contiguous()
    inputs = (q, k, v) if base is None else (q, k, v, base)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _LabelAttention.apply(base, q, k, v, ext)
    return ext.forward(q, k, v, q.shape[1] ** -0.5, base)  # nothing to differentiate


def kernel_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`label_attention` runs the C++ kernel for these tensors (before building it)."""
    return _kernel_applies(query, key, value)


def label_attention_add(
    base: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``base + label_attention(query, key, value)``; ``base`` (B×d_v×H×W, a tensor the caller owns
    that autograd does not need, e.g. the output of an earlier call) is written in place where the
    kernel runs (images contiguous, any batch stride), the reference adds out of place."""
    ext = _extension() if _kernel_applies(query, key, value) else None
    if ext is None or base.dtype != query.dtype or not _images_contiguous(base) or base.dim() != 4:
        return base + label_attention(query, key, value)
    return _run_kernel(ext, query, key, value, base)


def label_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``softmax_K(qᵀk/√d)·v`` per pixel: query B×d×H×W, key B×d×K×1, value B×d_v×K×1 →
    B×d_v×H×W (see the module docstring for when the C++ kernel runs)."""
    ext = _extension() if _kernel_applies(query, key, value) else None
    if ext is None:
        return label_attention_reference(query, key, value)
    return _run_kernel(ext, query, key, value)
