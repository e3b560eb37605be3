"""FCN heads: the single-task and multi-task baselines (``context=none``)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNReLU


class FCNHead(nn.Module):
    """ConvBNReLU 3×3 (C_in → C_in//4), then a 1×1 conv with bias to ``c_out`` channels."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = ConvBNReLU(c_in, c_in // 4, kernel_size=3)
        self.logits = nn.Conv2d(c_in // 4, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.conv(x))


class MultiTaskFCNHead(nn.Module):
    """One :class:`FCNHead` per task on the shared concatenated features.

    ``forward(x: B×C_in×h×w) -> {"final": {task: B×C_t×h×w}}`` (at feature resolution).
    """

    def __init__(self, c_in: int, out_channels: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({t: FCNHead(c_in, c) for t, c in out_channels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {"final": {t: head(x) for t, head in self.heads.items()}}
