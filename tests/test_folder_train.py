"""Your own data end to end: a folder dataset with partial labels, a task of another name (``person``,
saliency) and images of different sizes — check, a pipeline of a few steps (search → genotype over
the folder's task names → distillation), a single-task baseline, ``atrc-eval`` and ``atrc-predict``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_train import _run_cli

from atrc_exp.cli.data import main as data_main
from atrc_exp.cli.eval import main as eval_main
from atrc_exp.cli.predict import main as predict_main
from atrc_exp.data.synthetic_folder import MISSING, SPECS, ensure_folder_dataset, has_label
from atrc_exp.models.genotype import load_genotype

TASKS = list(SPECS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own") / "data"
    ensure_folder_dataset(root, n_train=8, n_val=4, height=40, width=56, seed=0, progress=False)
    return root


def _train_args(folder: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "dataset=folder",
        f"dataset.root={folder}",
        "dataset.crop_size=[40,56]",
        "trainer.batch_size=2",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.cpu=true",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_check_reports_labels_per_task(folder, capsys):
    assert data_main(["check", str(folder)]) == 0
    out = capsys.readouterr().out
    for task in TASKS:
        assert task in out
    assert "person" in out and "saliency" in out


def test_pipeline_eval_predict_on_own_tasks(folder, tmp_path):
    run = tmp_path / "run"
    out = _run_cli(
        _train_args(
            folder, run, "mode=pipeline", "mode.search_steps=2", "mode.distill_steps=2", "mode.baseline=false"
        ),
        cwd=tmp_path,
    )
    assert "genotype found by the search" in out.stdout
    genotype = load_genotype(run / "search", TASKS)  # over the folder's own task names
    assert set(genotype) == set(TASKS) and all(set(g) == set(TASKS) for g in genotype.values())
    res = json.loads((run / "metrics.json").read_text())
    assert res["step"] == 2
    assert {k.split("/")[0] for k in res["metrics"]} == set(TASKS)
    for key in ("person/maxF", "semseg/mIoU", "depth/rmse", "normals/mean_angle", "edge/odsF"):
        assert key in res["metrics"]
    # partial labels: the val images without a depth / person file are not counted
    val_ids = (folder / "splits" / "val.txt").read_text().split()
    expected = {t: sum(has_label(t, int(i.split("_")[-1])) for i in val_ids) for t in TASKS}
    assert any(expected[t] < len(val_ids) for t in MISSING)
    assert res["labelled_images"] == expected

    evaluated = tmp_path / "eval"
    assert eval_main([str(run / "distill"), "--out", str(evaluated), "--edge-workers", "0"]) == 0
    ev = json.loads((evaluated / "metrics.json").read_text())
    assert set(ev["metrics"]) == set(res["metrics"]) and ev["labelled_images"] == expected

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (37, 53), "b": (45, 61)}.items():
        cv2.imwrite(str(photos / f"{name}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    preds = tmp_path / "preds"
    assert predict_main(["--run", str(run / "distill"), "--images", str(photos), "--out", str(preds)]) == 0
    for name, (h, w) in {"a": (37, 53), "b": (45, 61)}.items():
        d = preds / name
        assert np.load(d / "person.npy").shape == (h, w)  # the renamed task, a saliency map
        assert cv2.imread(str(d / "person.png"), cv2.IMREAD_UNCHANGED).shape == (h, w)
        seg = np.load(d / "semseg.npy")
        assert seg.shape == (h, w) and seg.max() < len(SPECS["semseg"]["classes"])
        assert cv2.imread(str(d / "semseg_legend.png")).shape[0] >= 7 * 10  # class names
        assert np.load(d / "normals.npy").shape == (h, w, 3)


def test_single_task_baseline_and_subset(folder, tmp_path):
    run = tmp_path / "st"
    _run_cli(
        _train_args(folder, run, "dataset.tasks=[person]", "trainer.max_steps=2", "trainer.val_interval=2"),
        cwd=tmp_path,
    )
    res = json.loads((run / "metrics.json").read_text())
    assert {k.split("/")[0] for k in res["metrics"]} == {"person"} and "person/maxF" in res["metrics"]


def test_missing_root_and_bad_yaml_are_one_line(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "atrc_exp.train", "dataset=folder", f"hydra.run.dir={tmp_path / 'r'}"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dataset.root" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "atrc_dataset.yaml").write_text("tasks:\n  a: {kind: segmentaton}\n")
    out = subprocess.run(
        cmd + [f"dataset.root={bad}"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert (
        out.returncode == 2 and "unknown kind 'segmentaton'" in out.stderr and "Traceback" not in out.stderr
    )
