"""FCN heads: the single-task and multi-task baselines (``context=none``).

Module names follow the original implementation (``head.bottleneck.<task>``,
``head.final_logits.<task>``), so its baseline checkpoints import without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNReLU


class MultiTaskFCNHead(nn.Module):
    """Per task: ``bottleneck`` ConvBNReLU 3×3 (C_in → C_in//4), then ``final_logits`` 1×1 conv with
    bias to the task's output channels (init normal(0, 0.01), bias 0).

    ``forward(x: B×C_in×h×w, image=None) -> {"final": {task: B×C_t×h×w}}`` (at feature
    resolution; ``image`` is accepted for a uniform head interface and unused).
    """

    def __init__(self, c_in: int, out_channels: dict[str, int], aux_channels: dict[str, int] | None = None):
        super().__init__()
        self.tasks = list(out_channels)
        self.bottleneck = nn.ModuleDict({t: ConvBNReLU(c_in, c_in // 4, kernel_size=3) for t in self.tasks})
        self.final_logits = nn.ModuleDict(
            {t: nn.Conv2d(c_in // 4, c, 1, bias=True) for t, c in out_channels.items()}
        )
        for m in self.final_logits.values():
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, image: torch.Tensor | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        return {"final": {t: self.final_logits[t](self.bottleneck[t](x)) for t in self.tasks}}
