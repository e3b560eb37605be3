"""Invariants of the full train / validation pipeline (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO
from reference_pipeline import fake_sample, reference_train_steps

from atrc_exp.data import to_tensor as TT
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


def _reference(crop_size, scale_range=(0.5, 2.0), rng=None) -> dict:
    """The steps of the spec's train pipeline, one by one (``tests/reference_pipeline.py``), by name."""
    return dict(reference_train_steps(crop_size, scale_range, rng=rng))


def _four_steps(size, ignore_regions=True):
    """Normalise, pad, (ignore regions,) to tensor: the spec's steps that NormalizePadToTensor fuses."""
    steps = _reference(size)
    names = ["normalise", "pad", *(["ignore regions"] if ignore_regions else []), "to tensor"]
    return T.Compose([steps[n] for n in names])


@pytest.mark.parametrize("scale", [0.55, 0.8, 1.37, 1.9])
def test_labels_never_interpolated_and_depth_divided(scale):
    s = _sample()
    out = T.RandomScaleCrop((scale, scale), (100, 100))(s)  # the crop holds the whole rescaled map
    assert out["image"].shape[:2] == (round(30 * scale), round(40 * scale))
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
    s["image"] = s["image"].astype(np.uint8)
    torch.manual_seed(3)
    changed = 0
    for _ in range(6):
        o = T.PhotometricDistortion()(s)
        changed += not np.array_equal(o["image"], s["image"])
        assert o["image"].dtype == np.uint8
        for k in (*LABELS, "depth", "normals", "edge"):
            assert o[k] is s[k] or np.array_equal(o[k], s[k])
    assert changed


def test_pad_values_per_target():
    s = _sample(10, 12)
    out = T.NormalizePadToTensor((16, 20))(s)
    # 10x12 in 16x20: 3 rows above and below, 4 columns left and right
    inner = torch.zeros((16, 20), dtype=torch.bool)
    inner[3:13, 4:16] = True
    assert out["image"].shape == (3, 16, 20) and (out["image"][:, ~inner] == 0).all()
    for k in LABELS:
        assert (out[k][~inner] == 255).all(), k
    for k in ("edge", "depth", "normals"):  # padded 255, 0, 0; zero depth and normals are ignore
        assert (out[k][:, ~inner] == 255).all(), k
    np.testing.assert_array_equal(out["semseg"][3:13, 4:16].numpy(), s["semseg"])
    padded = T.NormalizePadToTensor((16, 20), ignore_regions=False)(s)
    assert (padded["depth"][:, ~inner] == 0).all() and (padded["normals"][:, ~inner] == 0).all()


def test_ignore_regions():
    s = _sample(8, 8)
    s["normals"][1, 2] = 0
    s["depth"][3, 4] = 0
    out = T.NormalizePadToTensor((8, 8))(s)
    assert (out["normals"][:, 1, 2] == 255).all() and (out["normals"][:, 0, 0] != 255).all()
    assert out["depth"][0, 3, 4] == 255 and (out["depth"] != 255).sum() == 63
    np.testing.assert_array_equal(out["human_parts"].numpy(), s["human_parts"])  # has parts: unchanged
    # no part in view (background only, or background + padding) -> the whole map is ignore
    for hp in (
        np.zeros((8, 8), np.int64),
        np.where(np.arange(8)[None] < 4, 0, 255) * np.ones((8, 1), np.int64),
    ):
        out = T.NormalizePadToTensor((8, 8))({**s, "human_parts": hp})
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


def test_crop_redraws_until_no_class_dominates():
    h, w = 60, 80
    seg = np.zeros((h, w), np.int64)
    seg[:, 30:] = 1  # a 20x40 crop is acceptable for 19 of its 41 x positions
    s = {"image": np.zeros((h, w, 3), np.float32), "semseg": seg}
    torch.manual_seed(0)
    crop = T.RandomScaleCrop((1.0, 1.0), (20, 40), ratio_task="semseg")
    ok = sum(T.class_ratio_ok(crop(s)["semseg"], 0.75) for _ in range(50))
    plain = T.RandomScaleCrop((1.0, 1.0), (20, 40), cat_max_ratio=1.0, ratio_task="semseg")
    assert ok >= 48 and sum(T.class_ratio_ok(plain(s)["semseg"], 0.75) for _ in range(50)) < 35


