"""Small building blocks shared by heads and context blocks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Module):
    """Conv (no bias) → ``nn.BatchNorm2d`` → ReLU; ``relu=False`` gives ConvBN. The original
    implementation's layer: attributes ``conv`` and ``bn`` (state-dict keys ``conv.weight``,
    ``bn.weight``, ``bn.running_mean``, ...)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, relu: bool = True, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)
        self.relu = bool(relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) to ``size``; identity when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Within this context the training-mode batch norms of ``module`` normalise with batch
    statistics as usual but leave their running statistics and ``num_batches_tracked`` as they
    were (momentum 0: ``running = 1·running + 0·batch``, exactly). For a forward that activation
    checkpointing recomputes in the backward, so that a step updates the statistics once."""
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, tracked) in zip(bns, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)
