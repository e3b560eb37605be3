"""Losses against hand-computed values (explicit numpy/math formulas, not the code under test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import paper_loss

from atrc_exp.losses import (
    balanced_cross_entropy_loss,
    cross_entropy_loss,
    depth_l1_loss,
    depth_to_bins,
    edge_bce_loss,
    normals_l1_loss,
    normals_to_centroid_index,
    weighted_edge_cross_entropy_loss,
)

#: the paper's task weights (SPEC: semseg 1, human_parts 2, sal 5, normals 10, depth 1, edge 50)
LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "depth": 1.0, "edge": 50.0}

IGN = 255


def _np_ce(logits: np.ndarray, target: int) -> float:
    """-log softmax(logits)[target] for one pixel (float64)."""
    m = logits.max()
    return float(m + np.log(np.exp(logits - m).sum()) - logits[target])


def _img(values, channels_first=True) -> torch.Tensor:
    """List of per-pixel channel vectors (one row of W pixels) → 1×C×1×W float tensor."""
    a = torch.tensor(values, dtype=torch.float32)  # W×C
    return a.t().reshape(1, a.shape[1], 1, a.shape[0])


def test_semseg_ce_with_ignore_pixels():
    px = [[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, -2.0, 0.5], [-1.0, 0.0, 4.0]]
    target = [0, IGN, 2, 1]
    logits = _img(px)
    tgt = torch.tensor(target).reshape(1, 1, 4)
    valid = [i for i, t in enumerate(target) if t != IGN]
    expected = np.mean([_np_ce(np.array(px[i], dtype=np.float64), target[i]) for i in valid])
    assert cross_entropy_loss(logits, tgt).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_sal_ce():
    px = [[0.3, 1.2], [2.0, -1.0], [0.0, 0.5], [1.0, 1.0], [-3.0, 3.0]]
    target = [1, 0, 0, IGN, 0]
    logits = _img(px)
    tgt = torch.tensor(target).reshape(1, 1, 5)
    valid = [i for i, t in enumerate(target) if t != IGN]
    n_neg = sum(target[i] == 0 for i in valid)  # 3 of 4 valid
    w_pos = n_neg / len(valid)  # 0.75
    w = {0: 1 - w_pos, 1: w_pos}
    num = sum(w[target[i]] * _np_ce(np.array(px[i], dtype=np.float64), target[i]) for i in valid)
    assert w_pos == 0.75
    # the original's reduction: divided by the number of valid pixels, not the sum of the weights
    assert balanced_cross_entropy_loss(logits, tgt).item() == pytest.approx(num / len(valid), rel=1e-6)


def test_normals_l1_normalises_prediction():
    # pixel 0: (3,0,4) → (0.6,0,0.8) vs (0,0,1): |0.6| + 0 + |0.2| = 0.8
    # pixel 1: ignored; pixel 2: (0,2,0) → (0,1,0) vs (0,1,0): 0
    pred = _img([[3.0, 0.0, 4.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    target = _img([[0.0, 0.0, 1.0], [IGN, IGN, IGN], [0.0, 1.0, 0.0]])
    assert normals_l1_loss(pred, target).item() == pytest.approx((0.8 + 0.0) / 2, rel=1e-6)


def test_depth_l1_with_ignore():
    pred = torch.tensor([1.0, 2.0, 3.0, 0.5]).reshape(1, 1, 1, 4)
    target = torch.tensor([1.5, IGN, 1.0, 0.5]).reshape(1, 1, 1, 4)
    assert depth_l1_loss(pred, target).item() == pytest.approx((0.5 + 2.0 + 0.0) / 3, rel=1e-6)


def test_edge_weighted_bce_nyud():
    w = 0.8
    x = [0.0, 2.0, -1.0, 0.7]
    y = [1.0, 0.0, IGN, 1.0]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    per_px = [
        -(w * yi * math.log(sig(xi)) + (1 - w) * (1 - yi) * math.log(1 - sig(xi)))
        for xi, yi in zip(x, y)
        if yi != IGN
    ]
    logits = torch.tensor(x).reshape(1, 1, 1, 4)
    target = torch.tensor(y).reshape(1, 1, 1, 4)
    assert edge_bce_loss(logits, target, w).item() == pytest.approx(np.mean(per_px), rel=1e-6)


def test_aux_edge_weighted_ce():
    w = 0.95
    px = [[0.2, 1.0], [1.5, -0.5], [0.0, 0.0]]
    y = [1.0, 0.0, IGN]
    cw = {0: 1 - w, 1: w}
    num = sum(cw[int(t)] * _np_ce(np.array(p, dtype=np.float64), int(t)) for p, t in zip(px, y) if t != IGN)
    loss = weighted_edge_cross_entropy_loss(_img(px), torch.tensor(y).reshape(1, 1, 1, 3), w)
    assert loss.item() == pytest.approx(num / 2, rel=1e-6)  # / #valid pixels


def test_depth_to_bins_values():
    d = torch.tensor([0.7, 10.0, 0.5, 2.0, 5.0, 25.0, IGN, 0.0])
    expected_2 = math.floor(40 * math.log(2.0 / 0.7) / math.log(10.0 / 0.7))
    expected_5 = math.floor(40 * math.log(5.0 / 0.7) / math.log(10.0 / 0.7))
    assert expected_2 == 15 and expected_5 == 29
    bins = depth_to_bins(d)
    assert bins.dtype == torch.int64
    assert bins.tolist() == [0, 39, 0, expected_2, expected_5, 39, IGN, 0]


def test_normals_to_centroid_index():
    # Centroids deliberately not unit length: nearest is by direction (cosine similarity).
    centroids = torch.tensor(
        [
            [2.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0],
            [0.0, 0.5, 0.0],
            [0.0, -1.0, 0.0],
            [0.0, 0.0, 3.0],
            [0.0, 0.0, -1.0],
        ]
    )
    normals = _img(
        [
            [0.9, 0.1, 0.0],  # +x → 0
            [0.0, -0.8, 0.6],  # -y → 3
            [0.1, 0.3, 0.95],  # +z → 4
            [IGN, IGN, IGN],  # invalid → 255
            [-0.6, 0.0, -0.8],  # -z → 5
        ]
    )
    idx = normals_to_centroid_index(normals, centroids)
    assert idx.shape == (1, 1, 5)
    assert idx.flatten().tolist() == [0, 3, 4, IGN, 5]


def test_normals_to_centroid_index_equals_nearest_by_cosine():
    g = torch.Generator().manual_seed(0)
    normals = torch.randn(2, 3, 19, 23, generator=g)
    normals[0, :, :4] = IGN
    centroids = torch.randn(40, 3, generator=g)
    idx = normals_to_centroid_index(normals, centroids)
    n = normals / normals.norm(dim=1, keepdim=True)
    c = centroids / centroids.norm(dim=1, keepdim=True)
    ref = torch.einsum("bchw,kc->bkhw", n.double(), c.double()).argmax(dim=1)
    ref[0, :4] = IGN
    assert torch.equal(idx, ref)


def test_aux_depth_and_normals_losses_use_the_class_targets():
    centroids = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = paper_loss(["depth", "normals"], edge_pos_weight=0.8, normal_centroids=centroids)
    torch.manual_seed(0)
    aux_d = torch.randn(1, 40, 1, 3)
    aux_n = torch.randn(1, 3, 1, 3)
    depth = torch.tensor([2.0, IGN, 0.7]).reshape(1, 1, 1, 3)
    normals = _img([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [IGN, IGN, IGN]])
    batch = {"depth": depth, "normals": normals}
    outputs = {
        "final": {"depth": torch.zeros(1, 1, 1, 3), "normals": torch.ones(1, 3, 1, 3)},
        "aux": {"depth": aux_d, "normals": aux_n},
    }
    _, terms = loss(outputs, batch)
    ad = aux_d.double().numpy()[0, :, 0]
    an = aux_n.double().numpy()[0, :, 0]
    exp_d = (_np_ce(ad[:, 0], 15) + _np_ce(ad[:, 2], 0)) / 2
    exp_n = (_np_ce(an[:, 0], 2) + _np_ce(an[:, 1], 1)) / 2
    assert terms["loss/aux_depth"].item() == pytest.approx(exp_d, rel=1e-6)
    assert terms["loss/aux_normals"].item() == pytest.approx(exp_n, rel=1e-6)


def test_weighted_total_and_term_keys():
    w = 0.8
    loss = paper_loss(["normals", "edge"], edge_pos_weight=w)
    pred_n = _img([[3.0, 0.0, 4.0]])
    tgt_n = _img([[0.0, 0.0, 1.0]])  # L1 = 0.8
    edge_logit = torch.tensor([0.0]).reshape(1, 1, 1, 1)
    edge_tgt = torch.tensor([1.0]).reshape(1, 1, 1, 1)  # BCE = 0.8·log 2
    aux_edge = _img([[0.0, 0.0]])  # 2-class CE of an edge pixel: w·log 2 / 1 valid pixel
    outputs = {"final": {"normals": pred_n, "edge": edge_logit}, "aux": {"edge": aux_edge}}
    total, terms = loss(outputs, {"normals": tgt_n, "edge": edge_tgt})
    assert set(terms) == {"loss/normals", "loss/edge", "loss/aux_edge"}
    assert terms["loss/normals"].item() == pytest.approx(0.8, rel=1e-6)
    assert terms["loss/edge"].item() == pytest.approx(0.8 * math.log(2), rel=1e-6)
    assert terms["loss/aux_edge"].item() == pytest.approx(w * math.log(2), rel=1e-6)
    expected = LOSS_WEIGHTS["normals"] * 0.8 + LOSS_WEIGHTS["edge"] * (0.8 * math.log(2) + w * math.log(2))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert not any(t.requires_grad for t in terms.values())


def _all_task_outputs(b=2, h=3, w=4, requires_grad=True):
    chans = {"semseg": 5, "human_parts": 7, "sal": 2, "normals": 3, "depth": 1, "edge": 1}
    aux_chans = {"semseg": 5, "human_parts": 7, "sal": 2, "normals": 40, "depth": 40, "edge": 2}
    g = torch.Generator().manual_seed(0)
    final = {t: torch.randn(b, c, h, w, generator=g).requires_grad_(requires_grad) for t, c in chans.items()}
    aux = {
        t: torch.randn(b, c, h, w, generator=g).requires_grad_(requires_grad) for t, c in aux_chans.items()
    }
    return {"final": final, "aux": aux}


def test_no_valid_pixel_gives_zero_and_finite_grad():
    b, h, w = 2, 3, 4
    outputs = _all_task_outputs(b, h, w)
    batch = {
        "semseg": torch.full((b, h, w), IGN, dtype=torch.long),
        "human_parts": torch.full((b, h, w), IGN, dtype=torch.long),
        "sal": torch.full((b, h, w), IGN, dtype=torch.long),
        "normals": torch.full((b, 3, h, w), float(IGN)),
        "depth": torch.full((b, 1, h, w), float(IGN)),
        "edge": torch.full((b, 1, h, w), float(IGN)),
    }
    centroids = torch.nn.functional.normalize(torch.randn(40, 3), dim=1)
    loss = paper_loss(list(batch), edge_pos_weight=0.95, normal_centroids=centroids)
    total, terms = loss(outputs, batch)
    assert total.item() == 0.0
    assert len(terms) == 12 and all(v.item() == 0.0 for v in terms.values())
    total.backward()
    for group in outputs.values():
        for t in group.values():
            assert t.grad is not None and torch.isfinite(t.grad).all()


def test_sal_all_one_class_is_finite():
    # All valid pixels negative → w_pos = 1, class-0 weight 0: PyTorch's weighted mean is 0/0.
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    loss = balanced_cross_entropy_loss(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_aux_normals_without_centroids_raises():
    loss = paper_loss(["normals"], edge_pos_weight=0.8)
    outputs = {"final": {"normals": torch.randn(1, 3, 2, 2)}, "aux": {"normals": torch.randn(1, 40, 2, 2)}}
    batch = {"normals": torch.nn.functional.normalize(torch.randn(1, 3, 2, 2), dim=1)}
    with pytest.raises(ValueError, match="centroids"):
        loss(outputs, batch)


def test_loss_under_autocast_matches_float32():
    outputs = _all_task_outputs(requires_grad=False)
    g = torch.Generator().manual_seed(1)
    b, h, w = 2, 3, 4
    batch = {
        "semseg": torch.randint(0, 5, (b, h, w), generator=g),
        "human_parts": torch.randint(0, 7, (b, h, w), generator=g),
        "sal": torch.randint(0, 2, (b, h, w), generator=g),
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        "depth": torch.rand(b, 1, h, w, generator=g) * 8 + 0.5,
        "edge": (torch.rand(b, 1, h, w, generator=g) > 0.8).float(),
    }
    centroids = torch.nn.functional.normalize(torch.randn(40, 3, generator=g), dim=1)
    loss = paper_loss(list(batch), edge_pos_weight=0.8, normal_centroids=centroids)
    ref, _ = loss(outputs, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = loss(outputs, batch)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_l2_normalize_channels_equals_f_normalize_and_is_finite_at_zero():
    from atrc_exp.losses import l2_normalize_channels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g)
    x[0, :, 1, 1] = 0  # a zero vector: F.normalize gives 0 there, and so must we
    ref = torch.nn.functional.normalize(x.double(), dim=1)
    torch.testing.assert_close(l2_normalize_channels(x).double(), ref, rtol=1e-6, atol=1e-7)
    xr = x.clone().requires_grad_()
    l2_normalize_channels(xr).sum().backward()
    xf = x.clone().requires_grad_()
    torch.nn.functional.normalize(xf, dim=1).sum().backward()
    assert torch.isfinite(xr.grad).all()
    torch.testing.assert_close(xr.grad, xf.grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_is_the_sum_over_valid_pixels_by_their_number():
    """F.cross_entropy's sum divided by the number of valid pixels, and its gradient (float32, with
    ignored pixels and class weights, all pixels ignored, channels-last logits)."""
    from atrc_exp.losses import cross_entropy_loss

    g = torch.Generator().manual_seed(3)
    for w in (None, torch.rand(40, generator=g) + 0.5):
        for all_ignored in (False, True):
            x = torch.randn(2, 40, 12, 16, generator=g).contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, 40, (2, 12, 16), generator=g)
            t[0, :3] = 255
            if all_ignored:
                t[:] = 255
            a = x.clone().requires_grad_()
            b = x.contiguous().requires_grad_()
            la = cross_entropy_loss(a, t, w)
            ref = torch.nn.functional.cross_entropy(b, t, weight=w, ignore_index=255, reduction="sum")
            den = (t != 255).sum()  # the number of valid pixels, with or without class weights
            lb = ref / den if den > 0 else ref * 0
            (la * 3).backward()
            (lb * 3).backward()
            torch.testing.assert_close(la.detach(), lb.detach(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)