def test_crop_keeps_targets_aligned():
    s = _sample(30, 40)
    s["semseg"] = np.arange(30 * 40).reshape(30, 40) % 5
    s["depth"] = np.arange(30 * 40, dtype=np.float32).reshape(30, 40) + 1
    torch.manual_seed(1)
    out = T.RandomScaleCrop((1.0, 1.0), (10, 12), ratio_task="semseg")(s)
    v = int(out["depth"][0, 0]) - 1
    y, x = divmod(v, 40)
    np.testing.assert_array_equal(out["semseg"], s["semseg"][y : y + 10, x : x + 12])
    np.testing.assert_array_equal(out["normals"], s["normals"][y : y + 10, x : x + 12])


def test_train_pipeline_output():
    s = _sample(30, 40)
    tf = T.build_train_transform((24, 32), ratio_task="semseg")
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


@pytest.mark.parametrize("scale_range", [(0.5, 2.0), (0.5, 0.63)], ids=["window", "whole"])
@pytest.mark.parametrize("image_dtype", [np.float32, np.uint8])
def test_fused_scale_crop_equals_scale_then_crop(image_dtype, scale_range):
    """Same draws → the same output as rescaling, then cropping (the spec's step): labels bit for bit
    (cv2 nearest; the fused step gathers them with cv2.remap), the image exactly (resize, then crop)."""
    rng = np.random.default_rng(0)
    s = _sample(47, 63)
    s["image"] = s["image"].astype(image_dtype)
    s["semseg"] = rng.integers(0, 3, (47, 63))
    s["semseg"][:5] = 255
    for seed in range(40):
        g1, g2 = np.random.default_rng(seed), np.random.default_rng(seed)
        a = _reference((30, 40), scale_range, rng=g1)["scale+crop"](s)
        b = T.RandomScaleCrop(scale_range, (30, 40), rng=g2, ratio_task="semseg")(s)
        assert g1.random() == g2.random()  # the same number of draws
        for k in (*LABELS, "depth", "normals", "edge", "image"):
            # the image is rescaled in float32
            assert b[k].dtype == (np.float32 if k == "image" else s[k].dtype), k
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"seed {seed} {k}")


def test_val_pipeline_is_deterministic():
    s = _sample(20, 30)
    tf = T.build_val_transform((24, 32))
    a, b = tf(s), tf(s)
    for k in a:
        if k != "meta":
            assert torch.equal(a[k], b[k])
    # 20x30 in 24x32: 2 rows above, 1 column to the left
    np.testing.assert_allclose(
        T.denormalize(a["image"])[:, 2:22, 1:31].permute(1, 2, 0).numpy(), s["image"], atol=1e-3
    )


# ---------------------------------------------------------------------------------------------
# fast paths (uint8 image, cv2.remap gathers, look-up tables, fused normalise/pad/to-tensor)
# ---------------------------------------------------------------------------------------------


