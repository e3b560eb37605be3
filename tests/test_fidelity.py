"""Fidelity to the original ATRC implementation.

Expected values come from ``../shared/original/`` (facts taken from the original code: its
state-dict keys and shapes for nine configurations, its published normal centroids) or from small
cases computed by hand — never from the code under test.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ORIGINAL_CONFIGS as CONFIGS
from conftest import REPO, compose_cfg, paper_loss, tiny_overrides
from torch import nn

import atrc_exp
from atrc_exp.engine.search import linear_schedule
from atrc_exp.losses import MultiTaskLoss
from atrc_exp.models import build_model

SHARED = REPO.parent / "shared" / "original"
if not (SHARED / "state_dict_keys.json").is_file():  # pragma: no cover - a checkout without shared/
    pytest.skip(f"the original's facts are not at {SHARED}", allow_module_level=True)
ORIGINAL = json.loads((SHARED / "state_dict_keys.json").read_text())["configurations"]


def _model(name: str) -> nn.Module:
    return build_model(compose_cfg(CONFIGS[name] + ["backbone.pretrained=false"]))


def _state_from_file(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the original's keys and shapes, random values of a trained
    network's scale (finite outputs)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in ORIGINAL[name]["keys"].items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".weight") and len(shape) == 1:  # batch-norm scale
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g)
    return sd


# ---------------------------------------------------------------------- names are the original's


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_is_the_originals_and_its_weights_load(name):
    model = _model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = ORIGINAL[name]["keys"]
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    assert ours == ref  # shapes
    assert sum(p.numel() for p in model.parameters()) == ORIGINAL[name]["n_params"]
    # a dict made from the file (a Lightning state dict: + criterion.*, metrics_dict.*) loads as is
    sd = _state_from_file(name)
    extra_entries = {
        "criterion.normal_centroids": torch.zeros(40, 3),
        "metrics_dict.semseg.confusion": torch.zeros(40, 40),
    }
    report = atrc_exp.load_original_state_dict(model, {"state_dict": {**sd, **extra_entries}})
    assert sorted(report["dropped"]) == sorted(extra_entries)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())


def test_search_frozen_pairs_are_the_originals_fixed_weights_both_ways():
    name = "nyud18_search_argmax"
    prefix = "head.atrc_module.cp_blocks."
    sd = _state_from_file(name)
    # the original checkpoint of a search with one pair frozen to s-label: a one-hot float buffer
    sd[prefix + "semseg.depth.fixed_weights"] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    model = _model(name).train()
    atrc_exp.load_original_state_dict(model, {"state_dict": sd})
    blocks = model.head.atrc_module.cp_blocks
    assert blocks["semseg"]["depth"].is_frozen and model.head.genotype["semseg"]["depth"] == 4
    assert [k for k in model.state_dict() if k.endswith("fixed_weights")] == [
        prefix + "semseg.depth.fixed_weights"
    ]
    # a pair that freezes here is saved as the original saves it
    blocks["depth"]["edge"].freeze(2)
    torch.testing.assert_close(
        model.state_dict()[prefix + "depth.edge.fixed_weights"], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    )
    assert blocks["depth"]["edge"].op_weights().tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    # the checkpoint decides: loading one without that pair frozen unfreezes it
    atrc_exp.load_original_state_dict(model, sd)
    assert not blocks["depth"]["edge"].is_frozen and blocks["semseg"]["depth"].is_frozen


# ------------------------------------------------------- original checkpoints in our entry points


def _tiny_mt_overrides(data_dir: Path, **extra) -> list[str]:
    """The tiny synthetic run with the NYUD baseline's shapes (40 semseg classes), so that the
    original's ``nyud18_mt`` weights fit."""
    return tiny_overrides(
        data_dir,
        **{
            "context": "none",
            "dataset.task_specs.semseg.classes": 40,
            "trainer.cpu": "true",
            **extra,
        },
    )


def _lightning_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A checkpoint as PyTorch Lightning 1.1.8 writes it for the original's LightningModule."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 1200,
            "pytorch-lightning_version": "1.1.8",
            "state_dict": {
                **sd,
                "criterion.weight": torch.ones(3),
                "metrics_dict.semseg.conf": torch.zeros(2),
            },
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01}]}],
            "lr_schedulers": [{"last_epoch": 3}],
            "hyper_parameters": {"args": argparse.Namespace(lr=0.01, tasks=["semseg"])},
        },
        path,
    )
    return path


