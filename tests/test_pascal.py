"""PASCAL_MT reader on synthetic data written in the real layout (every task, both splits)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io as sio
import torch

from atrc_exp.data import pascal as P
from atrc_exp.data.pascal import PASCALMT, DataError, edges_from_labelmap, thin
from atrc_exp.data.synthetic import SEMSEG_CLASSES, render_scene, scene_seed, write_pascal_layout

H, W = 48, 64
TASKS = ["semseg", "human_parts", "sal", "normals", "edge"]
K = len(SEMSEG_CLASSES)


@pytest.fixture(scope="module")
def pascal_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pascal")
    write_pascal_layout(root, n_train=6, n_val=3, height=H, width=W, seed=0, progress=False)
    return root


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _ref(i):
    return render_scene(scene_seed(0, i), H, W)


@pytest.mark.parametrize("split,offset,n", [("train", 0, 6), ("val", 6, 3)])
def test_every_task_both_splits(pascal_dir, cache, split, offset, n):
    ds = PASCALMT(pascal_dir, split, TASKS, num_classes=K, cache_dir=cache)
    assert len(ds) == n
    for i in range(n):
        s, r = ds.load_raw(i), _ref(offset + i)
        assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
        np.testing.assert_array_equal(s["semseg"], r["semseg"])
        np.testing.assert_array_equal(s["sal"], r["sal"])
        assert s["sal"].dtype == np.int64 and s["semseg"].dtype == np.int64
        # human parts: the rendered parts, or all-ignore (no person / person written without parts)
        hp = s["human_parts"]
        has_parts = (r["human_parts"] > 0).any() and (offset + i) % 5 != 3
        assert ds.has_person[i] == (r["semseg"] == SEMSEG_CLASSES.index("person")).any()
        if has_parts:
            np.testing.assert_array_equal(hp, r["human_parts"])
        else:
            assert (hp == 255).all()
        # normals: kept (to PNG precision): every synthetic class is in the original's list
        # (the sphere is a "ball", LabelMap id 10); test_normals_kept_only_on_the_listed_classes
        # has the zeroed classes
        assert (np.linalg.norm(s["normals"], axis=-1) > 0).all()
        np.testing.assert_allclose(s["normals"], r["normals"], atol=1 / 127)
        # edges: thin class boundaries of the LabelMap
        e = s["edge"]
        assert e.dtype == np.float32 and set(np.unique(e)) <= {0.0, 1.0}
        seg = r["semseg"]
        boundary = np.zeros_like(e, bool)
        boundary[:, 1:] |= seg[:, 1:] != seg[:, :-1]
        boundary[:, :-1] |= seg[:, 1:] != seg[:, :-1]
        boundary[1:] |= seg[1:] != seg[:-1]
        boundary[:-1] |= seg[1:] != seg[:-1]
        assert e[~boundary].sum() == 0 and (e.sum() > 0) == boundary.any()


def test_person_and_no_person_images_present(pascal_dir, cache):
    ds = PASCALMT(pascal_dir, "train", ["human_parts"], num_classes=K, cache_dir=cache)
    kinds = [(ds.load_raw(i)["human_parts"] != 255).any() for i in range(len(ds))]
    assert any(kinds) and not all(kinds)
    assert ds.has_person[3] and not kinds[3]  # image 3: a person written without parts -> ignore


def test_person_lookup_cached_outside_data_dir(pascal_dir, cache, monkeypatch):
    before = sorted(p for p in pascal_dir.rglob("*"))
    PASCALMT(pascal_dir, "train", ["human_parts"], num_classes=K, cache_dir=cache)
    files = list((cache / "pascal_parts").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and not files[0].name.startswith(".")
    assert sorted(p for p in pascal_dir.rglob("*")) == before  # nothing written into the data dir

    def boom(*a, **k):
        raise AssertionError("re-read the part annotations")

    monkeypatch.setattr(P, "_loadmat", boom)
    ds = PASCALMT(pascal_dir, "train", ["human_parts"], num_classes=K, cache_dir=cache)
    assert len(ds.has_person) == 6


def test_voc12_semseg_wins(pascal_dir, tmp_path):
    ds = PASCALMT(pascal_dir, "train", ["semseg"], num_classes=K, cache_dir=tmp_path)
    assert ds.semseg_path(ds.names[0]).parent.name == "VOC12"
    assert ds.semseg_path(ds.names[1]).parent.name == "pascal-context"


def test_semseg_21_classes_and_ignore(tmp_path):
    write_pascal_layout(tmp_path, n_train=1, n_val=1, height=H, width=W, seed=0, progress=False)
    from PIL import Image

    seg = np.zeros((H, W), np.uint8)
    seg[:, :10], seg[0, 0] = 20, 255
    img = Image.fromarray(seg, mode="P")  # palette PNG, as VOC ships them
    img.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    img.save(tmp_path / "PASCAL_MT" / "semseg" / "VOC12" / "2008_000000.png")
    raw = PASCALMT(tmp_path, "train", ["semseg"], cache_dir=tmp_path / "c").load_raw(0)["semseg"]
    np.testing.assert_array_equal(raw, seg.astype(np.int64))
    with pytest.raises(DataError, match=r"label 20 outside 0..6.*train.txt"):
        PASCALMT(tmp_path, "train", ["semseg"], num_classes=7, cache_dir=tmp_path / "c").load_raw(0)


def test_errors_name_file_and_split(tmp_path):
    with pytest.raises(DataError, match=r"PASCAL_MT.*atrc-data fetch"):
        PASCALMT(tmp_path, "train", TASKS)
    (tmp_path / "PASCAL_MT").mkdir()
    with pytest.raises(DataError, match="empty"):
        PASCALMT(tmp_path, "train", TASKS)
    write_pascal_layout(tmp_path, n_train=2, n_val=1, height=H, width=W, seed=0, progress=False)
    d = tmp_path / "PASCAL_MT"
    with pytest.raises(DataError, match="ImageSets/Context/test.txt"):
        PASCALMT(tmp_path, "test", TASKS, num_classes=K, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="no task"):
        PASCALMT(tmp_path, "train", ["depth"], cache_dir=tmp_path / "c")
    (d / "sal_distill" / "2008_000001.png").unlink()
    ds = PASCALMT(tmp_path, "train", TASKS, num_classes=K, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"2008_000001.png.*train.txt"):
        ds.load_raw(1)
    import cv2

    cv2.imwrite(str(d / "sal_distill" / "2008_000001.png"), np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match=r"size \(5, 5\).*train.txt"):
        ds.load_raw(1)
    (d / "pascal-context" / "trainval" / "2008_000000.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"unreadable file .*2008_000000.mat.*train.txt"):
        ds.load_raw(0)


def test_unknown_part_name(tmp_path):
    write_pascal_layout(tmp_path, n_train=1, n_val=1, height=H, width=W, seed=0, progress=False)
    p = tmp_path / "PASCAL_MT" / "human_parts" / "2008_000000.mat"
    mat = sio.loadmat(str(p))
    objs = mat["anno"][0][0][1][0]
    person = next(o for o in objs if int(o[1].ravel()[0]) == 15)
    person[3][0][0][0] = np.array(["tail"])
    sio.savemat(str(p), {"anno": mat["anno"]})
    ds = PASCALMT(tmp_path, "train", ["human_parts"], num_classes=K, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="tail"):
        ds.load_raw(0)


def test_part_mapping_is_six_parts():
    assert set(P.HUMAN_PART_MAP.values()) == {1, 2, 3, 4, 5, 6}
    assert P.HUMAN_PART_MAP["head"] == 1 and P.HUMAN_PART_MAP["neck"] == 2 and P.HUMAN_PART_MAP["luarm"] == 3
    assert (
        P.HUMAN_PART_MAP["rhand"] == 4 and P.HUMAN_PART_MAP["ruleg"] == 5 and P.HUMAN_PART_MAP["lfoot"] == 6
    )


def test_thin():
    img = np.zeros((20, 30), bool)
    img[5:10, 3:27] = True  # a 5-pixel thick bar
    t = thin(img)
    assert t.sum() > 0 and t.sum() < img.sum() and not (t & ~img).any()
    assert t.sum(0)[6:24].max() == 1  # one pixel wide
    np.testing.assert_array_equal(thin(t), t)  # idempotent
    lm = np.zeros((10, 10), np.uint16)
    lm[:, 5:] = 7
    e = edges_from_labelmap(lm)
    assert e[1:-1, [4, 5]].sum(1).tolist() == [1.0] * 8 and e[:, :4].sum() == 0 and e[:, 6:].sum() == 0


def test_build_datasets_synthetic_pascal(tmp_path):
    from conftest import compose_cfg, tiny_overrides

    from atrc_exp.data import build_datasets, prepare_data

    cfg = compose_cfg(
        tiny_overrides(
            tmp_path / "data", **{"dataset": "synthetic_pascal", "paths.cache_dir": str(tmp_path / "c")}
        )
    )
    assert list(cfg.tasks.names) == TASKS
    data_dir = prepare_data(cfg, progress=False)
    assert (data_dir / "PASCAL_MT" / "synthetic.json").is_file()
    train, val = build_datasets(cfg, data_dir)
    assert isinstance(train, PASCALMT) and len(train) == 8 and len(val) == 4
    torch.manual_seed(0)
    for s in (train[0], val[0]):
        assert s["image"].shape == (3, 48, 64)
        for t in ("semseg", "human_parts", "sal"):
            assert s[t].shape == (48, 64) and s[t].dtype == torch.int64
        assert s["normals"].shape == (3, 48, 64) and s["edge"].shape == (1, 48, 64)
        hp = s["human_parts"]
        assert (hp == 255).all() or ((hp >= 0) & (hp <= 6)).any()


def test_normals_valid_classes_ship_with_the_package():
    """The original's 170 LabelMap classes, read from the package resource (not a guessed list)."""
    from importlib.resources import files

    res = files("atrc_exp") / "resources" / "pascal_context_normals_valid_classes.json"
    assert res.is_file()
    valid = P.NORMALS_VALID_CONTEXT_CLASSES
    assert len(valid) == 170 and valid == P.load_normals_valid_classes()
    # some ids by hand: NYUD classes (ball, plant, wall) and tvmonitor (added by hand) are in; the
    # VOC "pottedplant" (308), the unlabelled 0 and ids 187, 360 are not
    assert [valid[i] for i in (10, 293, 427, 440)] == ["ball", "plant", "tvmonitor", "wall"]
    assert 308 not in valid and 360 not in valid and 187 not in valid and 0 not in valid


