"""Invariants of the full train / validation pipeline (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atrc_exp.data import transforms as T

LABELS = ("semseg", "human_parts", "sal")


def _sample(h=30, w=40, seed=1):
    rng = np.random.default_rng(seed)
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return {
        "image": rng.uniform(0, 255, (h, w, 3)).astype(np.float32),
        "semseg": rng.integers(0, 5, (h, w)).astype(np.int64),
        "human_parts": rng.integers(0, 7, (h, w)).astype(np.int64),
        "sal": rng.integers(0, 2, (h, w)).astype(np.int64),
        "depth": rng.uniform(1, 5, (h, w)).astype(np.float32),
        "normals": n,
        "edge": (rng.random((h, w)) > 0.5).astype(np.float32),
        "meta": {"name": "x"},
    }


@pytest.mark.parametrize("scale", [0.55, 0.8, 1.37, 1.9])
def test_labels_never_interpolated_and_depth_divided(scale):
    s = _sample()
    out = T.RandomScale((scale, scale))(s)
    for k in (*LABELS, "edge"):
        assert set(np.unique(out[k])) <= set(np.unique(s[k])), k
    # nearest + divide: every depth value is an input value over the scale
    src = np.unique(s["depth"])
    got = np.unique(out["depth"] * scale)
    assert np.abs(got[:, None] - src[None]).min(1).max() < 1e-4
    # normals are resampled, never blended (each output vector is an input vector)
    nin = s["normals"].reshape(-1, 3)
    nout = out["normals"].reshape(-1, 3)
    assert np.abs(nout @ nin.T).max(1).min() > 1 - 1e-5


def test_flip_negates_only_normals_x():
    s = _sample()
    out = T.RandomHorizontalFlip(p=1.0)(s)
    np.testing.assert_array_equal(out["normals"][:, ::-1, 0], -s["normals"][..., 0])
    np.testing.assert_array_equal(out["normals"][:, ::-1, 1:], s["normals"][..., 1:])
    for k in (*LABELS, "depth", "edge", "image"):
        np.testing.assert_array_equal(out[k][:, ::-1], s[k])


def test_photometric_touches_only_the_image():
    s = _sample()
    torch.manual_seed(3)
    changed = 0
    for _ in range(6):
        o = T.PhotometricDistortion()(s)
        changed += not np.allclose(o["image"], s["image"])
        assert o["image"].min() >= 0 and o["image"].max() <= 255
        for k in (*LABELS, "depth", "normals", "edge"):
            assert o[k] is s[k] or np.array_equal(o[k], s[k])
    assert changed


def test_pad_values_per_target():
    s = _sample(10, 12)
    out = T.IgnoreRegions()(T.PadToSize((16, 20))(T.Normalize()(s)))
    assert (
        out["image"].shape == (16, 20, 3)
        and (out["image"][10:] == 0).all()
        and (out["image"][:, 12:] == 0).all()
    )
    for k in (*LABELS, "edge"):
        assert (out[k][10:] == 255).all() and (out[k][:, 12:] == 255).all(), k
    assert (out["depth"][10:] == 255).all() and (out["normals"][:, 12:] == 255).all()
    np.testing.assert_array_equal(out["semseg"][:10, :12], s["semseg"])
    padded = T.PadToSize((16, 20))(s)
    assert (padded["depth"][10:] == 0).all() and (padded["normals"][10:] == 0).all()


def test_ignore_regions():
    s = _sample(8, 8)
    s["normals"][1, 2] = 0
    s["depth"][3, 4] = 0
    out = T.IgnoreRegions()(s)
    assert (out["normals"][1, 2] == 255).all() and (out["normals"][0, 0] != 255).all()
    assert out["depth"][3, 4] == 255 and (out["depth"] != 255).sum() == 63
    np.testing.assert_array_equal(out["human_parts"], s["human_parts"])  # has parts: unchanged
    # no part in view (background only, or background + padding) -> the whole map is ignore
    for hp in (
        np.zeros((8, 8), np.int64),
        np.where(np.arange(8)[None] < 4, 0, 255) * np.ones((8, 1), np.int64),
    ):
        out = T.IgnoreRegions()({**s, "human_parts": hp})
        assert (out["human_parts"] == 255).all()


def test_class_ratio_rule():
    assert not T.class_ratio_ok(np.zeros((4, 4)), 0.75)  # one class
    seg = np.zeros((4, 4), np.int64)
    seg[:, :2] = 1
    assert T.class_ratio_ok(seg, 0.75)
    seg[:3, :2] = 255  # ignore excluded: 2 pixels of 1 vs 8 of 0 -> 80%
    assert not T.class_ratio_ok(seg, 0.75)
    seg[0, 2:] = 1  # 4 of 1 vs 6 of 0 -> 60%
    assert T.class_ratio_ok(seg, 0.75)


class _CountingRng:
    def __init__(self):
        self.rng, self.draws = np.random.default_rng(0), 0

    def integers(self, lo, hi):
        self.draws += 1
        return self.rng.integers(lo, hi)


def test_crop_redraws_until_no_class_dominates():
    h, w = 60, 80
    seg = np.zeros((h, w), np.int64)
    seg[:, 30:] = 1  # a 20x40 crop is acceptable for 19 of its 41 x positions
    s = {"image": np.zeros((h, w, 3), np.float32), "semseg": seg}
    torch.manual_seed(0)
    ok = sum(
        T.class_ratio_ok(T.RandomCrop((20, 40), cat_max_ratio=0.75)(s)["semseg"], 0.75) for _ in range(50)
    )
    plain = sum(T.class_ratio_ok(T.RandomCrop((20, 40))(s)["semseg"], 0.75) for _ in range(50))
    assert ok >= 48 and plain < 35
    # impossible (one class): 10 re-draws then the 11th position is used
    rng = _CountingRng()
    out = T.RandomCrop((20, 20), rng=rng, cat_max_ratio=0.75)({**s, "semseg": np.zeros((h, w), np.int64)})
    assert rng.draws == 2 * 11 and out["semseg"].shape == (20, 20)
    # accepted at once: a single draw
    rng = _CountingRng()
    T.RandomCrop((h, w), rng=rng, cat_max_ratio=0.75)(s)
    assert rng.draws == 2
    # without semseg: one draw
    rng = _CountingRng()
    T.RandomCrop((20, 20), rng=rng, cat_max_ratio=0.75)(
        {"image": s["image"], "depth": seg.astype(np.float32)}
    )
    assert rng.draws == 2


def test_crop_keeps_targets_aligned():
    s = _sample(30, 40)
    s["semseg"] = np.arange(30 * 40).reshape(30, 40) % 5
    s["depth"] = np.arange(30 * 40, dtype=np.float32).reshape(30, 40) + 1
    torch.manual_seed(1)
    out = T.RandomCrop((10, 12), cat_max_ratio=0.75)(s)
    v = int(out["depth"][0, 0]) - 1
    y, x = divmod(v, 40)
    np.testing.assert_array_equal(out["semseg"], s["semseg"][y : y + 10, x : x + 12])
    np.testing.assert_array_equal(out["normals"], s["normals"][y : y + 10, x : x + 12])


def test_train_pipeline_output():
    s = _sample(30, 40)
    tf = T.build_train_transform((24, 32))
    torch.manual_seed(0)
    for _ in range(5):
        out = tf(s)
        assert out["image"].shape == (3, 24, 32) and out["image"].dtype == torch.float32
        for k in LABELS:
            assert out[k].shape == (24, 32) and out[k].dtype == torch.int64
            vals = set(out[k].unique().tolist())
            assert vals <= set(np.unique(s[k]).tolist()) | {255}
        assert out["depth"].shape == (1, 24, 32) and out["normals"].shape == (3, 24, 32)
        d = out["depth"][out["depth"] != 255]
        assert d.min() >= 0.5 - 1e-6 and d.max() <= 10 + 1e-6  # 1..5 m scaled by 1/[0.5, 2]
    assert "RandomScaleCrop" in repr(tf)


def test_fused_scale_crop_equals_scale_then_crop():
    """Same draws → the same labels as RandomScale + RandomCrop (cv2 nearest), the image within
    the 1/32-px quantisation of warpAffine."""
    rng = np.random.default_rng(0)
    s = _sample(47, 63)
    s["semseg"] = rng.integers(0, 3, (47, 63))
    for seed in range(40):
        g1, g2 = np.random.default_rng(seed), np.random.default_rng(seed)
        a = T.Compose([T.RandomScale((0.5, 2), rng=g1), T.RandomCrop((30, 40), rng=g1, cat_max_ratio=0.75)])(
            s
        )
        b = T.RandomScaleCrop((0.5, 2), (30, 40), rng=g2)(s)
        for k in (*LABELS, "depth", "normals", "edge"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"seed {seed} {k}")
        assert np.abs(a["image"] - b["image"]).max() < 3


def test_val_pipeline_is_deterministic():
    s = _sample(20, 30)
    tf = T.build_val_transform((24, 32))
    a, b = tf(s), tf(s)
    for k in a:
        if k != "meta":
            assert torch.equal(a[k], b[k])
    np.testing.assert_allclose(
        T.denormalize(a["image"])[:, :20, :30].permute(1, 2, 0).numpy(), s["image"], atol=1e-3
    )