def _smooth_uint8_image(h, w, seed=0):
    """A natural-looking uint8 image (smooth colour blobs), where interpolation rounding is small."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32), (w, h))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "arr",
    [
        np.array([[0, 255, -1, 2**40, -(2**62), 7]] * 5, np.int64),
        np.array([[0, 255, -1, 2**31 - 1, -(2**31), 7]] * 5, np.int32),
        np.array([[0, 1, 65535, 300, 2, 7]] * 5, np.uint16),
        np.array([[0, 1, 255, 3, 2, 7]] * 5, np.uint8),
        np.array([[True, False, True, True, False, False]] * 5),
        np.array([[0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45]] * 5, np.float32),
        np.array([[0.0, -0.0, np.nan, 5e-324, -1.5, 2.0]] * 5, np.float64),
        np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3),
        np.arange(5 * 6 * 4, dtype=np.uint8).reshape(5, 6, 4),
    ],
    ids=["int64", "int32", "uint16", "uint8", "bool", "float32", "float64", "hwc3", "hwc4"],
)
def test_gather_is_bit_exact(arr):
    """The cv2.remap gather and cv2.flip move every value bit for bit (negative/huge ints, NaN, -0.0,
    denormals), like the np.take fallback and plain fancy indexing."""
    rng = np.random.default_rng(0)
    rows, cols = np.sort(rng.integers(0, 5, 9)), np.sort(rng.integers(0, 6, 11))
    want = arr[rows][:, cols]
    nmap = T._nearest_map(rows, cols)
    assert nmap is not None and nmap.shape == (9, 11, 2) and nmap.dtype == np.int16
    for got in (T._gather(arr, rows, cols, nmap), T._gather(arr, rows, cols)):
        assert got.dtype == arr.dtype and got.shape == want.shape and got.flags.c_contiguous
        assert got.tobytes() == want.tobytes()
    # a non-contiguous source (a flipped view) too
    assert T._gather(arr[:, ::-1], rows, cols, nmap).tobytes() == arr[:, ::-1][rows][:, cols].tobytes()
    # the flip (cv2.flip) moves values bit for bit as well, into a contiguous array
    flipped = T._flip_lr(arr)
    assert flipped.dtype == arr.dtype and flipped.flags.c_contiguous
    assert flipped.tobytes() == np.ascontiguousarray(arr[:, ::-1]).tobytes()


def _ratio_reference(seg, cat_max_ratio, ignore_index=255):
    labels, cnt = np.unique(seg, return_counts=True)
    cnt = cnt[labels != ignore_index]
    return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


def test_class_ratio_ok_matches_unique():
    """np.bincount counting gives MMSeg's np.unique verdict, also on the fallback dtypes."""
    rng = np.random.default_rng(0)
    verdicts = set()
    for i in range(300):
        k = int(rng.integers(1, 5))
        seg = rng.choice(np.array([0, 1, 2, 3, 255, 254])[: k + 1], size=(6, 7), p=None)
        if i % 3 == 0:  # one dominant class
            seg[:, : int(rng.integers(3, 7))] = int(rng.integers(0, 4))
        for arr in (seg.astype(np.int64), seg.astype(np.uint8), seg.astype(np.uint64), seg - 3, seg * 1.0):
            want = _ratio_reference(arr, 0.75)
            assert T.class_ratio_ok(arr, 0.75) == want, (i, arr.dtype)
            verdicts.add(want)
    assert verdicts == {True, False}
    assert not T.class_ratio_ok(np.full((3, 3), 255), 0.75) and not T.class_ratio_ok(
        np.array([[5, 7000]]), 0.5
    )
    assert T.class_ratio_ok(np.array([[5, 70000]]), 0.75)  # labels beyond bincount's range: np.unique


class _Scripted:
    """An rng that returns scripted values: ``random()`` from one list, ``uniform`` / ``integers``
    from another (checking that each value lies in the range asked for)."""

    def __init__(self, randoms, values):
        self.randoms, self.values = list(randoms), list(values)

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, lo, hi):
        v = self.values.pop(0)
        assert lo <= v < hi, (lo, v, hi)
        return v

    def integers(self, lo, hi):
        v = self.values.pop(0)
        assert lo <= v < hi and v == int(v), (lo, v, hi)
        return v


YES, NO = 0.1, 0.9  # random() draws below / above p = 0.5


def test_rescaled_image_is_float_and_truncated_by_the_photometric_cast():
    """The original reads images as float32: a 1×2 image (0, 3) doubled linearly is (0, 0.75, 2.25,
    3) — uint8 resizing would round 0.75 to 1 — and the photometric step's cast truncates it to
    (0, 0, 2, 3)."""
    img = np.array([[[0, 0, 0], [3, 3, 3]]], np.uint8)
    scaled = T.RandomScaleCrop((2.0, 2.0 + 1e-12), (2, 4))({"image": img})["image"]
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[0, :, 0], [0.0, 0.75, 2.25, 3.0], atol=1e-6)
    out = T.PhotometricDistortion(rng=_Scripted([NO] * 5, []))({"image": scaled})["image"]
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == [0, 0, 2, 3]


