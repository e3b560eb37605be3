"""The full network: backbone → concatenated multi-scale features → head → outputs at input size."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from ..config import ConfigError, config_tasks
from .backbones import build_backbone
from .context_blocks import CONTEXTS
from .genotype import load_genotype
from .heads import MultiTaskFCNHead
from .layers import concat_features, resize_to
from .relational_head import RelationalContextHead, uniform_genotype


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
        out = self.head(concat_features(self.backbone(image)), image=image)
        size = tuple(image.shape[-2:])
        return {kind: {t: resize_to(v, size) for t, v in preds.items()} for kind, preds in out.items()}


def build_model(cfg: DictConfig) -> MultiTaskModel:
    """Build the network of a composed config (``backbone``, ``tasks``, ``context``, ``dataset``)."""
    tasks = list(cfg.tasks.names)
    bb = cfg.backbone
    extra = {}
    if bb.name == "timm":
        extra = {"model_name": bb.model_name, "out_indices": bb.get("out_indices")}
    weights_dir = cfg.paths.get("weights_dir") if "paths" in cfg else None
    backbone = build_backbone(bb.name, pretrained=bb.pretrained, weights_dir=weights_dir, **extra)
    c_in = sum(backbone.out_channels)
    task_objects = config_tasks(cfg)
    out_ch = {t.name: t.final_channels for t in task_objects}
    aux_ch = {t.name: t.aux_channels for t in task_objects}
    ctx = cfg.context.name
    if ctx == "none":  # the FCN baseline
        return MultiTaskModel(backbone, MultiTaskFCNHead(c_in, out_ch), tasks)
    if ctx == "atrc":
        path = cfg.context.get("genotype")
        if path in (None, "", "null"):
            raise ConfigError(
                "context=atrc needs a genotype: pass context.genotype=<genotype.json> or a search "
                "run directory holding atrc_genotype.json (published ones are in genotypes/)"
            )
        genotype = load_genotype(path, tasks)
    elif ctx == "search":
        genotype = None  # every pair mixes all candidate contexts
    else:  # a context type of CONTEXTS (with a CP block) on every pair
        types = [c.name for c in CONTEXTS if c.block is not None]
        if ctx not in types:
            raise ConfigError(
                f"unknown context {ctx!r}: choose one of {', '.join(['none', *types, 'atrc', 'search'])}"
            )
        genotype = uniform_genotype(tasks, ctx)
    head = RelationalContextHead(
        c_in,
        tasks,
        genotype,
        out_ch,
        aux_ch,
        dropout=float(cfg.context.get("dropout", 0.05)),
        kernel_size=int(cfg.context.get("kernel_size", 9)),
    )
    return MultiTaskModel(backbone, head, tasks)
