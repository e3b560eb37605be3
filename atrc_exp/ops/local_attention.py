"""``local_attention(query, key, value, kernel_size=9)``: ATRC's local context op, and its backends.

The computation is registered as the ``torch.library`` custom ops ``atrc_exp::local_attention_fwd``
(returns the output and the per-pixel log-sum-exp of the scores) and
``atrc_exp::local_attention_bwd`` with fake (meta) implementations and autograd, so
``torch.compile`` traces through without graph breaks.

Backends (``set_backend`` / ``ops.local_attention.backend`` in the Hydra config):

* ``auto`` (default): the CUDA kernel for CUDA tensors, the C++/OpenMP kernel for CPU tensors,
  JIT-built on first use; when the build is impossible (no compiler, no nvcc) it falls back to
  the PyTorch reference with a one-time warning.
* ``cuda`` / ``cpp``: that kernel or an error (never a silent fallback).
* ``torch``: the pure-PyTorch reference (:mod:`atrc_exp.ops.reference`).
"""

from __future__ import annotations

import threading
import warnings

import torch

from . import build
from .reference import reference_backward, reference_forward

BACKENDS = ("auto", "cpp", "cuda", "torch")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class _Switch:
    """The process-wide backend choice and the warnings issued once per key."""

    def __init__(self):
        self.name = "auto"
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def warn_once(self, key: str, msg: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def reset_warnings(self) -> None:
        """Forget which warnings were issued (tests)."""
        with self._lock:
            self._warned.clear()


_switch = _Switch()


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"local_attention backend must be one of {BACKENDS}, got {name!r}")


def set_backend(name: str) -> None:
    """Select the implementation used by :func:`local_attention`: auto | cpp | cuda | torch."""
    _check_backend(name)
    _switch.name = name


def get_backend() -> str:
    """The implementation :func:`local_attention` uses now: auto | cpp | cuda | torch."""
    return _switch.name


def available_backends(kinds: tuple[str, ...] = ("cpp", "cuda")) -> list[str]:
    """Backends that work in this process (builds the extensions of ``kinds`` if needed): always
    ``torch``, ``cpp`` when the C++ extension builds, ``cuda`` when CUDA is present and the CUDA
    one builds."""
    out = ["torch"]
    for kind in kinds:
        if kind == "cuda" and not build.cuda_build_possible():
            continue
        try:
            build.get_extension(kind)
            out.append(kind)
        except build.ExtensionBuildError:
            pass
    return out


def _resolve(backend: str, device: torch.device):
    """Returns the extension module to use, or None for the PyTorch reference."""
    kind = "cuda" if device.type == "cuda" else "cpp"
    if backend == "torch":
        return None
    if backend in ("cpp", "cuda"):
        if backend != kind:
            raise ValueError(
                f"local_attention backend {backend!r} cannot run on {device.type} tensors "
                f"(use backend='{kind}', 'torch' or 'auto')"
            )
        return build.get_extension(kind)  # raises ExtensionBuildError
    if device.type not in ("cpu", "cuda"):
        return None
    if kind == "cuda" and not build.cuda_build_possible():
        _switch.warn_once(
            "cuda", "local_attention: no nvcc/CUDA toolkit found, using the slow PyTorch reference on CUDA"
        )
        return None
    try:
        return build.get_extension(kind)
    except build.ExtensionBuildError as e:
        _switch.warn_once(
            kind, f"local_attention: the {kind} kernel is unavailable ({e}); using the slow PyTorch reference"
        )
        return None


@torch.library.custom_op("atrc_exp::local_attention_fwd", mutates_args=())
def _la_fwd(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    ext = _resolve(backend, query.device)
    if ext is not None:
        out, lse = ext.forward(query, key, value, kernel_size)
    elif query.dtype in _LOW_PRECISION:  # the reference in float32; lse stays float32
        out, lse = reference_forward(query.float(), key.float(), value.float(), kernel_size)
        out = out.to(query.dtype)
    else:
        out, lse = reference_forward(query, key, value, kernel_size)
    return out, lse


@_la_fwd.register_fake
def _(query, key, value, kernel_size, backend):
    B, _, H, W = query.shape
    lse_dtype = torch.float32 if query.dtype in _LOW_PRECISION else query.dtype
    return torch.empty_like(query), query.new_empty((B, H, W), dtype=lse_dtype)


@torch.library.custom_op("atrc_exp::local_attention_bwd", mutates_args=())
def _la_bwd(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = _resolve(backend, query.device)
    if ext is not None:
        gq, gk, gv = ext.backward(grad_out, query, key, value, lse, kernel_size)
    elif query.dtype in _LOW_PRECISION:
        grads = reference_backward(
            grad_out.float(), query.float(), key.float(), value.float(), lse, kernel_size
        )
        gq, gk, gv = (g.to(query.dtype) for g in grads)
    else:
        gq, gk, gv = reference_backward(grad_out, query, key, value, lse, kernel_size)
    return gq, gk, gv


@_la_bwd.register_fake
def _(grad_out, query, key, value, lse, kernel_size, backend):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, kernel_size, backend = inputs
    _, lse = output
    ctx.save_for_backward(query, key, value, lse)
    ctx.kernel_size = kernel_size
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    gq, gk, gv = _la_bwd(grad_out.contiguous(), query, key, value, lse, ctx.kernel_size, ctx.backend)
    return gq, gk, gv, None, None


_la_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int) -> None:
    tensors = (query, key, value)
    for n, t in zip(("query", "key", "value"), tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"local_attention: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"local_attention: {n} must be B×C×H×W (rank 4), got shape {tuple(t.shape)}")
    if not (query.shape == key.shape == value.shape):
        raise ValueError(
            "local_attention: query, key and value must have the same shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"local_attention: kernel_size must be an int, got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"local_attention: kernel_size must be a positive odd integer, got {kernel_size}")
    for attr, error in (("device", ValueError), ("dtype", TypeError)):
        got = [getattr(t, attr) for t in tensors]
        if len(set(got)) > 1:
            got = ", ".join(map(str, got))
            raise error(f"local_attention: query, key and value must have the same {attr}, got {got}")
    allowed = (torch.float32, torch.float64) + (_LOW_PRECISION if query.device.type == "cuda" else ())
    if query.dtype not in allowed:
        raise TypeError(
            f"local_attention: dtype {query.dtype} is not supported on {query.device.type} "
            f"(float32/float64 everywhere, bfloat16/float16 on CUDA only)"
        )
    if query.shape[1] == 0:
        raise ValueError("local_attention: the channel dimension must be non-empty")


def local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int = 9,
    backend: str | None = None,
) -> torch.Tensor:
    """Local (k×k window) softmax attention, ATRC's local context.

    Args:
        query, key, value: B×C×H×W tensors (same shape, dtype and device; any strides).
        kernel_size: odd window size k (9 in ATRC).
        backend: ``auto`` | ``cpp`` | ``cuda`` | ``torch``; ``None`` uses :func:`set_backend`'s.

    Returns:
        B×C×H×W: for every pixel, softmax over its k² window of ``<q, k>/sqrt(C)`` (positions
        outside the image are zero keys — score 0, kept in the softmax — and zero values) applied
        to the values' window.
    """
    _check(query, key, value, kernel_size)
    backend = _switch.name if backend is None else backend
    _check_backend(backend)
    out, _ = _la_fwd(query.contiguous(), key.contiguous(), value.contiguous(), kernel_size, backend)
    return out
