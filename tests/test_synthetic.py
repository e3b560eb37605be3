"""The procedural renderer and the synthetic NYUD_MT / PASCAL_MT writers (tiny sizes, a few seconds)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path

import cv2
import numpy as np
import pytest

from atrc_exp.data.layouts import LAYOUTS, ensure_synthetic_dataset
from atrc_exp.data.synthetic import (
    HUMAN_PART_NAMES,
    SEMSEG_CLASSES,
    intrinsics,
    render_scene,
    scene_seed,
    write_nyud_layout,
)

H, W = 48, 64
SEEDS = range(8)
KEYS = {"image", "depth", "normals", "semseg", "instance", "edge", "sal", "human_parts"}
PERSON = SEMSEG_CLASSES.index("person")
FLOOR = SEMSEG_CLASSES.index("floor")


@pytest.fixture(scope="module")
def scenes() -> dict[int, dict[str, np.ndarray]]:
    return {s: render_scene(s, H, W) for s in SEEDS}


def _rays(h: int, w: int) -> np.ndarray:
    fx, fy, cx, cy = intrinsics(h, w)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([(jj - cx) / fx, (ii - cy) / fy, np.ones((h, w))], -1)


def test_class_lists():
    assert SEMSEG_CLASSES == ("wall", "floor", "ceiling", "sphere", "box", "cylinder", "person")
    assert len(HUMAN_PART_NAMES) == 7 and HUMAN_PART_NAMES[0] == "background"


def test_deterministic(scenes):
    again = render_scene(3, H, W)
    for k in KEYS:
        np.testing.assert_array_equal(again[k], scenes[3][k], err_msg=k)
    other = scenes[4]
    assert not np.array_equal(other["image"], scenes[3]["image"])
    assert not np.array_equal(other["depth"], scenes[3]["depth"])


def test_geometry_independent_of_resolution():
    lo, hi = render_scene(11, H, W), render_scene(11, 2 * H, 2 * W)
    # pixel (i, j) at H×W looks along the same ray as (2i, 2j) at 2H×2W
    np.testing.assert_allclose(hi["depth"][::2, ::2], lo["depth"], rtol=1e-5)
    np.testing.assert_array_equal(hi["semseg"][::2, ::2], lo["semseg"])


def test_shapes_dtypes_ranges(scenes):
    for s in scenes.values():
        assert set(s) == KEYS
        assert s["image"].shape == (H, W, 3) and s["image"].dtype == np.uint8
        assert s["depth"].shape == (H, W) and s["depth"].dtype == np.float32
        assert s["normals"].shape == (H, W, 3) and s["normals"].dtype == np.float32
        for k, dt in (
            ("semseg", np.uint8),
            ("instance", np.int32),
            ("edge", np.uint8),
            ("sal", np.uint8),
            ("human_parts", np.uint8),
        ):
            assert s[k].shape == (H, W) and s[k].dtype == dt, k
        assert 0 < s["depth"].min() and s["depth"].max() < 20
        assert s["semseg"].max() < len(SEMSEG_CLASSES)
        assert s["human_parts"].max() < len(HUMAN_PART_NAMES)
        assert set(np.unique(s["edge"])) <= {0, 1} and set(np.unique(s["sal"])) <= {0, 1}
        assert s["image"].std() > 10  # not blank
        assert 0.001 < s["edge"].mean() < 0.3


def test_normals_unit_and_facing_camera(scenes):
    rays = _rays(H, W)
    for s in scenes.values():
        n = s["normals"]
        np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-4)
        assert ((n * rays).sum(-1) < 0).all()


def test_cross_task_consistency(scenes):
    for s in scenes.values():
        sem, inst = s["semseg"], s["instance"]
        np.testing.assert_array_equal(s["sal"] == 1, sem >= SEMSEG_CLASSES.index("sphere"))
        np.testing.assert_array_equal(s["human_parts"] > 0, sem == PERSON)
        # every instance boundary (pixel vs right / bottom neighbour) is an edge pixel
        right = np.zeros((H, W), bool)
        right[:, :-1] = inst[:, :-1] != inst[:, 1:]
        down = np.zeros((H, W), bool)
        down[:-1] = inst[:-1] != inst[1:]
        assert s["edge"][right | down].all()
        # each instance has a single class
        for i in np.unique(inst):
            assert len(np.unique(sem[inst == i])) == 1


def test_edge_rules():
    from atrc_exp.data.synthetic import _edges

    h, w = 6, 8
    inst = np.zeros((h, w), np.int32)
    inst[:, 5:] = 1  # two instances, same depth and normal: still an edge
    surf = inst.astype(np.int64)
    depth = np.tile(np.linspace(2.0, 2.2, w, dtype=np.float32), (h, 1))
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = -1
    e = _edges(inst, surf, depth, normals)
    assert e.dtype == np.uint8
    assert e[:, 4].all() and e.sum() == h  # one pixel thick, on the left of the boundary
    surf2 = surf.copy()
    surf2[3:, :5] = 7  # another surface of instance 0 with a depth jump (occlusion) -> edge
    depth2 = depth.copy()
    depth2[3:, :5] *= 1.5
    assert _edges(inst, surf2, depth2, normals)[2, :5].all()
    normals3 = normals.copy()
    normals3[3:, :5] = (0, -0.8, -0.6)  # 53° crease between two surfaces -> edge
    assert _edges(inst, surf2, depth, normals3)[2, :5].all()
    assert not _edges(inst, surf2, depth, normals)[2, :4].any()  # same depth and normal: no edge
    steep = np.tile(np.linspace(1.0, 4.0, w, dtype=np.float32), (h, 1))  # a grazing plane: 20-40 %/px
    assert not _edges(np.zeros_like(inst), np.zeros_like(surf), steep, normals).any()


def test_floor_is_a_plane_facing_up(scenes):
    rays = _rays(H, W)
    for s in scenes.values():
        floor = s["semseg"] == FLOOR
        assert floor.sum() > 20
        n = s["normals"][floor]
        assert np.median(n[:, 1]) < -0.8  # up is -y in the OpenCV camera frame
        # depth and normals agree: back-projected floor points satisfy n·X = const (= -camera height)
        pts = rays[floor] * s["depth"][floor][:, None]
        offset = (pts * n).sum(1)
        assert offset.std() < 1e-3 and -2.0 < offset.mean() < -1.0


def test_figures_have_all_parts():
    parts = set()
    for seed in range(12):
        s = render_scene(seed, 96, 128)
        parts |= set(np.unique(s["human_parts"][s["semseg"] == PERSON]).tolist())
    assert parts == set(range(1, 7))


def _read_layout(ds: Path, name: str) -> dict[str, np.ndarray]:
    img = cv2.imread(str(ds / "images" / f"{name}.jpg"), cv2.IMREAD_COLOR)
    return {
        "image": None if img is None else img[..., ::-1],
        "seg": cv2.imread(str(ds / "segmentation" / f"{name}.png"), cv2.IMREAD_UNCHANGED),
        "depth": np.load(ds / "depth" / f"{name}.npy"),
        "normals": np.load(ds / "normals" / f"{name}.npy"),
        "edge": np.load(ds / "edge" / f"{name}.npy"),
    }


def _patch_writer(monkeypatch, layout: str, fn) -> None:
    """Make ``fn`` the synthetic writer of ``layout`` (its row in the layout table) for one test."""
    monkeypatch.setitem(LAYOUTS, layout, dataclasses.replace(LAYOUTS[layout], write_synthetic=fn))


def test_write_nyud_layout(tmp_path):
    ds = write_nyud_layout(tmp_path, n_train=3, n_val=2, height=H, width=W, seed=5, progress=False)
    assert ds == tmp_path / "NYUD_MT"
    train = (ds / "gt_sets" / "train.txt").read_text().split()
    val = (ds / "gt_sets" / "val.txt").read_text().split()
    assert train == ["00000", "00001", "00002"] and val == ["00003", "00004"]
    manifest = json.loads((ds / "synthetic.json").read_text())
    assert manifest == {
        "layout": "NYUD_MT",
        "generator": "atrc_exp.synthetic",
        "version": 1,
        "n_train": 3,
        "n_val": 2,
        "height": H,
        "width": W,
        "seed": 5,
        "semseg_classes": list(SEMSEG_CLASSES),
    }
    for i, name in enumerate(train + val):
        ref = render_scene(scene_seed(5, i), H, W)
        got = _read_layout(ds, name)
        assert got["image"].shape == (H, W, 3)
        assert np.abs(got["image"].astype(int) - ref["image"]).mean() < 8  # JPEG, RGB order kept
        assert got["seg"].dtype == np.uint8 and got["seg"].shape == (H, W)
        np.testing.assert_array_equal(got["seg"], ref["semseg"] + 1)
        assert got["depth"].dtype == np.float32 and got["normals"].dtype == np.float32
        np.testing.assert_array_equal(got["depth"], ref["depth"])
        np.testing.assert_array_equal(got["normals"], ref["normals"])
        assert got["edge"].dtype == np.float32
        np.testing.assert_array_equal(got["edge"], ref["edge"])
    # image i does not depend on the split sizes
    other = write_nyud_layout(tmp_path / "b", n_train=1, n_val=4, height=H, width=W, seed=5, progress=False)
    np.testing.assert_array_equal(np.load(other / "depth" / "00003.npy"), np.load(ds / "depth" / "00003.npy"))


def test_layout_reads_with_nyud_reader(tmp_path):
    from atrc_exp.data.nyud import NYUDMT

    write_nyud_layout(tmp_path, n_train=2, n_val=1, height=H, width=W, seed=0, progress=False)
    ds = NYUDMT(tmp_path, "train", ["semseg", "depth", "normals", "edge"], num_classes=len(SEMSEG_CLASSES))
    assert len(ds) == 2
    raw = ds.load_raw(1)
    np.testing.assert_array_equal(raw["semseg"], render_scene(scene_seed(0, 1), H, W)["semseg"])
    assert raw["image"].shape == (H, W, 3) and raw["normals"].shape == (H, W, 3)


def test_ensure_idempotent_and_mismatch(tmp_path, monkeypatch):
    kw = dict(n_train=2, n_val=1, height=H, width=W, seed=1, progress=False)
    assert ensure_synthetic_dataset(tmp_path, **kw) == tmp_path
    assert (tmp_path / "NYUD_MT" / "synthetic.json").is_file()
    assert not list(tmp_path.glob(".NYUD_MT.tmp-*"))

    def boom(*a, **k):
        raise AssertionError("regenerated an existing dataset")

    _patch_writer(monkeypatch, "NYUD_MT", boom)
    assert ensure_synthetic_dataset(tmp_path, **kw) == tmp_path  # no work the second time
    with pytest.raises(ValueError, match=r"n_train.*on disk 2, wanted 5.*data_dir"):
        ensure_synthetic_dataset(tmp_path, **{**kw, "n_train": 5})
    with pytest.raises(ValueError, match="seed"):
        ensure_synthetic_dataset(tmp_path, **{**kw, "seed": 2})


def test_ensure_refuses_non_synthetic(tmp_path):
    (tmp_path / "NYUD_MT" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        ensure_synthetic_dataset(tmp_path, n_train=1, n_val=1, height=H, width=W, seed=0, progress=False)


def test_ensure_failure_leaves_nothing(tmp_path, monkeypatch):
    tmp_path = tmp_path / "data"  # (the conftest puts a wandb/ folder in tmp_path)

    def fail(dest, *a):
        (dest / "images").mkdir(parents=True)
        raise RuntimeError("disk full")

    _patch_writer(monkeypatch, "NYUD_MT", fail)
    with pytest.raises(RuntimeError):
        ensure_synthetic_dataset(tmp_path, n_train=1, n_val=1, height=H, width=W, seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".synthetic.lock"]


def _ensure_after_barrier(barrier, root: Path, kw: dict) -> None:
    barrier.wait(60)  # both processes call ensure_synthetic_dataset at the same moment
    ensure_synthetic_dataset(root, **kw)


def test_ensure_concurrent(tmp_path):
    root = tmp_path / "data"  # (the conftest puts a wandb/ folder in tmp_path)
    kw = dict(n_train=24, n_val=6, height=H, width=W, seed=7, progress=False)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_ensure_after_barrier, args=(barrier, root, kw)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ds = root / "NYUD_MT"
    assert sorted(p.name for p in root.iterdir()) == [".synthetic.lock", "NYUD_MT"]
    assert json.loads((ds / "synthetic.json").read_text())["n_train"] == 24
    names = (ds / "gt_sets" / "train.txt").read_text().split() + (
        ds / "gt_sets" / "val.txt"
    ).read_text().split()
    assert len(names) == 30
    for folder, ext in (
        ("images", ".jpg"),
        ("segmentation", ".png"),
        ("depth", ".npy"),
        ("normals", ".npy"),
        ("edge", ".npy"),
    ):
        assert sorted(p.stem for p in (ds / folder).iterdir()) == names, folder
        assert all(p.suffix == ext for p in (ds / folder).iterdir())
    np.testing.assert_array_equal(
        np.load(ds / "depth" / "00029.npy"), render_scene(scene_seed(7, 29), H, W)["depth"]
    )
    ensure_synthetic_dataset(root, **kw)  # and it is recognised as complete


def test_pascal_layout_files_and_structure(tmp_path):
    import scipy.io as sio

    from atrc_exp.data.synthetic import PASCAL_CONTEXT_IDS, write_pascal_layout

    ds = write_pascal_layout(tmp_path, n_train=4, n_val=1, height=H, width=W, seed=0, progress=False)
    assert ds == tmp_path / "PASCAL_MT"
    train = (ds / "ImageSets" / "Context" / "train.txt").read_text().split()
    val = (ds / "ImageSets" / "Context" / "val.txt").read_text().split()
    assert len(train) == 4 and len(val) == 1
    assert json.loads((ds / "synthetic.json").read_text())["layout"] == "PASCAL_MT"
    for i, name in enumerate(train + val):
        ref = render_scene(scene_seed(0, i), H, W)
        assert (ds / "JPEGImages" / f"{name}.jpg").is_file()
        seg_dir = "VOC12" if i % 2 == 0 else "pascal-context"
        seg = cv2.imread(str(ds / "semseg" / seg_dir / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(seg, ref["semseg"])
        lm = sio.loadmat(str(ds / "pascal-context" / "trainval" / f"{name}.mat"))["LabelMap"]
        ids = np.array([PASCAL_CONTEXT_IDS[c][0] for c in SEMSEG_CLASSES])
        np.testing.assert_array_equal(lm, ids[ref["semseg"]])
        anno = sio.loadmat(str(ds / "human_parts" / f"{name}.mat"))["anno"]
        assert anno.dtype.names == ("imname", "objects")
        objs = anno[0][0][1]
        assert objs.dtype.names == ("class", "class_ind", "mask", "parts")
        n_obj = len(np.unique(ref["instance"][ref["instance"] >= 7]))
        assert objs.shape == (1, n_obj)
        for o in objs[0]:
            assert o[2].shape == (H, W)
            if int(o[1].ravel()[0]) == 15 and i % 5 != 3:
                assert o[3].dtype.names == ("part_name", "mask") and o[3].shape[1] >= 1
            else:
                assert o[3].size == 0
        nrm = cv2.cvtColor(cv2.imread(str(ds / "normals_distill" / f"{name}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_allclose(2 * nrm.astype(np.float64) / 255.0 - 1, ref["normals"], atol=1 / 127)
        sal = cv2.imread(str(ds / "sal_distill" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(sal > 127, ref["sal"] > 0)


def test_ensure_pascal_layout_beside_nyud(tmp_path, monkeypatch):
    kw = dict(n_train=2, n_val=1, height=H, width=W, seed=1, progress=False)
    ensure_synthetic_dataset(tmp_path, **kw)
    assert ensure_synthetic_dataset(tmp_path, layout="PASCAL_MT", **kw) == tmp_path
    assert {"NYUD_MT", "PASCAL_MT"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob(".PASCAL_MT.tmp-*"))

    def boom(*a, **k):
        raise AssertionError("regenerated an existing dataset")

    _patch_writer(monkeypatch, "PASCAL_MT", boom)
    ensure_synthetic_dataset(tmp_path, layout="PASCAL_MT", **kw)
    with pytest.raises(ValueError, match="n_val"):
        ensure_synthetic_dataset(tmp_path, layout="PASCAL_MT", **{**kw, "n_val": 3})
    with pytest.raises(ValueError, match="unknown dataset layout 'KITTI'; known layouts: NYUD_MT, PASCAL_MT"):
        ensure_synthetic_dataset(tmp_path, layout="KITTI", **kw)
