"""Edge odsF / oisF (BSDS / SEISM protocol with pyEdgeEval's kernels) on hand-made edge maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import paper_metrics

pytest.importorskip("pyEdgeEval", reason="edge odsF needs pyEdgeEval")

from atrc_exp.evaluation.edge import (  # noqa: E402
    edge_thresholds,
    evaluate_edge_image,
    save_seism_pngs,
    summarize,
    to_uint8_prob,
)

# 100×100: diagonal 141.4 px, so maxDist 0.011 → 1.56 px and 0.0075 → 1.06 px of tolerance
H = W = 100


def _lines(shift: int = 0) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[15:85, 30 + shift] = 1  # a vertical line
    m[60 + shift, 45:85] = 1  # a horizontal one, away from it and from the border
    return m


def _circle(shift: int = 0) -> np.ndarray:
    import cv2

    m = np.zeros((H, W), np.uint8)
    cv2.circle(m, (50 + shift, 50), 30, 1, 1)  # a closed 1-px contour: NMS keeps all of it
    return m


def _ods(pred, gt, max_dist=0.011, **kw):
    c = evaluate_edge_image(pred, gt, max_dist, **kw)
    return summarize(c.stack(), c.best())


# NMS (Dollar's edgesNms, as in the SE/HED/BSDS pipelines) drops the end points of open lines, so
# the line tests run without it; closed contours keep every pixel through NMS.
@pytest.mark.parametrize("shape,nms", [(_circle, True), (_lines, False), (_lines, True)])
def test_perfect_prediction_is_100(shape, nms):
    gt = shape()
    res = _ods(gt.astype(np.float32), gt, nms=nms)
    if shape is _lines and nms:  # 2 end points of 110 pixels suppressed: recall 108/110
        assert res["odsF"] == pytest.approx(100 * 2 * (108 / 110) / (1 + 108 / 110))
        return
    assert res["odsF"] == pytest.approx(100.0)
    assert res["oisF"] == pytest.approx(100.0)


@pytest.mark.parametrize("max_dist", [0.011, 0.0075])
@pytest.mark.parametrize("shape,nms", [(_circle, True), (_lines, False)])
def test_one_pixel_shift_is_inside_the_tolerance(max_dist, shape, nms):
    gt = shape()
    assert _ods(shape(shift=1).astype(np.float32), gt, max_dist, nms=nms)["odsF"] == pytest.approx(100.0)


@pytest.mark.parametrize("nms", [True, False])
def test_shift_outside_the_tolerance_does_not_match(nms):
    gt = _lines()
    # 2 px > 1.56 px (NYUD's 0.011 of the diagonal): no pixel matches
    assert _ods(_lines(shift=2).astype(np.float32), gt, 0.011, nms=nms)["odsF"] == 0.0
    # a larger tolerance (0.02 · 141 = 2.8 px) accepts the same shift
    assert _ods(_lines(shift=2).astype(np.float32), gt, 0.02, nms=False)["odsF"] == pytest.approx(100.0)


def test_counts_per_threshold_and_precision():
    gt = _lines()
    pred = gt.astype(np.float32)
    pred[90, 10:20] = 1.0  # 10 spurious pixels, far from every ground-truth edge
    c = evaluate_edge_image(pred, gt, 0.011, thresholds=[0.1, 0.2], nms=False)
    n_gt = gt.sum()
    np.testing.assert_array_equal(c.sum_r, [n_gt, n_gt])
    np.testing.assert_array_equal(c.count_r, [n_gt, n_gt])
    np.testing.assert_array_equal(c.sum_p, [n_gt + 10, n_gt + 10])
    np.testing.assert_array_equal(c.count_p, [n_gt, n_gt])
    p = n_gt / (n_gt + 10)
    assert summarize(c.stack(), c.best())["odsF"] == pytest.approx(100 * 2 * p / (1 + p))


def test_ignore_pixels_and_padding_are_excluded():
    gt = _lines()
    pred = gt.astype(np.float32)
    ref = evaluate_edge_image(pred, gt, 0.011)
    # the same image padded with ignore (as validation pads to the crop size), with predicted edges
    # in the padding: the padding is cropped off (same diagonal) and its predictions do not count
    gt_pad = np.full((130, 150), 255, np.uint8)
    gt_pad[:H, :W] = gt
    pred_pad = np.zeros((130, 150), np.float32)
    pred_pad[:H, :W] = pred
    pred_pad[110:120, 10:140] = 1.0
    pad = evaluate_edge_image(pred_pad, gt_pad, 0.011)
    np.testing.assert_array_equal(pad.stack(), ref.stack())
    # ignore pixels inside the image: predictions there are not counted either
    gt_ign = gt.copy()
    gt_ign[90:95, 5:95] = 255
    pred_ign = pred.copy()
    pred_ign[92, 10:90] = 1.0
    ign = evaluate_edge_image(pred_ign, gt_ign, 0.011, nms=False)
    assert _ods(pred_ign, gt_ign, nms=False)["odsF"] == pytest.approx(100.0)
    assert ign.sum_p.max() == gt.sum()
    # an image that is all ignore contributes nothing
    assert not evaluate_edge_image(pred, np.full_like(gt, 255), 0.011).evaluated


def test_matching_is_deterministic():
    rng = np.random.default_rng(0)
    gt = _lines()
    pred = np.clip(gt * 0.8 + rng.random((H, W)) * 0.5, 0, 1).astype(np.float32)
    a = evaluate_edge_image(pred, gt, 0.011, thresholds=9)
    b = evaluate_edge_image(pred, gt, 0.011, thresholds=9)
    np.testing.assert_array_equal(a.stack(), b.stack())


def test_ods_and_ois_over_images():
    # image 1 is perfect at every threshold <= 0.5, image 2 only up to 0.3: odsF < oisF = 100
    gt = _lines()
    p1 = gt * 0.5
    p2 = gt * 0.3
    th = [0.2, 0.4]
    c1 = evaluate_edge_image(p1.astype(np.float32), gt, 0.011, thresholds=th, nms=False)
    c2 = evaluate_edge_image(p2.astype(np.float32), gt, 0.011, thresholds=th, nms=False)
    res = summarize(c1.stack() + c2.stack(), c1.best() + c2.best(), np.array(th))
    assert res["oisF"] == pytest.approx(100.0)
    assert res["odsF"] == pytest.approx(100.0) and res["ods_threshold"] == 0.2
    # at 0.4 only image 1 is found: recall 1/2, precision 1 → F = 2/3
    assert res["f"][1] == pytest.approx(2 / 3)


def test_default_thresholds_are_bsds():
    t = edge_thresholds(99)
    assert len(t) == 99 and t[0] == pytest.approx(0.01) and t[-1] == pytest.approx(0.99)


def _batches(n=4, seed=0, h=40, w=52):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tgt = torch.zeros(2, 1, h, w)
        tgt[:, :, 10:30, 20] = 1
        tgt[:, :, 25, 5:45] = 1
        tgt[1, :, 35:, :] = 255  # padding of a smaller image
        logits = (tgt.clamp(max=1) * 4 - 2) + torch.randn(2, 1, h, w, generator=g)
        out.append(({"edge": logits}, {"edge": tgt}))
    return out


def test_edge_state_reduces_by_summation():
    batches = _batches()
    mk = lambda: paper_metrics(["edge"], 2, 0.8, edge_thresholds=19)  # noqa: E731
    whole, a, b = mk(), mk(), mk()
    for i, (o, t) in enumerate(batches):
        whole.update(o, t)
        (a if i % 2 else b).update(o, t)
    reduced = mk()
    reduced.load_state(a.state() + b.state())
    torch.testing.assert_close(reduced.state(), whole.state(), rtol=0, atol=1e-9)
    got, ref = reduced.compute(), whole.compute()
    assert set(got) == {"edge/loss", "edge/odsF", "edge/oisF"}
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-12), k
    assert 0 < ref["edge/odsF"] <= ref["edge/oisF"] <= 100


def test_worker_processes_give_the_same_state(monkeypatch):
    from atrc_exp.metrics import EdgeMeter

    # start the pool after the first image however fast it was (tiny maps are matched in ms)
    monkeypatch.setattr(EdgeMeter, "INLINE_SECONDS_PER_IMAGE", 0.0)
    batches = _batches(n=3)
    inline = paper_metrics(["edge"], 2, 0.8, edge_thresholds=9)
    pooled = paper_metrics(["edge"], 2, 0.8, edge_thresholds=9, edge_eval_workers=2)
    try:
        for o, t in batches:
            inline.update(o, t)
            pooled.update(o, t)
        assert pooled.meters["edge"]._pool is not None
        torch.testing.assert_close(pooled.state(), inline.state(), rtol=0, atol=0)
        tm = pooled.timings()
        assert tm["edge/images"] == 6 and tm["edge/workers"] == 2 and tm["edge/work_seconds"] > 0
        # a second split after reset reuses the pool
        pooled.reset()
        pooled.update(*batches[0])
        assert pooled.compute()["edge/odsF"] > 0
    finally:
        pooled.close()


def test_edge_maps_are_truncated_to_uint8():
    """``uint8(255·sigmoid)`` truncated, as the original's PNGs: 0.5 → 127 (rounding gave 128)."""
    p = np.array([0.0, 0.5, 1.0, 0.999, 0.2, 0.75, 1 / 255, 0.0039], np.float32)
    assert to_uint8_prob(p).tolist() == [0, 127, 255, 254, 51, 191, 1, 0]
    assert to_uint8_prob(np.float64(0.5)) == 127 and to_uint8_prob(np.array([1.5, -0.2])).tolist() == [255, 0]