def test_photometric_worked_example_uint8_truncation():
    """250 + 20 → 255 (clipped to uint8 before the next step), then ×0.6 → 153 (not 162); the
    scripted draws follow the spec's order: brightness, contrast mode, contrast, saturation, hue."""
    img = np.full((2, 3, 3), 250, np.uint8)
    # brightness yes (+20), contrast first, contrast yes (×0.6), saturation no, hue no
    rng = _Scripted([YES, YES, YES, NO, NO], [20.0, 0.6])
    out = T.PhotometricDistortion(rng=rng)({"image": img})["image"]
    assert out.dtype == np.uint8 and (out == 153).all()
    assert not rng.randoms and not rng.values  # every draw used, no more
    # contrast last: brightness yes (+20), contrast mode "last", saturation no, hue no, contrast yes
    rng = _Scripted([YES, NO, NO, NO, YES], [20.0, 0.6])
    assert (T.PhotometricDistortion(rng=rng)({"image": img})["image"] == 153).all()
    # each step truncates: 100 + 20.7 = 120.7 → 120; 101 × 1.45 = 146.45 → 146 (200 × 1.45 → 255);
    # 101 × 0.5 = 50.5 → 50
    px = np.array([[[100, 200, 101]]], np.uint8)
    rng = _Scripted([YES, YES, NO, NO, NO], [20.7])
    assert T.PhotometricDistortion(rng=rng)({"image": px})["image"].tolist() == [[[120, 220, 121]]]
    rng = _Scripted([NO, YES, YES, NO, NO], [1.45])
    assert T.PhotometricDistortion(rng=rng)({"image": px})["image"].tolist() == [[[145, 255, 146]]]
    rng = _Scripted([NO, NO, NO, NO, YES], [0.5])
    assert T.PhotometricDistortion(rng=rng)({"image": px})["image"].tolist() == [[[50, 100, 50]]]
    # brightness down to below 0 clips at 0: 20 - 31.5 → 0
    rng = _Scripted([YES, NO, NO, NO, NO], [-31.5])
    assert T.PhotometricDistortion(rng=rng)({"image": px // 10})["image"].tolist() == [[[0, 0, 0]]]
    # a float image is cast to uint8 first (truncated): 99.9 → 99, nothing else drawn
    rng = _Scripted([NO, NO, NO, NO, NO], [])
    out = T.PhotometricDistortion(rng=rng)({"image": np.full((1, 1, 3), 99.9, np.float32)})["image"]
    assert out.dtype == np.uint8 and out.tolist() == [[[99, 99, 99]]]


def _hsv_pixel(h, s, v):
    """A 1×1 RGB image whose OpenCV HSV value is (h, s, v) (checked)."""
    import cv2

    rgb = cv2.cvtColor(np.array([[[h, s, v]]], np.uint8), cv2.COLOR_HSV2RGB)
    assert cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).tolist() == [[[h, s, v]]]
    return rgb


def test_photometric_hue_wraps_modulo_180_and_saturation_truncates():
    """Hue: OpenCV H (0..179) + k mod 180; saturation: S × a clipped and truncated."""
    import cv2

    def hsv_after(rgb, randoms, values):
        out = T.PhotometricDistortion(rng=_Scripted(randoms, values))({"image": rgb})["image"]
        return cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0].tolist()

    # hue only: brightness no, contrast mode last, saturation no, hue yes, contrast no
    assert hsv_after(_hsv_pixel(170, 255, 255), [NO, NO, NO, YES, NO], [15]) == [5, 255, 255]  # 185 → 5
    assert hsv_after(_hsv_pixel(4, 255, 255), [NO, NO, NO, YES, NO], [-18]) == [166, 255, 255]  # -14 → 166
    assert hsv_after(_hsv_pixel(90, 255, 255), [NO, NO, NO, YES, NO], [17]) == [107, 255, 255]
    # saturation only: S 200 × 0.55 = 110.00000163 → 110; 255 × 0.5 = 127.5 → 127 (truncated, not
    # rounded); S 200 × 1.4 → 255 (clipped)
    assert hsv_after(_hsv_pixel(60, 200, 255), [NO, NO, YES, NO, NO], [0.55]) == [60, 110, 255]
    assert hsv_after(_hsv_pixel(0, 255, 255), [NO, NO, YES, NO, NO], [0.5]) == [0, 127, 255]
    assert hsv_after(_hsv_pixel(60, 200, 255), [NO, NO, YES, NO, NO], [1.4]) == [60, 255, 255]


