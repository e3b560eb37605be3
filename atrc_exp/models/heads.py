"""FCN heads: the single-task and multi-task baselines (``context=none``).

Module names follow the original implementation (``head.bottleneck.<task>``,
``head.final_logits.<task>``), so its baseline checkpoints import without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvBNReLU, conv_bn_relu_group


def task_bottlenecks(
    bottleneck: nn.ModuleDict, tasks: list[str], x: torch.Tensor, fused: bool = True
) -> dict[str, torch.Tensor]:
    """``{t: bottleneck[t](x)}``; with ``fused``, the layers (which all read ``x``) run as one
    convolution and one batch norm (:func:`~atrc_exp.models.layers.conv_bn_relu_group`): same
    numbers, float rounding aside, running statistics updated in each layer's own buffers."""
    if not fused or len(tasks) < 2:
        return {t: bottleneck[t](x) for t in tasks}
    layers = [bottleneck[t] for t in tasks]
    y = conv_bn_relu_group(x, layers)
    return dict(zip(tasks, y.split([m[1].num_features for m in layers], dim=1)))


class MultiTaskFCNHead(nn.Module):
    """Per task: ``bottleneck`` ConvBNReLU 3×3 (C_in → C_in//4), then ``final_logits`` 1×1 conv with
    bias to the task's output channels (init normal(0, 0.01), bias 0).

    ``forward(x: B×C_in×h×w, image=None) -> {"final": {task: B×C_t×h×w}}`` (at feature resolution;
    ``image`` is accepted for a uniform head interface and unused).
    """

    def __init__(self, c_in: int, out_channels: dict[str, int]):
        super().__init__()
        self.tasks = list(out_channels)
        self.bottleneck = nn.ModuleDict({t: ConvBNReLU(c_in, c_in // 4, kernel_size=3) for t in self.tasks})
        self.final_logits = nn.ModuleDict(
            {t: nn.Conv2d(c_in // 4, c, 1, bias=True) for t, c in out_channels.items()}
        )
        for m in self.final_logits.values():
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)
        #: the task bottlenecks as one convolution (:func:`task_bottlenecks`); False: one by one
        self.fused = True

    def forward(
        self, x: torch.Tensor, image: torch.Tensor | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        feats = task_bottlenecks(self.bottleneck, self.tasks, x, self.fused)
        return {"final": {t: self.final_logits[t](feats[t]) for t in self.tasks}}