def test_seism_png_export(tmp_path):
    import cv2

    # a 20×30 image padded to 30×40 with the image in the centre: rows 5..24, columns 5..34
    prob = np.zeros((1, 30, 40), np.float32)
    prob[0, 5, 5:35] = 0.5  # the image's first row
    prob[0, 0, :] = 1.0  # in the padding
    tgt = np.full((1, 30, 40), 255, np.uint8)
    tgt[0, 5:25, 5:35] = 0
    for kw in ({"sizes": [(20, 30)]}, {"targets": tgt}):
        (path,) = save_seism_pngs(prob, ["img_001"], tmp_path, **kw)
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert path.name == "img_001.png" and img.dtype == np.uint8 and img.shape == (20, 30)
        assert (img[0] == 127).all() and (img[1:] == 0).all()  # 0.5 → 127 (truncated)
    # sizes win over the target's valid pixels (ignore pixels along the image border)
    tgt[0, 5:7] = 255
    (path,) = save_seism_pngs(prob, ["img_001"], tmp_path, targets=tgt, sizes=[(20, 30)])
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img.shape == (20, 30) and (img[0] == 127).all()


def test_metrics_quantise_by_truncation():
    """A logit of 0 (sigmoid 0.5) is 127/255 < 0.5 after truncation: nothing is predicted at the
    threshold 0.5 (rounding to 128 predicted it); a logit of 0.005 (127.82 → 127) neither, while
    0.01 (128.14 → 128) is."""
    tgt = torch.zeros(1, 1, 40, 52)
    tgt[:, :, 10:30, 20] = 1
    for logit, predicted in ((0.0, False), (0.005, False), (0.01, True)):
        m = paper_metrics(["edge"], 2, 0.8, edge_thresholds=[0.5], edge_nms=False)
        m.update({"edge": torch.where(tgt > 0, logit, -10.0)}, {"edge": tgt})
        sum_p = m.meters["edge"].sums[2 + 3]  # count_r, sum_r, count_p, sum_p (one threshold)
        assert (sum_p > 0) == predicted, logit