@pytest.mark.parametrize("rng_kind", ["numpy", "torch"])
def test_photometric_hue_shift_is_an_integer_in_minus_18_to_17(rng_kind):
    torch.manual_seed(0)
    rng = np.random.default_rng(0) if rng_kind == "numpy" else T.TorchDraws()
    t = T.PhotometricDistortion()
    hues = [p["hue"] for p in (t._draw(rng) for _ in range(4000)) if p["hue"] is not None]
    assert 1800 < len(hues) < 2200  # p 0.5
    assert all(isinstance(k, int) for k in hues)
    assert set(hues) == set(range(-18, 18))  # every integer in [-18, 17], both ends reached, no 18


def _spec_photometric(image: np.ndarray, p: dict) -> np.ndarray:
    """The spec's photometric distortion for the parameters ``p``, written out step by step."""
    import cv2

    def convert(x, a=1.0, b=0.0):
        return np.clip(x.astype(np.float32) * np.float32(a) + np.float32(b), 0, 255).astype(np.uint8)

    img = image.astype(np.uint8)
    if p["brightness"] is not None:
        img = convert(img, b=p["brightness"])
    if p["contrast_first"] is not None:
        img = convert(img, a=p["contrast_first"])
    if p["saturation"] is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = convert(hsv[..., 1], a=p["saturation"])
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p["hue"] is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + p["hue"]) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p["contrast_last"] is not None:
        img = convert(img, a=p["contrast_last"])
    return img


def test_photometric_tables_equal_the_step_by_step_spec():
    """Same draws → the look-up-table path gives exactly the step-by-step uint8 values, in every
    branch combination; a float image gives the values of its truncation."""
    img = _smooth_uint8_image(24, 32)
    img[0, :4] = [[0, 0, 0], [255, 255, 255], [250, 3, 128], [1, 254, 77]]
    s8 = {"image": img, "semseg": np.zeros((24, 32), np.int64)}
    sf = {**s8, "image": img.astype(np.float32) + 0.75}  # truncates back to img
    before = img.copy()
    combos = set()
    for seed in range(300):
        p = T.PhotometricDistortion()._draw(np.random.default_rng(seed))
        combos.add(tuple(v is not None for v in p.values()))
        a = T.PhotometricDistortion(rng=np.random.default_rng(seed))(s8)["image"]
        b = T.PhotometricDistortion(rng=np.random.default_rng(seed))(sf)["image"]
        want = _spec_photometric(img, p)
        assert a.dtype == b.dtype == np.uint8
        np.testing.assert_array_equal(a, want, err_msg=f"seed {seed}: {p}")
        np.testing.assert_array_equal(b, want, err_msg=f"seed {seed}: {p} (float input)")
        if not any(v is not None for v in p.values()):
            assert a is img  # nothing drawn: the uint8 image passes through
    np.testing.assert_array_equal(img, before)  # the input is never changed in place
    assert len(combos) == 24  # all combinations (contrast first and last exclude each other)


def test_normalize_uint8_lut_equals_float():
    img = _smooth_uint8_image(10, 12)
    img[0, :3] = [0, 128, 255]
    a = T.NormalizePadToTensor((10, 12))({"image": img})["image"]
    b = T.NormalizePadToTensor((10, 12))({"image": img.astype(np.float32)})["image"]
    assert a.dtype == torch.float32 and a.shape == (3, 10, 12)
    assert torch.equal(a, b)


