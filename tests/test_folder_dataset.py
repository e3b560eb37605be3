"""The folder dataset (``atrc_dataset.yaml``): the synthetic writer, reading, ``atrc-data check``."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from atrc_exp.cli import data as cli
from atrc_exp.config import ConfigError
from atrc_exp.data import folder, synthetic_folder
from atrc_exp.data.folder import FolderDataset, check_folder, folder_tasks, load_task_specs
from atrc_exp.data.synthetic import SEMSEG_CLASSES, render_scene, scene_seed
from atrc_exp.label_io import DataError

N_TRAIN, N_VAL, H, W, SEED = 6, 3, 40, 56, 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder") / "ds"
    synthetic_folder.write_folder_files(root, N_TRAIN, N_VAL, H, W, SEED, progress=False)
    return root


@pytest.fixture
def copy(synth, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(synth, dst)
    return dst


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _npy(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def _write_yaml(root: Path, tasks: dict) -> None:
    (root / folder.SPEC_FILE).write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))


# -- the synthetic writer and the CLI's synth ---------------------------------------------------
def test_synth_cli_writes_folder_dataset(synth, tmp_path, capsys):
    out = tmp_path / "mine"
    args = [
        "synth",
        "--layout",
        "folder",
        "--out",
        str(out),
        "--n-train",
        str(N_TRAIN),
        "--n-val",
        str(N_VAL),
    ]
    args += ["--height", str(H), "--width", str(W), "--seed", str(SEED), "--quiet"]
    assert cli.main(args) == 0
    assert f"atrc-train dataset=folder dataset.root={out}" in capsys.readouterr().out
    files = sorted(p.relative_to(synth) for p in synth.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:  # deterministic for a seed
        assert (synth / f).read_bytes() == (out / f).read_bytes(), f
    assert cli.main(args) == 0  # already there: nothing to do
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    args[args.index(str(out))] = str(tmp_path / "other")
    assert cli.main(args) == 1
    assert "already holds other files" in capsys.readouterr().err
    assert (synth / "splits" / "val.txt").read_text().split() == ["00006", "00007", "00008"]
    assert sorted(load_task_specs(synth)) == sorted(synthetic_folder.SPECS)
    assert load_task_specs(synth)["semseg"]["classes"] == list(SEMSEG_CLASSES)


def test_load_task_specs_errors(synth, tmp_path):
    with pytest.raises(ConfigError, match="does not exist; a folder dataset holds atrc_dataset.yaml"):
        load_task_specs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="atrc_dataset.yaml: missing; a folder dataset holds"):
        load_task_specs(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_yaml(bad, {"x": {"kind": "foo"}, "y": {"kind": "segmentation"}})
    with pytest.raises(ConfigError) as e:
        load_task_specs(bad)
    f = bad / folder.SPEC_FILE
    assert str(e.value) == (
        f"{f}: task 'x': unknown kind 'foo'; known kinds: segmentation, depth, normals, edge, saliency; "
        f"{f}: task 'y': kind segmentation needs `classes`"
    )
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no spec for task"):
        folder_tasks(synth, ["semseg", "sal"])


# -- reading ------------------------------------------------------------------------------------
def test_read_labels_per_kind(synth):
    tasks = folder_tasks(synth)
    assert [(t.name, t.kind.name) for t in tasks] == [
        ("semseg", "segmentation"), ("depth", "depth"), ("normals", "normals"), ("edge", "edge"),
        ("person", "saliency"),
    ]  # fmt: skip
    ds = FolderDataset(synth, "train", tasks)
    assert ds.split_file == synth / "splits" / "train.txt" and len(ds) == N_TRAIN
    assert ds.names == [f"{i:05d}" for i in range(N_TRAIN)]
    s = ds.load_raw(0)
    ref = render_scene(scene_seed(SEED, 0), H, W)
    assert s["meta"] == {"name": "00000", "size": (H, W)}
    assert s["image"].dtype == np.uint8 and s["image"].shape == (H, W, 3)
    assert s["semseg"].dtype == np.int64 and np.array_equal(s["semseg"], ref["semseg"])
    assert s["depth"].dtype == np.float32 and np.array_equal(s["depth"], ref["depth"])
    assert s["normals"].shape == (H, W, 3) and np.array_equal(s["normals"], ref["normals"])
    assert s["edge"].dtype == np.float32 and np.array_equal(s["edge"], (ref["edge"] > 0).astype(np.float32))
    person = SEMSEG_CLASSES.index("person")
    assert s["person"].dtype == np.int64 and np.array_equal(
        s["person"], (ref["semseg"] == person).astype(np.int64)
    )
    s1 = ds.load_raw(1)  # a PNG image: lossless
    assert np.array_equal(s1["image"], render_scene(scene_seed(SEED, 1), H, W)["image"])
    # names resolve through the YAML; transform applies to load_raw
    ds2 = FolderDataset(synth, "val", ["edge"], transform=lambda x: sorted(x))
    assert ds2[0] == ["edge", "image", "meta"]


def test_missing_label_is_all_ignore(synth):
    ds = FolderDataset(synth, "train", folder_tasks(synth))
    for i in range(N_TRAIN):
        for t in synthetic_folder.SPECS:
            assert ds.has_label(i, t) == synthetic_folder.has_label(t, i)
    assert not ds.has_label(1, "depth") and not ds.has_label(3, "person")
    s1, s3 = ds.load_raw(1), ds.load_raw(3)
    assert s1["depth"].dtype == np.float32 and (s1["depth"] == 0).all()  # depth: 0 = no label
    assert s3["person"].dtype == np.int64 and (s3["person"] == 255).all()  # saliency: 255
    assert s1["person"].max() <= 1 and (s3["depth"] > 0).all()  # the others are there


def test_sizes_differ_and_padded_size(synth):
    ds = FolderDataset(synth, "train", folder_tasks(synth))
    assert ds.image_sizes() == [(H, W), (H, W), (H + 8, W - 16)] * 2
    s = ds.load_raw(2)
    assert s["meta"]["size"] == (H + 8, W - 16)
    for t in ("image", "semseg", "depth", "normals", "edge", "person"):
        assert s[t].shape[:2] == (H + 8, W - 16), t
    assert ds.padded_size() == (64, 64)
    assert ds.padded_size(8) == (48, 56)
    assert FolderDataset(synth, "val", []).padded_size(16) == (48, 64)


def test_pickles_for_spawned_workers(synth):
    ds = FolderDataset(synth, "val", folder_tasks(synth))
    ds.padded_size()
    back = pickle.loads(pickle.dumps(ds))
    assert [repr(t) for t in back.tasks] == [repr(t) for t in ds.tasks] and back.names == ds.names
    a, b = ds.load_raw(2), back.load_raw(2)
    assert all(np.array_equal(a[k], b[k]) for k in synthetic_folder.SPECS) and a["meta"] == b["meta"]


def test_png_normals_tolerate_8_bit_rounding(copy):
    p = copy / "labels" / "normals" / "00000.npy"
    n = np.load(p)
    p.unlink()
    _png(np.floor((n + 1) * 127.5).astype(np.uint8), p.with_suffix(".png"))  # truncated, not rounded
    assert check_folder(copy)[1] == []
    _png(np.full((H, W, 3), 128, np.uint8), p.with_suffix(".png"))  # length 0.0068
    (problem,) = check_folder(copy)[1]
    assert problem.startswith(
        f"{p.with_suffix('.png')}: {H * W} of {H * W} labelled pixels are not unit vectors"
    )


def test_dataset_errors(copy):
    tasks = folder_tasks(copy)
    (copy / "images" / "00001.png").unlink()
    ds = FolderDataset(copy, "train", tasks)
    with pytest.raises(DataError) as e:
        ds.load_raw(1)
    msg = str(e.value)
    assert "'00001'" in msg and str(ds.split_file) in msg and str(copy / "images") in msg
    _png(np.zeros((5, 6), np.uint8), copy / "labels" / "edge" / "00000.png")
    with pytest.raises(
        DataError, match=r"edge/00000.png: size 5x6 differs from its image .*00000.jpg \(40x56\)"
    ):
        ds.load_raw(0)
    _npy(np.zeros((H, W), np.float32), copy / "labels" / "semseg" / "00002.npy")
    with pytest.raises(DataError, match="has both .*00002.png and .*00002.npy"):
        ds.load_raw(2)
    with pytest.raises(DataError, match="splits/test.txt: missing"):
        FolderDataset(copy, "test", tasks)


# -- a hand-made dataset, read back exactly ---------------------------------------------------------
def test_hand_made_dataset_read_back_exactly(tmp_path):
    root = tmp_path / "hand"
    rng = np.random.default_rng(0)
    _write_yaml(root.mkdir() or root, {
        "region": {"kind": "segmentation", "classes": ["dark", "mid", "bright"]},
        "shade": {"kind": "depth", "range": [0.5, 10.0]},
        "contour": {"kind": "edge", "edge_pos_weight": 0.9},
        "focus": {"kind": "saliency", "weight": 2},
        "surface": {"kind": "normals"},
    })  # fmt: skip
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\n\n")
    (root / "splits" / "val.txt").write_text("c\n")
    img = {"a": rng.integers(0, 256, (5, 7, 3), np.uint8), "b": rng.integers(0, 256, (6, 4, 3), np.uint8),
           "c": rng.integers(0, 256, (3, 3, 3), np.uint8)}  # fmt: skip
    for k, v in img.items():
        _png(v, root / "images" / f"{k}.png")
    lab = root / "labels"
    region_a = rng.choice(np.array([0, 1, 2, 255], np.uint8), (5, 7))
    _png(region_a, lab / "region" / "a.png")
    _png(np.full((3, 3), 2, np.uint8), lab / "region" / "c.png")
    shade_a = rng.uniform(0.5, 9, (5, 7)).astype(np.float32)
    shade_a[0, :3] = np.nan
    _npy(shade_a, lab / "shade" / "a.npy")
    shade_b = rng.integers(500, 9000, (6, 4)).astype(np.uint16)
    shade_b[1, 1] = 0
    _png(shade_b, lab / "shade" / "b.png")  # 16-bit, millimetres
    contour_a = rng.choice(np.array([0, 1, 7, 255], np.uint8), (5, 7))
    _png(contour_a, lab / "contour" / "a.png")
    focus_a = rng.choice(np.array([0, 127, 128, 255], np.uint8), (5, 7))
    _png(focus_a, lab / "focus" / "a.png")
    n = rng.normal(size=(5, 7, 3))
    surface_a = (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)
    surface_a[2, 2] = np.nan
    _npy(surface_a, lab / "surface" / "a.npy")
    n = rng.normal(size=(6, 4, 3))
    surface_b = np.rint((n / np.linalg.norm(n, axis=-1, keepdims=True) + 1) * 127.5).astype(np.uint8)
    surface_b[0, 0] = 0
    _png(surface_b, lab / "surface" / "b.png")  # RGB, n = 2v/255 - 1

    tasks = {t.name: t for t in folder_tasks(root)}
    assert tasks["focus"].weight == 2.0 and tasks["contour"].options["edge_pos_weight"] == 0.9
    assert tasks["region"].named_classes == ["dark", "mid", "bright"]
    assert list(tasks["shade"].options["range"]) == [0.5, 10.0]
    ds = FolderDataset(root, "train", list(tasks.values()))
    assert ds.names == ["a", "b"]
    a, b = ds.load_raw(0), ds.load_raw(1)
    assert np.array_equal(a["image"], img["a"]) and np.array_equal(b["image"], img["b"])
    assert np.array_equal(a["region"], region_a.astype(np.int64)) and a["region"].dtype == np.int64
    assert np.array_equal(a["shade"], np.nan_to_num(shade_a, nan=0.0)) and a["shade"].dtype == np.float32
    assert np.array_equal(b["shade"], shade_b.astype(np.float32) / np.float32(1000)) and b["shade"][1, 1] == 0
    assert np.array_equal(a["contour"], (contour_a != 0).astype(np.float32))
    assert np.array_equal(a["focus"], (focus_a > 127).astype(np.int64)) and a["focus"].dtype == np.int64
    assert np.array_equal(a["surface"], np.nan_to_num(surface_a, nan=0.0)) and (a["surface"][2, 2] == 0).all()
    want_b = surface_b.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    want_b[0, 0] = 0
    assert np.allclose(b["surface"], want_b, rtol=0, atol=1e-6) and (b["surface"][0, 0] == 0).all()
    # b has no region, contour or focus file: all "no label" of its kind
    assert (b["region"] == 255).all() and b["region"].dtype == np.int64
    assert (b["contour"] == 255).all() and b["contour"].dtype == np.float32
    assert (b["focus"] == 255).all() and b["focus"].dtype == np.int64
    c = FolderDataset(root, "val", list(tasks.values())).load_raw(0)
    assert (c["region"] == 2).all() and (c["shade"] == 0).all() and (c["surface"] == 0).all()

    lines, problems = check_folder(root)
    assert problems == []
    table = lines[lines.index("  images with a label:") + 1 :]
    assert [ln.split() for ln in table] == [
        ["task", "kind", "train", "val"],
        ["region", "segmentation", "1/2", "1/1"],
        ["shade", "depth", "2/2", "0/1"],
        ["contour", "edge", "1/2", "0/1"],
        ["focus", "saliency", "1/2", "0/1"],
        ["surface", "normals", "2/2", "0/1"],
    ]


# -- check ----------------------------------------------------------------------------------------
def test_check_good_fixture(synth, capsys):
    lines, problems = check_folder(synth)
    assert problems == []
    assert f"  train: {N_TRAIN} images, height {H}..{H + 8}, width {W - 16}..{W} (2 sizes)" in lines
    assert f"  val: {N_VAL} images, height {H}..{H + 8}, width {W - 16}..{W} (2 sizes)" in lines
    table = [ln.split() for ln in lines[lines.index("  images with a label:") + 1 :]]
    want = [["task", "kind", "train", "val"]]
    for t, spec in synthetic_folder.SPECS.items():
        tr = sum(synthetic_folder.has_label(t, i) for i in range(N_TRAIN))
        va = sum(synthetic_folder.has_label(t, i) for i in range(N_TRAIN, N_TRAIN + N_VAL))
        want.append([t, spec["kind"], f"{tr}/{N_TRAIN}", f"{va}/{N_VAL}"])
    assert table == want
    assert table[2] == ["depth", "depth", "4/6", "3/3"] and table[5] == ["person", "saliency", "5/6", "2/3"]
    capsys.readouterr()
    assert cli.main(["check", str(synth)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("ok") and "semseg" in out and err == ""


def _specs(**changes) -> dict:
    specs = {k: dict(v) for k, v in synthetic_folder.SPECS.items()}
    specs.update(changes)
    return specs


def _bad_kind(r):
    _write_yaml(r, _specs(edge={"kind": "edges"}))
    kinds = "segmentation, depth, normals, edge, saliency"
    return f"{r / folder.SPEC_FILE}: task 'edge': unknown kind 'edges'; known kinds: {kinds}"


def _bad_key(r):
    _write_yaml(r, _specs(depth={"kind": "depth", "scale": 2}))
    allowed = "kind, weight, range"
    return f"{r / folder.SPEC_FILE}: task 'depth': unknown key(s) scale for kind depth (allowed: {allowed})"


def _no_classes(r):
    _write_yaml(r, _specs(semseg={"kind": "segmentation"}))
    return f"{r / folder.SPEC_FILE}: task 'semseg': kind segmentation needs `classes`"


def _no_image(r):
    (r / "images" / "00007.png").unlink()
    return f"{r / 'splits' / 'val.txt'}: id '00007' has no image ({r / 'images'}/00007.jpg or .png)"


def _wrong_size(r):
    p = r / "labels" / "edge" / "00000.png"
    _png(np.zeros((10, 12), np.uint8), p)
    return f"{p}: size 10x12 differs from its image {r / 'images' / '00000.jpg'} ({H}x{W})"


def _class_index(r):
    p = r / "labels" / "semseg" / "00001.png"
    lab = np.asarray(Image.open(p)).copy()
    lab[3, 4] = 7
    lab[0, 0] = 255  # no label: fine
    _png(lab, p)
    return f"{p}: class index 7 outside 0..6 (and not 255 = no label): the task has 7 classes"


def _not_unit(r):
    p = r / "labels" / "normals" / "00002.npy"
    n = np.load(p)
    n[0, 0] = np.nan  # no label: fine
    np.save(p, n * 2)
    px = (H + 8) * (W - 16) - 1
    tail = "(length 2..2; want 1 ± 0.01, NaN for no label)"
    return f"{p}: {px} of {px} labelled pixels are not unit vectors {tail}"


def _both_splits(r):
    with open(r / "splits" / "val.txt", "a") as f:
        f.write("00000\n")
    return f"{r / 'splits' / 'val.txt'}: id '00000' is also in {r / 'splits' / 'train.txt'}"


def _unknown_folder(r):
    _png(np.zeros((H, W), np.uint8), r / "labels" / "sal" / "00000.png")
    return (
        f"{r / 'labels' / 'sal'}: a label folder of task 'sal', which atrc_dataset.yaml does not list "
        f"(its tasks: semseg, depth, normals, edge, person)"
    )


def _orphan_label(r):
    p = r / "labels" / "edge" / "00099.png"
    _png(np.zeros((H, W), np.uint8), p)
    return f"{p}: its id is in no split ({r / 'splits' / 'train.txt'}, {r / 'splits' / 'val.txt'})"


def _negative_depth(r):
    p = r / "labels" / "depth" / "00000.npy"
    d = np.load(p)
    d[1, :3] = -1.0
    np.save(p, d)
    why = "depth is finite metres >= 0, NaN for no label"
    return f"{p}: 3 depth values are negative or infinite (min -1); {why}"


def _top_level_key(r):
    (r / folder.SPEC_FILE).write_text(yaml.safe_dump({"tasks": _specs(), "classes": 7}, sort_keys=False))
    return f"{r / folder.SPEC_FILE}: unknown top-level key 'classes' (only `tasks` is read)"


def _empty_split(r):
    (r / "splits" / "val.txt").write_text("\n")
    return f"{r / 'splits' / 'val.txt'}: empty; list the split's image ids, one per line"


BAD = [_bad_kind, _bad_key, _no_classes, _no_image, _wrong_size, _class_index, _not_unit, _both_splits,
       _unknown_folder, _orphan_label, _negative_depth, _top_level_key, _empty_split]  # fmt: skip


@pytest.mark.parametrize("damage", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_check_bad_input_one_problem(copy, damage, capsys):
    expected = damage(copy)
    assert check_folder(copy)[1] == [expected]
    capsys.readouterr()
    assert cli.main(["check", str(copy)]) == 2
    out, err = capsys.readouterr()
    assert err == f"problem: {expected}\n"
    assert "1 problem(s)" in out


def test_check_without_yaml_and_layouts_untouched(copy, tmp_path, capsys):
    (copy / folder.SPEC_FILE).unlink()
    assert cli.main(["check", str(copy)]) == 2  # images/, labels/, splits/: meant to be a folder dataset
    assert f"problem: {copy / folder.SPEC_FILE}: missing; a folder dataset holds" in capsys.readouterr().err
    (tmp_path / "nothing").mkdir()
    assert cli.main(["check", str(tmp_path / "nothing")]) == 1  # the layouts' message, as before
    assert "or a folder dataset" in capsys.readouterr().err
