"""The full network: backbone → concatenated multi-scale features → head → outputs at input size."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..config import config_tasks, instantiate
from .layers import resize_to


class MultiTaskModel(nn.Module):
    """``model(image: B×3×H×W) -> {"final": {task: B×C×H×W}, "aux": {...}}`` at input resolution.

    ``aux`` is present only when the head makes auxiliary predictions. The head's maps (at the
    resolution of the first backbone branch, H/4×W/4 for HRNet) are upsampled bilinearly to the
    input size.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, tasks: list[str]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.tasks = list(tasks)

    def forward(self, image: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        feats = self.backbone(image)  # every map upsampled to the first one's size, concatenated
        out = self.head(torch.cat([resize_to(f, feats[0].shape[-2:]) for f in feats], dim=1), image=image)
        size = tuple(image.shape[-2:])
        return {kind: {t: resize_to(v, size) for t, v in preds.items()} for kind, preds in out.items()}


def build_model(cfg: DictConfig) -> MultiTaskModel:
    """The network of a composed config: ``backbone`` and ``context.head`` built from their
    ``_target_``, the head given the backbone's channels (summed; its first argument) and each
    task's ``out_channels`` and ``aux_channels`` (``{task: channels}``, from ``dataset.task_specs``)."""
    backbone = instantiate(cfg, "backbone")
    tasks = config_tasks(cfg)
    head = instantiate(
        cfg,
        "context.head",
        sum(backbone.out_channels),
        out_channels={t.name: t.final_channels for t in tasks},
        aux_channels={t.name: t.aux_channels for t in tasks},
    )
    return MultiTaskModel(backbone, head, [t.name for t in tasks])
