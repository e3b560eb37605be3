"""Metrics against torchmetrics / explicit numpy formulas / hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import paper_metrics
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassJaccardIndex

HUMAN_PARTS_CLASSES = 7  # 6 parts + background

IGN = 255


def _seg_batch(g: torch.Generator, k: int, b=2, h=6, w=7):
    logits = torch.randn(b, k, h, w, generator=g)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target.view(-1)[:k] = torch.arange(k)  # every class appears in the target
    ignore = torch.rand(b, h, w, generator=g) < 0.2
    target[ignore] = IGN
    target.view(-1)[:k] = torch.arange(k)
    return logits, target


def test_miou_matches_torchmetrics_when_every_class_appears():
    # torchmetrics' macro average drops classes absent from both target and prediction
    # (union 0); ATRC averages over all classes with IoU 0 for those. With every class
    # present in the target the two agree.
    k = 5
    g = torch.Generator().manual_seed(0)
    ours = paper_metrics(["semseg"], num_semseg_classes=k, edge_pos_weight=0.8)
    ref = MulticlassJaccardIndex(num_classes=k, ignore_index=IGN, average="macro")
    for _ in range(3):
        logits, target = _seg_batch(g, k)
        ours.update({"semseg": logits}, {"semseg": target})
        ref.update(logits.argmax(1), target)
    assert ours.compute()["semseg/mIoU"] == pytest.approx(100 * ref.compute().item(), rel=1e-5)


def test_human_parts_miou_matches_torchmetrics():
    k = HUMAN_PARTS_CLASSES
    g = torch.Generator().manual_seed(1)
    ours = paper_metrics(["human_parts"], num_semseg_classes=3, edge_pos_weight=0.8)
    ref = MulticlassJaccardIndex(num_classes=k, ignore_index=IGN, average="macro")
    for _ in range(2):
        logits, target = _seg_batch(g, k, h=8, w=8)
        ours.update({"human_parts": logits}, {"human_parts": target})
        ref.update(logits.argmax(1), target)
    assert ours.compute()["human_parts/mIoU"] == pytest.approx(100 * ref.compute().item(), rel=1e-5)


def test_miou_absent_class_counts_as_zero():
    # 3 classes; class 2 appears in neither target nor prediction.
    # target [0,0,1,1,255], pred [0,1,1,1,2] (the ignored pixel's prediction does not count)
    # IoU0 = 1/2, IoU1 = 2/3, IoU2 = 0 → mIoU = (1/2 + 2/3 + 0)/3
    pred_labels = torch.tensor([0, 1, 1, 1, 2])
    logits = torch.nn.functional.one_hot(pred_labels, 3).float().t().reshape(1, 3, 1, 5)
    target = torch.tensor([0, 0, 1, 1, IGN]).reshape(1, 1, 5)
    m = paper_metrics(["semseg"], num_semseg_classes=3, edge_pos_weight=0.8)
    m.update({"semseg": logits}, {"semseg": target})
    assert m.compute()["semseg/mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3, rel=1e-9)


def test_depth_rmse_matches_torchmetrics_over_batches():
    g = torch.Generator().manual_seed(2)
    ours = paper_metrics(["depth"], num_semseg_classes=2, edge_pos_weight=0.8)
    ref = MeanSquaredError(squared=False)
    for i in range(3):
        pred = torch.randn(2, 1, 5, 6, generator=g) * 3 + 2  # some negative → clamped to 0
        target = torch.rand(2, 1, 5, 6, generator=g) * 9 + 0.5
        target[torch.rand(2, 1, 5, 6, generator=g) < 0.25] = IGN
        target[0, 0, 0, : i + 1] = 0.0  # non-positive depth is invalid too
        ours.update({"depth": pred}, {"depth": target})
        valid = (target != IGN) & (target > 0)
        ref.update(pred.clamp_min(0)[valid], target[valid])
    assert ours.compute()["depth/rmse"] == pytest.approx(ref.compute().item(), rel=1e-5)


def test_normals_angles_match_numpy_arccos():
    g = torch.Generator().manual_seed(3)
    ours = paper_metrics(["normals"], num_semseg_classes=2, edge_pos_weight=0.8)
    all_ang = []
    for _ in range(2):
        pred = torch.randn(2, 3, 4, 5, generator=g)
        target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5, generator=g), dim=1)
        target[:, :, 0, :2] = IGN
        ours.update({"normals": pred}, {"normals": target})
        p = pred.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
        t = target.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
        keep = ~(t == IGN).any(axis=1)
        p, t = p[keep], t[keep]
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        all_ang.append(np.degrees(np.arccos(np.clip((p * t).sum(1), -1.0, 1.0))))
    ang = np.concatenate(all_ang)
    res = ours.compute()
    assert res["normals/mean_angle"] == pytest.approx(ang.mean(), rel=1e-6)
    assert res["normals/rmse_angle"] == pytest.approx(np.sqrt((ang**2).mean()), rel=1e-6)
    for thr, key in [(11.25, "within_11.25"), (22.5, "within_22.5"), (30.0, "within_30")]:
        assert res[f"normals/{key}"] == pytest.approx(100 * (ang < thr).mean(), rel=1e-9)


def test_sal_maxf_hand_made():
    # p(salient) per pixel and labels; the last pixel (p=0.99) is ignored.
    probs = [0.88, 0.62, 0.33, 0.12, 0.99]
    target = [1, 1, 0, 1, IGN]
    # AP = 3. Thresholds t (pixel predicted positive iff p >= t):
    #   t <= 0.10 : PP=4 TP=3 P=3/4 R=1   F = 1.3·0.75/(0.225+1)      = 0.7959
    #   0.15..0.30: PP=3 TP=2 P=2/3 R=2/3 F = 2/3
    #   0.35..0.60: PP=2 TP=2 P=1   R=2/3 F = 1.3·(2/3)/(0.3+2/3)   = 26/29 = 0.8966 (max)
    #   0.65..0.85: PP=1 TP=1 P=1   R=1/3 F = 1.3·(1/3)/(0.3+1/3)   = 0.6842
    #   >= 0.90   : 0
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))]).float().reshape(1, 2, 1, 5)
    m = paper_metrics(["sal"], num_semseg_classes=2, edge_pos_weight=0.8)
    m.update({"sal": logits}, {"sal": torch.tensor(target).reshape(1, 1, 5)})
    assert m.compute()["sal/maxF"] == pytest.approx(100 * 26 / 29, rel=1e-6)


def test_edge_loss_is_pixel_weighted_over_split():
    w = 0.95
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    batches = [([0.5, -1.0, 2.0], [1.0, 0.0, IGN]), ([1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 1.0, 1.0])]
    m = paper_metrics(["edge"], num_semseg_classes=2, edge_pos_weight=w)
    per_px = []
    for x, y in batches:
        m.update(
            {"edge": torch.tensor(x).reshape(1, 1, 1, -1)}, {"edge": torch.tensor(y).reshape(1, 1, 1, -1)}
        )
        per_px += [
            -(w * yi * math.log(sig(xi)) + (1 - w) * (1 - yi) * math.log(1 - sig(xi)))
            for xi, yi in zip(x, y)
            if yi != IGN
        ]
    assert len(per_px) == 6
    assert m.compute()["edge/loss"] == pytest.approx(sum(per_px) / 6, rel=1e-6)


def _random_batch(g: torch.Generator, k: int, b=2, h=5, w=6):
    final = {
        "semseg": torch.randn(b, k, h, w, generator=g),
        "human_parts": torch.randn(b, HUMAN_PARTS_CLASSES, h, w, generator=g),
        "sal": torch.randn(b, 2, h, w, generator=g),
        "normals": torch.randn(b, 3, h, w, generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g) * 5,
        "edge": torch.randn(b, 1, h, w, generator=g),
    }
    ign = torch.rand(b, 1, h, w, generator=g) < 0.2
    batch = {
        "semseg": torch.randint(0, k, (b, h, w), generator=g).masked_fill(ign[:, 0], IGN),
        "human_parts": torch.randint(0, HUMAN_PARTS_CLASSES, (b, h, w), generator=g),
        "sal": torch.randint(0, 2, (b, h, w), generator=g).masked_fill(ign[:, 0], IGN),
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1).masked_fill(
            ign, IGN
        ),
        "depth": (torch.rand(b, 1, h, w, generator=g) * 8 + 0.5).masked_fill(ign, IGN),
        "edge": (torch.rand(b, 1, h, w, generator=g) > 0.7).float().masked_fill(ign, IGN),
    }
    return final, batch


def test_state_round_trip_sum_of_halves_equals_whole():
    k = 4
    tasks = ["semseg", "depth", "normals", "edge", "sal", "human_parts"]
    g = torch.Generator().manual_seed(4)
    batches = [_random_batch(g, k) for _ in range(4)]
    whole = paper_metrics(tasks, k, 0.8)
    half_a = paper_metrics(tasks, k, 0.8)
    half_b = paper_metrics(tasks, k, 0.8)
    for i, (out, batch) in enumerate(batches):
        whole.update(out, batch)
        (half_a if i % 2 == 0 else half_b).update(out, batch)

    sa, sb = half_a.state(), half_b.state()
    assert sa.dtype == torch.float64 and sa.dim() == 1 and sa.numel() == whole.state_size
    assert not torch.equal(sa, sb)
    reduced = paper_metrics(tasks, k, 0.8)
    reduced.load_state(sa + sb)  # what all_reduce(SUM) produces
    torch.testing.assert_close(reduced.state(), whole.state(), rtol=1e-12, atol=1e-9)
    got, ref = reduced.compute(), whole.compute()
    assert set(got) == {
        "semseg/mIoU",
        "human_parts/mIoU",
        "depth/rmse",
        "depth/abs_rel",
        "normals/mean_angle",
        "normals/median_angle",
        "normals/rmse_angle",
        "normals/within_11.25",
        "normals/within_22.5",
        "normals/within_30",
        "edge/loss",
        "edge/odsF",
        "edge/oisF",
        "sal/maxF",
        "sal/mIoU",
    }
    assert reduced.labelled_images() == whole.labelled_images()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
    # The halves alone give different values (the reduction matters).
    assert half_a.compute()["depth/rmse"] != pytest.approx(ref["depth/rmse"], rel=1e-9)

    whole.reset()
    assert whole.state().abs().sum().item() == 0.0
    with pytest.raises(ValueError):
        whole.load_state(torch.zeros(whole.state_size + 1, dtype=torch.float64))