def _final_sample(h, w, dtype, seed=0, parts=True):
    s = _sample(h, w, seed)
    s["image"] = _smooth_uint8_image(h, w, seed).astype(dtype)
    s["normals"][1, 2] = 0
    s["normals"][0, 0] = -0.0
    s["depth"][3, 4] = 0
    if not parts:
        s["human_parts"] = np.where(np.arange(w)[None] < 2, 0, 255) * np.ones((h, 1), np.int64)
    return s


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("hw", [(10, 12), (16, 20), (18, 22), (16, 9)])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("parts", [True, False])
def test_normalize_pad_to_tensor_equals_the_four_steps(dtype, hw, flipped, parts):
    """One pass = normalise, pad, ignore regions, to tensor (the spec's steps, bit for bit), for
    uint8 / float images, padded / exact / larger inputs, flipped views and maps with ignore regions."""
    s = _final_sample(*hw, dtype, parts=parts)
    if flipped:
        s = T.RandomHorizontalFlip(p=1.0)(s)
    size = (16, 20)
    want = _four_steps(size)(s)
    got = T.NormalizePadToTensor(size)(s)
    assert set(got) == set(want) and got["meta"] is s["meta"]
    for k in want:
        if k != "meta":
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            assert torch.equal(got[k], want[k]), k
    # normals[1, 2] = 0 of the input, in the centred padding: (top, left) by hand for 16x20
    top, left = {(10, 12): (3, 4), (16, 20): (0, 0), (18, 22): (0, 0), (16, 9): (0, 5)}[hw]
    x = left + (hw[1] - 3 if flipped else 2)
    assert (got["normals"][:, top + 1, x] == 255).all() and (got["normals"][:, top + 1, x + 1] != 255).all()
    assert bool((got["human_parts"] == 255).all()) != parts
    # without the ignore regions: normalise, pad, to tensor
    want = _four_steps(size, ignore_regions=False)(s)
    got = T.NormalizePadToTensor(size, ignore_regions=False)(s)
    for k in want:
        if k != "meta":
            assert torch.equal(got[k], want[k]), k


def test_flip_uint8_image_and_inputs_untouched():
    s = _final_sample(12, 16, np.uint8)
    before = {k: v.copy() for k, v in s.items() if k != "meta"}
    out = T.RandomHorizontalFlip(p=1.0)(s)
    assert out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"], s["image"][:, ::-1])
    np.testing.assert_array_equal(out["normals"][..., 0], -s["normals"][:, ::-1, 0])
    for k, v in before.items():
        np.testing.assert_array_equal(s[k], v, err_msg=k)


@pytest.mark.parametrize("image_dtype", [np.uint8, np.float32])
def test_train_pipeline_matches_the_reference_pipeline(image_dtype):
    """Same draws → the fast pipeline gives exactly the samples of the spec written out step by
    step (``reference_train_steps`` of ``tests/reference_pipeline.py``): every target and the image, bit
    for bit, for a uint8 image and a float one (truncated to uint8 by the photometric step). The
    input sample is never modified."""
    rng = np.random.default_rng(0)
    crop = (60, 80)
    s = fake_sample(72, 96, ["semseg", "human_parts", "sal", "depth", "normals", "edge"], 5, rng)
    s["image"] = _smooth_uint8_image(72, 96).astype(image_dtype)
    if image_dtype == np.float32:
        s["image"] += rng.uniform(0, 1, s["image"].shape).astype(np.float32)
    s["normals"][:10, :10] = 0  # some ignore regions
    s["depth"][20:30, 40:50] = 0
    s["semseg"][:8] = 255
    before = {k: v.copy() for k, v in s.items() if k != "meta"}
    pads = 0
    for seed in range(60):
        g1, g2 = np.random.default_rng(seed), np.random.default_rng(seed)
        fast = T.Compose(
            [
                T.RandomScaleCrop((0.5, 2), crop, rng=g1, ratio_task="semseg"),
                T.RandomHorizontalFlip(0.5, rng=g1),
                T.PhotometricDistortion(rng=g1),
                T.NormalizePadToTensor(crop),
            ]
        )
        a = fast(s)
        b = s
        for _, step in reference_train_steps(crop, rng=g2):
            b = step(b)
        assert g1.random() == g2.random()  # the same number of draws
        assert set(a) == set(b)
        for k in ("image", "semseg", "human_parts", "sal", "depth", "normals", "edge"):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (seed, k)
        # a small scale: padded on all four sides (the image in the centre)
        if bool((a["semseg"][0] == 255).all() and (a["semseg"][-1] == 255).all()):
            pads += bool((a["semseg"][:, 0] == 255).all() and (a["semseg"][:, -1] == 255).all())
    assert pads > 5
    for k, v in before.items():
        np.testing.assert_array_equal(s[k], v, err_msg=k)


