"""`atrc-data`: synth, check (a damaged copy), fetch from a local file:// archive, bench."""

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
    assert set(cli.ARCHIVES) == {"nyud", "pascal_context"}
    for info in cli.ARCHIVES.values():
        assert info["url"].startswith("https://") and info["folder"] in ("NYUD_MT", "PASCAL_MT")


def test_bench_runs(capsys):
    rates = cli.bench_transforms(n=1)
    assert len(rates) == 2 and all(r > 0 for _, r in rates)