def test_original_lightning_checkpoint_through_init_from_original_and_atrc_eval(tiny_data_dir, tmp_path):
    from omegaconf import OmegaConf

    from atrc_exp.cli.eval import main as eval_main
    from atrc_exp.engine import fit

    sd = _state_from_file("nyud18_mt")
    ckpt = _lightning_checkpoint(tmp_path / "original.ckpt", sd)
    run = tmp_path / "run"
    cfg = compose_cfg(
        _tiny_mt_overrides(
            tiny_data_dir,
            **{"trainer.init_from_original": ckpt, "trainer.max_steps": 1, "trainer.lr": 1e-12},
        )
    )
    fit(cfg, run)
    # one step at a vanishing learning rate: the saved weights are the imported ones
    from atrc_exp.cli.eval import load_weights

    model = build_model(cfg)
    load_weights(model, sorted((run / "checkpoints").glob("step_*"))[-1], None)
    own = model.state_dict()
    for k in ("backbone.conv1.weight", "head.bottleneck.semseg.conv.weight", "head.final_logits.depth.bias"):
        torch.testing.assert_close(own[k], sd[k], rtol=0, atol=1e-6)
    # atrc-eval of the original checkpoint with that run's config
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    out = tmp_path / "eval"
    assert (
        eval_main([str(ckpt), "--config", str(run), "--out", str(out), "--edge-workers", "0", "--cpu"]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert math.isfinite(metrics["semseg/mIoU"]) and math.isfinite(metrics["depth/rmse"])


# --------------------------------------------------------------------------- losses, by hand

LN2, LN3 = math.log(2.0), math.log(3.0)


def _map(values, dtype=torch.float64) -> torch.Tensor:
    """A 1×C×1×N map from per-pixel channel lists ``[[c0, c1, ...], ...]``."""
    return torch.tensor(values, dtype=dtype).T.reshape(1, len(values[0]), 1, len(values))


def _labels(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).reshape(1, 1, len(values))


def _loss(edge_pos_weight: float = 0.8, centroids=None) -> MultiTaskLoss:
    return paper_loss(
        ["semseg", "depth", "normals", "edge", "sal", "human_parts"], edge_pos_weight, centroids
    )


def test_semseg_and_parts_cross_entropy_by_hand():
    logits = _map([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [5.0, 1.0, 2.0]])
    target = _labels([2, 0, 255])  # ln 3, ln 2 (softmax 2/4), ignored
    for task in ("semseg", "human_parts"):
        loss = _loss().final_loss(task, logits, target)
        assert loss.dtype == torch.float64
        assert float(loss) == pytest.approx((LN3 + LN2) / 2, abs=1e-12)


def test_saliency_cross_entropy_divides_by_valid_pixels_not_weights():
    # zero logits: every pixel's CE is ln 2. Targets 0, 1, 1 and one ignored pixel:
    # w_pos = #negatives/#valid = 1/3, class weights (1 - w_pos, w_pos) = (2/3, 1/3)
    logits = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    target = _labels([0, 1, 1, 255])
    expected = (2 / 3 + 1 / 3 + 1 / 3) * LN2 / 3  # Σ w·l / #valid = 4/9 ln 2
    weighted_mean = LN2  # Σ w·l / Σ w: what PyTorch's weighted mean would give
    crit = _loss()
    for loss in (crit.final_loss("sal", logits, target), crit.aux_loss("sal", logits, target)):
        assert loss.dtype == torch.float64
        assert float(loss) == pytest.approx(expected, abs=1e-12)
        assert float(loss) != pytest.approx(weighted_mean)


@pytest.mark.parametrize("w", [0.8, 0.95])
def test_edge_aux_cross_entropy_divides_by_valid_pixels(w):
    # zero logits (CE ln 2 per pixel), edge targets 1, 0, 0 and an ignored pixel; weights (1-w, w)
    logits = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    target = _labels([1, 0, 0, 255])
    loss = _loss(w).aux_loss("edge", logits, target)
    assert float(loss) == pytest.approx((w + 2 * (1 - w)) * LN2 / 3, abs=1e-12)


def test_edge_final_bce_by_hand():
    # logit 0: σ = 1/2; pixel loss −(w·y·log σ + (1−w)(1−y)·log(1−σ)) = w ln 2 (y = 1), (1−w) ln 2 (y = 0)
    logits = torch.zeros(1, 1, 1, 3, dtype=torch.float64)
    target = torch.tensor([1.0, 0.0, 255.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    loss = _loss(0.8).final_loss("edge", logits, target)
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx((0.8 + 0.2) * LN2 / 2, abs=1e-12)


def test_normals_and_depth_l1_by_hand():
    # prediction (3, 0, 4) normalises to (0.6, 0, 0.8); target (1, 0, 0): |−0.4| + 0 + 0.8 = 1.2
    pred = _map([[3.0, 0.0, 4.0], [1.0, 1.0, 1.0]])
    target = _map([[1.0, 0.0, 0.0], [255.0, 255.0, 255.0]])
    loss = _loss().final_loss("normals", pred, target)
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(1.2, abs=1e-12)
    depth = _loss().final_loss("depth", _map([[1.0], [2.0], [5.0]]), _map([[1.5], [255.0], [4.0]]))
    assert depth.dtype == torch.float64 and float(depth) == pytest.approx((0.5 + 1.0) / 2, abs=1e-12)


def test_aux_depth_bins_and_normals_centroid_classes_by_hand():
    # depth d → bin floor(40·log(d/0.7)/log(10/0.7)), clamped: 0.5 → 0, 0.7·(10/0.7)^(20.5/40) → 20, 50 → 39
    d = [0.5, 0.7 * (10 / 0.7) ** (20.5 / 40), 50.0]
    logits = torch.zeros(1, 40, 1, 3, dtype=torch.float64)
    logits[0, [0, 20, 39], 0, [0, 1, 2]] = 10.0  # right bins score high: CE = ln(1 + 39 e^-10)
    loss = _loss().aux_loss("depth", logits, _map([[v] for v in d]))
    assert float(loss) == pytest.approx(math.log(1 + 39 * math.exp(-10)), abs=1e-12)
    # normals: the class is the row of the nearest published centroid
    cent = torch.tensor(json.loads((SHARED / "nyud_normal_centroids.json").read_text())["centroids"])
    normals = _map([cent[7].tolist(), cent[33].tolist()])
    logits = torch.zeros(1, 40, 1, 2, dtype=torch.float64)
    logits[0, [7, 33], 0, [0, 1]] = 10.0
    loss = _loss(centroids=cent).aux_loss("normals", logits, normals)
    assert float(loss) == pytest.approx(math.log(1 + 39 * math.exp(-10)), abs=1e-12)


@pytest.mark.parametrize(("dataset", "name"), [("nyud", "nyud"), ("pascal_context", "pascal_context")])
def test_published_normal_centroids_are_the_originals(dataset, name, tmp_path):
    from atrc_exp.data import normal_centroids

    cfg = compose_cfg([f"dataset={dataset}", f"paths.data_dir={tmp_path}"])  # no data needed
    expected = torch.tensor(json.loads((SHARED / f"{name}_normal_centroids.json").read_text())["centroids"])
    got = normal_centroids(cfg)
    assert got.shape == (40, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=0)


# ------------------------------------------------------------------ backbone, search, schedules


def test_hrnet_fusion_is_scale_factor_upsampling_then_resize_at_the_nyud_crop():
    from atrc_exp.models.backbones import hrnet18

    torch.manual_seed(0)
    net = hrnet18().double().eval()
    module = net.stage2[0]  # two branches: full (1/4) and half (1/8) resolution of the input
    # the branch sizes of a 425×560 crop: 107×140 and 54×70 (not exactly 2× apart)
    x = [torch.randn(1, 18, 107, 140, dtype=torch.float64), torch.randn(1, 36, 54, 70, dtype=torch.float64)]
    with torch.no_grad():
        out = module(x)
        b = [branch(xi) for branch, xi in zip(module.branches, x)]
        z = module.fuse_layers[0][1](b[1])  # 1×1 conv, BN of the lower branch
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)(z)  # 108×140
        expected = F.relu(b[0] + F.interpolate(up, size=(107, 140), mode="bilinear", align_corners=False))
        direct = F.relu(b[0] + F.interpolate(z, size=(107, 140), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)
    assert (out[0] - direct).abs().max() > 1e-3  # the single resize would differ


def test_search_bottleneck_has_no_dropout_distillation_has_the_originals():
    search = _model("nyud18_search_argmax").head.atrc_module
    assert not any(isinstance(m, nn.Dropout2d) for m in search.modules())
    atrc = _model("nyud18_atrc").head.atrc_module
    for t in ("semseg", "depth", "normals", "edge"):
        seq = atrc.bottleneck[t]
        assert isinstance(seq, nn.Sequential) and isinstance(seq[1], nn.Dropout2d) and seq[1].p == 0.05


def test_tau_and_entropy_weight_follow_the_originals_formula():
    # end + (1 − k/max_steps)·(start − end) at 0-based step k
    assert linear_schedule(1.0, 0.05, 0, 100) == pytest.approx(1.0)
    assert linear_schedule(1.0, 0.05, 50, 100) == pytest.approx(0.05 + 0.5 * 0.95)
    assert linear_schedule(1.0, 0.05, 99, 100) == pytest.approx(0.05 + 0.01 * 0.95)  # not 0.05 yet
    assert linear_schedule(-0.02, 0.06, 99, 100) == pytest.approx(0.06 - 0.01 * 0.08)
    assert linear_schedule(-0.02, 0.06, 25, 100) == pytest.approx(0.0)
