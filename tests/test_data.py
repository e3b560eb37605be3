"""NYUD_MT reader and transforms: label shift, ignore regions, invariants of the augmentations."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from atrc_exp.data import NYUDMT, DataError
from atrc_exp.data import transforms as T


def _write_nyud(root, names=("a", "b"), h=12, w=16):
    d = root / "NYUD_MT"
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        cv2.imwrite(str(d / "images" / f"{n}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        seg = rng.integers(0, 41, (h, w)).astype(np.uint8)
        seg[0, 0], seg[0, 1] = 0, 40
        cv2.imwrite(str(d / "segmentation" / f"{n}.png"), seg)
        depth = rng.uniform(0.5, 9, (h, w)).astype(np.float32)
        depth[1, 1] = 0
        np.save(d / "depth" / f"{n}.npy", depth)
        nrm = rng.normal(size=(h, w, 3)).astype(np.float32)
        nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
        nrm[2, 2] = 0
        np.save(d / "normals" / f"{n}.npy", nrm)
        np.save(d / "edge" / f"{n}.npy", (rng.random((h, w)) > 0.9).astype(np.float32))
    (d / "gt_sets" / "train.txt").write_text("\n".join(names) + "\n")
    return d


TASKS = ["semseg", "depth", "normals", "edge"]


def test_reader_label_shift_and_ignore(tmp_path):
    d = _write_nyud(tmp_path)
    ds = NYUDMT(tmp_path, "train", TASKS, transform=T.build_val_transform((16, 20)))
    assert len(ds) == 2
    s = ds[0]
    raw = cv2.imread(str(d / "segmentation" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert s["image"].shape == (3, 16, 20) and s["semseg"].shape == (16, 20)
    # 12x16 padded to 16x20 with the image in the centre: rows 2..13, columns 2..17
    y, x = slice(2, 14), slice(2, 18)
    assert s["semseg"][2, 2] == 255 and s["semseg"][2, 3] == 39
    assert torch.equal(s["semseg"][y, x][raw != 0], torch.from_numpy(raw[raw != 0].astype(np.int64) - 1))
    # padding: labels 255, depth 0 -> 255, normals zero -> 255 (2 rows / columns on every side)
    border = torch.ones(16, 20, dtype=torch.bool)
    border[y, x] = False
    assert (s["semseg"][border] == 255).all() and (s["edge"][0][border] == 255).all()
    assert s["depth"].shape == (1, 16, 20) and s["depth"][0, 3, 3] == 255
    assert (s["depth"][0][border] == 255).all() and (s["depth"][0, y, x] != 255).sum() == 12 * 16 - 1
    assert (s["normals"][:, 4, 4] == 255).all() and (s["normals"][:, border] == 255).all()


def test_reader_image_is_uint8_rgb(tmp_path):
    d = _write_nyud(tmp_path)
    raw = NYUDMT(tmp_path, "train", TASKS).load_raw(0)
    bgr = cv2.imread(str(d / "images" / "a.jpg"), cv2.IMREAD_COLOR)
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == (12, 16, 3)
    np.testing.assert_array_equal(raw["image"], bgr[..., ::-1])


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="NYUD_MT"):
        NYUDMT(tmp_path, "train", TASKS)
    d = _write_nyud(tmp_path)
    with pytest.raises(DataError, match="val.txt"):
        NYUDMT(tmp_path, "val", TASKS)
    (d / "depth" / "b.npy").unlink()
    with pytest.raises(DataError, match="b.npy"):
        NYUDMT(tmp_path, "train", TASKS)[1]
    np.save(d / "depth" / "b.npy", np.ones((5, 5), np.float32))
    with pytest.raises(DataError, match="size"):
        NYUDMT(tmp_path, "train", TASKS)[1]


def _sample(h=20, w=30):
    rng = np.random.default_rng(1)
    n = rng.normal(size=(h, w, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return {
        "image": rng.uniform(0, 255, (h, w, 3)).astype(np.float32),
        "semseg": rng.integers(0, 5, (h, w)).astype(np.int64),
        "depth": rng.uniform(1, 5, (h, w)).astype(np.float32),
        "normals": n,
        "edge": (rng.random((h, w)) > 0.5).astype(np.float32),
        "meta": {"name": "x"},
    }


def test_scale_keeps_labels_and_divides_depth():
    s = _sample()
    out = T.RandomScaleCrop((2.0, 2.0), (40, 60))(s)  # the whole rescaled map
    assert out["image"].shape[:2] == (40, 60)
    assert set(np.unique(out["semseg"])) <= set(np.unique(s["semseg"]))  # never interpolated
    np.testing.assert_allclose(out["depth"][::2, ::2].mean(), s["depth"].mean() / 2, rtol=0.05)
    assert set(np.unique(out["depth"] * 2).round(4)) <= set(np.unique(s["depth"]).round(4))


def test_flip_negates_normals_x():
    s = _sample()
    out = T.RandomHorizontalFlip(p=1.0)(s)
    np.testing.assert_array_equal(out["normals"][:, ::-1, 0], -s["normals"][..., 0])
    np.testing.assert_array_equal(out["normals"][:, ::-1, 1:], s["normals"][..., 1:])
    np.testing.assert_array_equal(out["semseg"][:, ::-1], s["semseg"])


def test_photometric_touches_only_the_image():
    s = _sample()
    torch.manual_seed(0)
    outs = [T.PhotometricDistortion()(s) for _ in range(8)]
    assert any(not np.allclose(o["image"], s["image"]) for o in outs)
    for o in outs:
        for k in ("semseg", "depth", "normals", "edge"):
            np.testing.assert_array_equal(o[k], s[k])


def test_crop_then_pad_to_crop_size():
    s = _sample()
    tf = T.build_train_transform((16, 24), scale_range=(0.5, 2.0))
    torch.manual_seed(0)
    for _ in range(5):
        out = tf(s)
        assert out["image"].shape == (3, 16, 24) and out["semseg"].shape == (16, 24)
        assert out["depth"].shape == (1, 16, 24) and out["normals"].shape == (3, 16, 24)


def test_augmentation_follows_torch_seed():
    s = _sample()
    tf = T.build_train_transform((16, 24))
    torch.manual_seed(5)
    a = tf(s)
    torch.manual_seed(5)
    b = tf(s)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["semseg"], b["semseg"])