def _bench_data():
    """``benchmarks/bench_data.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_data", REPO / "benchmarks" / "bench_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_table_and_its_text():
    bench = _bench_data()
    res = bench.bench_table(n=1)
    assert [r["label"] for r in res] == [c[0] for c in bench.BENCH_CASES]
    for r in res:
        assert [n for n, _ in r["steps"]] == [
            type(t).__name__ for t in T.build_train_transform((8, 8), ratio_task="semseg").transforms
        ]
        assert len(r["ref_steps"]) == 7 and all(ms > 0 for _, ms in r["steps"] + r["ref_steps"])
        assert r["rate"] == pytest.approx(1e3 / sum(ms for _, ms in r["steps"]))
        assert r["speedup"] == pytest.approx(r["rate"] / r["ref_rate"])
    text = bench.format_bench(res, 1)
    for needle in ("NormalizePadToTensor", "scale+crop", "samples/s", "speed-up vs the reference", "57/s"):
        assert needle in text, needle
    assert text.count("speed-up vs the reference") == 2


def test_bench_data_runs_as_a_script():
    """``python benchmarks/bench_data.py --n 1`` from another folder: it finds the reference
    pipeline in tests/ by itself and prints the table for both cases."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_data.py"), "--n", "1"],
        cwd=REPO.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("speed-up vs the reference") == 2 and "NYUD" in r.stdout and "PASCAL" in r.stdout


class _CountingGenerator:
    """A numpy generator that counts the draws of each kind."""

    def __init__(self, seed=0):
        self.rng, self.draws = np.random.default_rng(seed), {"uniform": 0, "integers": 0}

    def uniform(self, lo, hi):
        self.draws["uniform"] += 1
        return self.rng.uniform(lo, hi)

    def integers(self, lo, hi):
        self.draws["integers"] += 1
        return self.rng.integers(lo, hi)


def test_fused_scale_crop_redraw_rule():
    """Up to 10 checked positions, then an 11th taken as it is; one draw when accepted at once."""
    s = _sample(40, 50)
    rng = _CountingGenerator()
    out = T.RandomScaleCrop((1.2, 1.5), (20, 20), rng=rng, ratio_task="semseg")(
        {**s, "semseg": np.zeros((40, 50), np.int64)}
    )
    assert rng.draws == {"uniform": 1, "integers": 2 * 11} and out["semseg"].shape == (20, 20)
    rng = _CountingGenerator()  # the crop is the whole rescaled map: the same position 11 times
    out = T.RandomScaleCrop((0.5, 0.5), (20, 25), rng=rng, ratio_task="semseg")(
        {**s, "semseg": np.zeros((40, 50), np.int64)}
    )
    assert rng.draws == {"uniform": 1, "integers": 2 * 11} and out["semseg"].shape == (20, 25)
    rng = _CountingGenerator()
    T.RandomScaleCrop((1.2, 1.5), (20, 20), rng=rng, ratio_task="semseg")(
        s
    )  # 5 random classes: accepted at once
    assert rng.draws == {"uniform": 1, "integers": 2}
    rng = _CountingGenerator()
    T.RandomScaleCrop((1.2, 1.5), (20, 20), rng=rng, cat_max_ratio=1.0, ratio_task="semseg")(
        {**s, "semseg": s["semseg"] * 0}
    )
    assert rng.draws == {"uniform": 1, "integers": 2}
    rng = _CountingGenerator()  # no class map of the ratio task: one position
    T.RandomScaleCrop((1.2, 1.5), (20, 20), rng=rng, ratio_task="semseg")(
        {"image": s["image"], "depth": s["depth"]}
    )
    assert rng.draws == {"uniform": 1, "integers": 2}


