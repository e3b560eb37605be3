"""The assembled network: parameter counts of the original, output shapes at odd sizes."""

from __future__ import annotations

import torch
from conftest import compose_cfg

import atrc_exp


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_multitask_baseline_parameter_count_matches_original():
    model = atrc_exp.build_model(compose_cfg(["dataset=nyud", "context=none"]))
    assert _count(model.backbone) == 3_860_720
    assert _count(model) == 4_515_556


def test_single_task_head_and_outputs_at_odd_size():
    model = atrc_exp.build_model(compose_cfg(["dataset=nyud", "tasks=normals"])).eval()
    assert list(model.head.bottleneck) == ["normals"] and list(model.head.final_logits) == ["normals"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 97, 131))
    assert set(out) == {"final"} and out["final"]["normals"].shape == (1, 3, 97, 131)


def test_multitask_outputs_have_task_channels():
    cfg = compose_cfg(["dataset=pascal_context"])
    model = atrc_exp.build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 72))["final"]
    assert {t: v.shape[1] for t, v in out.items()} == {
        "semseg": 21,
        "human_parts": 7,
        "sal": 2,
        "normals": 3,
        "edge": 1,
    }
    assert all(v.shape[-2:] == (64, 72) and torch.isfinite(v).all() for v in out.values())


def test_timm_backbone_builds():
    cfg = compose_cfg(["backbone=timm", "backbone.model_name=resnet18"])
    model = atrc_exp.build_model(cfg).eval()
    assert sum(model.backbone.out_channels) == 64 + 64 + 128 + 256 + 512 or model.backbone.out_channels
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))["final"]
    assert out["semseg"].shape == (1, 7, 64, 96)
