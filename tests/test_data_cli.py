"""`atrc-data`: synth, check (a damaged copy), fetch from a local file:// archive."""

from __future__ import annotations

import hashlib
import shutil
import tarfile

import numpy as np
import pytest

from atrc_exp.cli import data as cli

KW = ["--n-train", "3", "--n-val", "2", "--height", "32", "--width", "40", "--quiet"]


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_data")
    assert cli.main(["synth", "--out", str(root), *KW]) == 0
    assert cli.main(["synth", "--layout", "pascal", "--out", str(root), *KW]) == 0
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def test_synth_and_check_ok(both_layouts, capsys):
    assert (both_layouts / "NYUD_MT" / "gt_sets" / "train.txt").is_file()
    assert (both_layouts / "PASCAL_MT" / "ImageSets" / "Context" / "val.txt").is_file()
    capsys.readouterr()
    assert cli.main(["check", str(both_layouts)]) == 0
    out = capsys.readouterr().out
    assert "NYUD_MT" in out and "PASCAL_MT" in out and "train: 3 images" in out and out.strip().endswith("ok")
    assert cli.main(["check", str(both_layouts / "PASCAL_MT")]) == 0  # a layout folder itself


def test_check_reports_damaged_copy(both_layouts, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(both_layouts, root)
    nyud, pascal = root / "NYUD_MT", root / "PASCAL_MT"
    (nyud / "depth" / "00001.npy").unlink()  # missing
    (nyud / "images" / "00003.jpg").write_bytes(b"garbage")  # unreadable (val)
    np.save(nyud / "normals" / "00002.npy", np.zeros((5, 5, 3), np.float32))  # mis-sized
    (pascal / "human_parts" / "2008_000000.mat").write_bytes(b"garbage")
    (pascal / "sal_distill" / "2008_000004.png").unlink()
    capsys.readouterr()
    assert cli.main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "problem(s)" in out
    for needle in ("depth/00001.npy", "images/00003.jpg", "normals/00002.npy", "2008_000000.mat",
                   "sal_distill/2008_000004.png", "gt_sets/train.txt", "gt_sets/val.txt",
                   "ImageSets/Context/val.txt"):  # fmt: skip
        assert needle in out, needle
    (nyud / "gt_sets" / "val.txt").unlink()
    assert cli.main(["check", str(root)]) == 1
    assert "val.txt is missing" in capsys.readouterr().out


def test_check_missing_or_empty_dir(tmp_path, capsys):
    assert cli.main(["check", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "atrc-data fetch" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["check", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "NYUD_MT" in err and "PASCAL_MT" in err and "atrc-data fetch" in err


def _archive(tmp_path, both_layouts):
    arc = tmp_path / "NYUD_MT.tgz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(both_layouts / "NYUD_MT", arcname="NYUD_MT")
    return arc, hashlib.sha256(arc.read_bytes()).hexdigest()


def test_fetch_local_archive(both_layouts, tmp_path, capsys):
    arc, digest = _archive(tmp_path, both_layouts)
    dest = tmp_path / "data"
    rc = cli.main(
        ["fetch", "--dataset", "nyud", "--dest", str(dest), "--url", arc.as_uri(), "--sha256", digest]
    )
    assert rc == 0
    assert "sha256 ok" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == ["NYUD_MT"]  # no partial files left
    assert cli.main(["check", str(dest)]) == 0
    # already there: refuse without --force
    assert cli.main(["fetch", "--dest", str(dest), "--url", arc.as_uri()]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli.main(["fetch", "--dest", str(dest), "--url", arc.as_uri(), "--force", "--keep-archive"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["NYUD_MT", "NYUD_MT.tgz"]


def test_fetch_bad_checksum_or_source_leaves_nothing(both_layouts, tmp_path, capsys):
    arc, _ = _archive(tmp_path, both_layouts)
    dest = tmp_path / "data"
    assert cli.main(["fetch", "--dest", str(dest), "--url", arc.as_uri(), "--sha256", "0" * 64]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert list(dest.iterdir()) == []
    assert cli.main(["fetch", "--dest", str(dest), "--url", (tmp_path / "missing.tgz").as_uri()]) == 1
    assert "could not open" in capsys.readouterr().err and list(dest.iterdir()) == []
    # an archive without the expected top folder
    bad = tmp_path / "bad.tgz"
    with tarfile.open(bad, "w:gz") as tf:
        tf.add(both_layouts / "PASCAL_MT", arcname="PASCAL_MT")
    assert cli.main(["fetch", "--dataset", "nyud", "--dest", str(dest), "--url", bad.as_uri()]) == 1
    assert "no NYUD_MT/" in capsys.readouterr().err and list(dest.iterdir()) == []


def test_archive_table():
    """The fetch archives come from the layout table: one per layout, unpacking to its folder."""
    from atrc_exp.data.layouts import LAYOUTS

    assert set(cli.ARCHIVES) == {"nyud", "pascal_context"}
    published = [name for name, row in LAYOUTS.items() if row.archive is not None]
    assert published == ["NYUD_MT", "PASCAL_MT"]  # the folder layout is the user's own: no archive
    assert sorted(info["folder"] for info in cli.ARCHIVES.values()) == published
    for info in cli.ARCHIVES.values():
        assert info["url"].startswith("https://") and info["file"] == f"{info['folder']}.tgz"


def test_synth_layout_names(capsys):
    """`synth --layout` takes a layout, a dataset name or an unambiguous prefix; else exit code 2."""
    parse = cli.build_parser().parse_args
    for name, layout in [("NYUD_MT", "NYUD_MT"), ("nyud", "NYUD_MT"), ("pascal", "PASCAL_MT"),
                         ("pascal_context", "PASCAL_MT"), ("synthetic_pascal", "PASCAL_MT")]:  # fmt: skip
        assert parse(["synth", "--layout", name]).layout == layout, name
    with pytest.raises(SystemExit) as e:
        parse(["synth", "--layout", "KITTI"])
    assert e.value.code == 2 and "NYUD_MT, PASCAL_MT" in capsys.readouterr().err


def test_bench_is_not_a_subcommand(capsys):
    """The transform benchmark is benchmarks/bench_data.py, not part of the installed CLI."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"])
    assert e.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_check_reports_valid_normals_per_split(both_layouts, tmp_path, capsys):
    """PASCAL_MT normals are kept only on the listed LabelMap classes: `check` reports the share of
    valid normals pixels (over the split and per image: min / mean / max, images without any, the
    lowest images) and fails when no image has any."""
    import scipy.io as sio

    root = tmp_path / "copy"
    shutil.copytree(both_layouts / "PASCAL_MT", root / "PASCAL_MT")
    lm_dir = root / "PASCAL_MT" / "pascal-context" / "trainval"
    lm = sio.loadmat(str(lm_dir / "2008_000000.mat"))["LabelMap"]
    assert lm.shape == (32, 40)
    half = lm.copy()
    half[:, :20] = 0  # unlabelled: not a listed class -> normals zeroed on half the image
    sio.savemat(str(lm_dir / "2008_000000.mat"), {"LabelMap": half})
    sio.savemat(str(lm_dir / "2008_000002.mat"), {"LabelMap": np.full_like(lm, 308)})  # pottedplant: none
    capsys.readouterr()
    assert cli.main(["check", str(root)]) == 0
    out = capsys.readouterr().out
    train = next(ln for ln in out.splitlines() if "normals valid" in ln)  # train comes first
    # 3 images of 1280 pixels: 640 + 1280 + 0 valid -> 50.0% of the split; per image 0 / 50 / 100%
    assert "normals valid on 50.0% of the pixels" in train
    assert "min 0.0%, mean 50.0%, max 100.0%" in train and "1 of 3 images without any" in train
    assert "lowest: 2008_000002 0.0%, 2008_000000 50.0%, 2008_000001 100.0%" in train
    val = [ln for ln in out.splitlines() if "normals valid" in ln][1]
    assert "normals valid on 100.0% of the pixels" in val and "0 of 2 images without any" in val
    # no valid normals pixel in a whole split: a problem (a wrong LabelMap, or a wrong class list)
    for name in ("2008_000000", "2008_000001"):
        sio.savemat(str(lm_dir / f"{name}.mat"), {"LabelMap": np.zeros_like(lm)})
    assert cli.main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "PASCAL_MT/train: no valid normals pixel in any image" in out and "LabelMap" in out
    assert "PASCAL_MT/val" not in out


def test_normals_report_line():
    line = cli.normals_report([("a", 0, 100), ("b", 30, 100), ("c", 100, 100), ("d", 50, 200)], worst=2)
    assert line == (
        "normals valid on 36.0% of the pixels; per image min 0.0%, mean 38.8%, max 100.0%; "
        "1 of 4 images without any; lowest: a 0.0%, d 25.0%"
    )
    n = np.zeros((2, 3, 3), np.float32)
    n[0, 0] = [0, 0, 1]
    n[1, 2] = [-0.0039, 0, 0]
    assert cli.normals_valid_pixels(n) == (2, 6)