def test_fused_depth_division_keeps_invalid_values():
    """Depth 0, 255, negative and NaN are kept, the rest divided by the scale (as the spec's step)."""
    s = _sample(20, 30)
    special = s["depth"].copy()
    special[0, :4] = [0.0, 255.0, -1.0, np.nan]
    for d in (special, s["depth"]):  # the masked path and the plain one
        b = T.RandomScaleCrop((2.0, 2.0), (40, 60))({**s, "depth": d})["depth"]
        want = _reference((40, 60), (2.0, 2.0))["scale+crop"]({**s, "depth": d})["depth"]
        assert b.dtype == np.float32
        np.testing.assert_array_equal(b, want)
        np.testing.assert_allclose(b[1::2, 1::2][1:], d[1:] / 2, rtol=1e-6)
    np.testing.assert_array_equal(b[0, 8:], s["depth"][0, 4:].repeat(2) / np.float32(2))
    out = T.RandomScaleCrop((2.0, 2.0), (40, 60))({**s, "depth": special})["depth"]
    np.testing.assert_array_equal(out[0, :8], [0, 0, 255, 255, -1, -1, np.nan, np.nan])


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_normalize_pad_to_tensor_image_views(dtype):
    """Flipped, upside-down and cropped views of the image normalise like contiguous arrays."""
    img = _smooth_uint8_image(10, 12).astype(dtype)
    four = _four_steps((16, 20))
    for view in (img, img[:, ::-1], img[::-1], img[2:8, 3:9]):
        got = T.NormalizePadToTensor((16, 20))({"image": view})["image"]
        assert got.shape == (3, 16, 20) and torch.equal(got, four({"image": view})["image"])


def test_torch_draws_follow_the_torch_seed():
    torch.manual_seed(7)
    a = T.TorchDraws()
    first = [a.random() for _ in range(40)]  # more than one batch of 16
    torch.manual_seed(7)
    b = T.TorchDraws()
    assert [b.random() for _ in range(40)] == first and len(set(first)) == 40
    assert all(0 <= u < 1 for u in first)
    ints = [T.TorchDraws().integers(3, 7) for _ in range(2000)]
    counts = np.bincount(ints, minlength=7)[3:]
    assert set(ints) == {3, 4, 5, 6} and counts.min() > 400  # uniform over low .. high-1
    assert T.TorchDraws().integers(5, 6) == 5
    u = [T.TorchDraws().uniform(-32, 32) for _ in range(2000)]
    assert -32 <= min(u) < -28 and 28 < max(u) < 32 and abs(np.mean(u)) < 2
    # transforms without an rng draw from torch: the same seed, the same augmentation
    s = _sample(30, 40)
    tf = T.build_train_transform((24, 32), ratio_task="semseg")
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append([tf(s) for _ in range(3)])
    for x, y in zip(*outs):
        assert all(torch.equal(x[k], y[k]) for k in x if k != "meta")
    assert not torch.equal(outs[0][0]["image"], outs[0][1]["image"])


@pytest.mark.parametrize(
    "hp,parts",
    [
        ([[0, 0], [0, 0]], False),
        ([[255, 255], [255, 255]], False),
        ([[0, 255], [255, 0]], False),
        ([[3, 255], [255, 0]], True),
        ([[0, 6], [0, 0]], True),
        ([[300, 300], [300, 300]], True),
        ([[0, 256], [255, 0]], True),
        ([[-1, 0], [255, -3]], False),
    ],
)
def test_has_parts(hp, parts):
    """A part is any value > 0 other than 255 (the one-pass shortcuts agree with that rule)."""
    hp = np.array(hp, np.int64)
    assert TT._has_parts(hp) == parts == bool(((hp > 0) & (hp != 255)).any())
    out = T.NormalizePadToTensor((2, 2))({"image": np.zeros((2, 2, 3), np.uint8), "human_parts": hp})
    assert bool((out["human_parts"] == 255).all()) == (not parts or bool((hp == 255).all()))
