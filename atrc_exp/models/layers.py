"""Small building blocks shared by heads and context blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU; ``relu=False`` gives ConvBN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, relu: bool = True, affine: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) to ``size``; identity when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def concat_features(features: list[torch.Tensor]) -> torch.Tensor:
    """Upsample every map to the first one's size and concatenate along channels."""
    size = tuple(features[0].shape[-2:])
    return torch.cat([resize_to(f, size) for f in features], dim=1)