def test_normals_kept_only_on_the_listed_classes(tmp_path):
    """A hand-made LabelMap with listed and unlisted classes: normals are kept on the listed ids,
    zero elsewhere, and ignore (255) there after the validation transform."""
    from atrc_exp.data.transforms import build_val_transform

    write_pascal_layout(tmp_path, n_train=1, n_val=1, height=H, width=W, seed=0, progress=False)
    lm = np.zeros((H, W), np.uint16)  # 0: unlabelled (not listed)
    lm[:, 8:16] = 427  # tvmonitor: listed
    lm[:, 16:24] = 308  # pottedplant: not listed
    lm[:, 24:32] = 10  # ball: listed (not in the old guessed list)
    lm[:, 32:40] = 293  # plant: listed
    lm[:, 40:48] = 3  # air conditioner: listed
    lm[:, 48:] = 360  # not listed
    lm_file = tmp_path / "PASCAL_MT" / "pascal-context" / "trainval" / "2008_000000.mat"
    sio.savemat(str(lm_file), {"LabelMap": lm})
    listed = np.zeros((H, W), bool)
    listed[:, 8:16] = listed[:, 24:48] = True
    ds = PASCALMT(tmp_path, "train", ["normals"], cache_dir=tmp_path / "c")
    n = ds.load_raw(0)["normals"]
    assert (np.linalg.norm(n, axis=-1)[listed] > 0.5).all() and (n[~listed] == 0).all()
    out = build_val_transform((H, W))(ds.load_raw(0))["normals"]
    listed = torch.from_numpy(listed)
    assert (out[:, ~listed] == 255).all() and (out[:, listed].abs() <= 1).all()
    # dataset.normals_valid_classes overrides the list
    ds = PASCALMT(tmp_path, "train", ["normals"], normals_valid_classes=[308], cache_dir=tmp_path / "c")
    n = ds.load_raw(0)["normals"]
    assert (n[:, 16:24] != 0).any(axis=-1).all() and (n[:, :16] == 0).all() and (n[:, 24:] == 0).all()
