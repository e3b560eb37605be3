"""Pure-PyTorch reference of the local-attention op (the fallback backend and the test oracle).

Semantics (ATRC's local context): for query, key, value of shape B×C×H×W and an odd window k,
each pixel attends to the k×k window of keys around it with scores ``<q, k> / sqrt(C)``; the
softmax runs over all k² positions; the output is the weighted sum of the values' k×k window.
Window positions outside the image are *zero* keys and values: they score exactly 0 and stay in
the softmax (they dilute the weights but contribute nothing to the output).

Implementation: pad key/value by r = k // 2 zeros and loop over the k² offsets, so memory is
O(B·C·H·W + B·k²·H·W) (no ``F.unfold`` C·k² blow-up). The forward also returns the per-pixel
log-sum-exp of the scores, so the backward recomputes the weights exactly without a second
max/sum pass (the same contract as the C++ and CUDA kernels).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def _scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int):
    """``(padded key, padded value, B×k²×H×W scaled scores of each pixel against its window of
    keys, window offsets (dy, dx) in the order of the scores)``."""
    B, C, H, W = query.shape
    r = kernel_size // 2
    kp = F.pad(key, (r, r, r, r))
    vp = F.pad(value, (r, r, r, r))
    offsets = list(itertools.product(range(kernel_size), repeat=2))
    s = query.new_empty(B, kernel_size * kernel_size, H, W)
    for o, (dy, dx) in enumerate(offsets):
        s[:, o] = (query * kp[:, :, dy : dy + H, dx : dx + W]).sum(1)
    return kp, vp, s.mul_(1.0 / math.sqrt(C)), offsets


def reference_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out B×C×H×W, lse B×H×W) where lse is the log-sum-exp of the scaled scores."""
    H, W = query.shape[2:]
    _, vp, s, offsets = _scores(query, key, value, kernel_size)
    lse = torch.logsumexp(s, dim=1)
    a = torch.exp(s - lse.unsqueeze(1))
    out = torch.zeros_like(query)
    for o, (dy, dx) in enumerate(offsets):
        out.addcmul_(a[:, o : o + 1], vp[:, :, dy : dy + H, dx : dx + W])
    return out, lse


def reference_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-written backward: (grad_query, grad_key, grad_value)."""
    B, C, H, W = query.shape
    r = kernel_size // 2
    kp, vp, s, offsets = _scores(query, key, value, kernel_size)
    a = torch.exp(s - lse.unsqueeze(1))
    # dA[o] = <g, v_o>
    da = query.new_empty(B, kernel_size * kernel_size, H, W)
    for o, (dy, dx) in enumerate(offsets):
        da[:, o] = (grad_out * vp[:, :, dy : dy + H, dx : dx + W]).sum(1)
    # softmax backward: dS = A * (dA - sum_o A*dA), then the 1/sqrt(C) scale
    ds = a * (da - (a * da).sum(1, keepdim=True))
    ds.mul_(1.0 / math.sqrt(C))
    gq = torch.zeros_like(query)
    gkp = torch.zeros_like(kp)
    gvp = torch.zeros_like(vp)
    for o, (dy, dx) in enumerate(offsets):
        dso = ds[:, o : o + 1]
        gq.addcmul_(dso, kp[:, :, dy : dy + H, dx : dx + W])
        gkp[:, :, dy : dy + H, dx : dx + W].addcmul_(dso, query)
        gvp[:, :, dy : dy + H, dx : dx + W].addcmul_(a[:, o : o + 1], grad_out)
    gk = gkp[:, :, r : r + H, r : r + W].contiguous()
    gv = gvp[:, :, r : r + H, r : r + W].contiguous()
    return gq, gk, gv