def test_centre_crop_with_the_image_size():
    """With the image size, maps are cropped from the centre of the padded map — also when the
    image's own top rows are ignore, where the bounding box of the valid pixels (the fallback
    without a size) would move the image border, and NMS attenuates edges near the border."""
    gt = _lines()
    gt[:3] = 255  # ignore pixels along the top of the image itself
    gt[5, 20:80] = 1  # an edge 5 rows below the image border, 2 below the ignore rows
    pred = np.where(gt == 1, 0.6, 0.0).astype(np.float32)
    ref = evaluate_edge_image(pred, gt, 0.011, thresholds=[0.3], image_size=(H, W))
    gt_pad = np.full((130, 150), 255, np.uint8)
    gt_pad[15:115, 25:125] = gt  # (130 - 100) // 2 = 15 rows above, (150 - 100) // 2 = 25 left
    pred_pad = np.zeros((130, 150), np.float32)
    pred_pad[15:115, 25:125] = pred
    pred_pad[120:125, 10:140] = 1.0  # predicted edges in the padding do not count
    got = evaluate_edge_image(pred_pad, gt_pad, 0.011, thresholds=[0.3], image_size=(H, W))
    np.testing.assert_array_equal(got.stack(), ref.stack())
    # all but the 6 end points of the 3 open lines (NMS drops them) found at 0.3
    assert got.sum_r[0] == (gt == 1).sum() and got.count_r[0] == got.sum_r[0] - 6
    # the bounding box of the valid pixels starts at row 3: the edge at row 5 is attenuated by NMS
    bbox = evaluate_edge_image(pred_pad, gt_pad, 0.011, thresholds=[0.3])
    assert bbox.count_r[0] < got.count_r[0]
    with pytest.raises(ValueError, match="does not fit"):
        evaluate_edge_image(pred, gt, 0.011, image_size=(H + 1, W))


def test_metrics_crop_with_the_batch_image_sizes():
    """``batch["meta"]["size"]`` (collated as [heights, widths]) makes the edge evaluation crop the
    centred window: the same state as the unpadded maps — with ignore rows at the top of the
    images themselves, where the valid pixels' bounding box (no sizes) gives other counts."""
    batches = _batches(n=2, h=34, w=46)
    mk = lambda: paper_metrics(["edge"], 2, 0.8, edge_thresholds=9)  # noqa: E731
    plain, padded, no_sizes = mk(), mk(), mk()
    for o, t in batches:
        t["edge"][:, :, :7] = 255  # ignore rows inside the images
        plain.update(o, {**t, "meta": {"size": [torch.tensor([34, 34]), torch.tensor([46, 46])]}})
        # 34×46 in 40×52: 3 rows above and below, 3 columns left and right; logits there: +5
        lo = torch.nn.functional.pad(o["edge"], (3, 3, 3, 3), value=5.0)
        tg = torch.nn.functional.pad(t["edge"], (3, 3, 3, 3), value=255.0)
        meta = {"name": ["a", "b"], "size": [torch.tensor([34, 34]), torch.tensor([46, 46])]}
        padded.update({"edge": lo}, {"edge": tg, "meta": meta})
        no_sizes.update({"edge": lo}, {"edge": tg})
    torch.testing.assert_close(padded.state(), plain.state(), rtol=0, atol=0)
    assert not torch.equal(no_sizes.state(), plain.state())
