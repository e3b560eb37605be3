"""``atrc-eval`` reproduces a run's metrics.json from its checkpoint; ``atrc-predict`` on odd sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, compose_cfg, tiny_overrides
from omegaconf import OmegaConf

from atrc_exp.cli.eval import main as eval_main
from atrc_exp.cli.predict import main as predict_main
from atrc_exp.engine import fit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step multi-task run (semseg, depth, normals, edge) with its final checkpoint."""
    from atrc_exp.data.layouts import ensure_synthetic_dataset

    data = tmp_path_factory.mktemp("synthetic_eval")
    ensure_synthetic_dataset(data, n_train=8, n_val=4, height=48, width=64, seed=0, progress=False)
    run = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(
        tiny_overrides(data, **{"trainer.max_steps": 2, "trainer.val_interval": 2, "trainer.cpu": "true"})
    )
    fit(cfg, run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run


def test_atrc_eval_reproduces_the_run_metrics(run_dir, capsys):
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert "edge/odsF" in saved["metrics"]
    ckpt = run_dir / "checkpoints" / f"step_{saved['step']:08d}"
    assert ckpt.is_dir()
    out = run_dir / "eval_ckpt"
    assert eval_main([str(ckpt), "--out", str(out), "--edge-workers", "0"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["step"] == saved["step"] and got["split"] == "val"
    assert set(got["metrics"]) == set(saved["metrics"])
    for k, v in saved["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert got["edge_eval"]["edge/images"] == 4
    text = capsys.readouterr().out
    assert "edge/odsF" in text and "s/image" in text


def test_atrc_eval_run_dir_default_out_and_seism_export(run_dir):
    # a run folder means its newest checkpoint; output defaults to <run>/eval/
    export = run_dir / "seism"
    assert eval_main([str(run_dir), "--export-edges", str(export), "--edge-workers", "0"]) == 0
    assert (run_dir / "eval" / "metrics.json").is_file()
    pngs = sorted(export.glob("*.png"))
    assert len(pngs) == 4
    img = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert img.dtype == np.uint8 and img.shape == (48, 64)


def test_atrc_eval_errors(tmp_path, capsys):
    assert eval_main([str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_main([str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_atrc_predict_odd_sized_images(run_dir, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (37, 53), "b": (61, 45), "c": (33, 97)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(imgs / f"{name}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (imgs / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    assert predict_main(["--run", str(run_dir), "--images", str(imgs), "--out", str(out)]) == 0
    for name, (h, w) in sizes.items():
        d = out / name
        seg = np.load(d / "semseg.npy")
        assert seg.shape == (h, w) and seg.dtype == np.int64 and seg.max() < 7
        assert np.load(d / "depth.npy").shape == (h, w) and np.load(d / "depth.npy").min() >= 0
        normals = np.load(d / "normals.npy")
        assert normals.shape == (h, w, 3)
        np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-4)
        edge = np.load(d / "edge.npy")
        assert edge.shape == (h, w) and 0 <= edge.min() and edge.max() <= 1
        assert cv2.imread(str(d / "semseg.png"), cv2.IMREAD_UNCHANGED).shape == (h, w)
        assert cv2.imread(str(d / "edge.png"), cv2.IMREAD_UNCHANGED).shape == (h, w)
        for task in ("semseg", "depth", "normals", "edge"):
            assert cv2.imread(str(d / f"{task}_color.png")).shape == (h, w, 3)
        sheet = cv2.imread(str(d / "sheet.png"))
        legend = cv2.imread(str(d / "semseg_legend.png"))  # the synthetic classes have names
        assert legend.shape[0] >= 7 * 10
        assert sheet.shape[1] == 5 * w + legend.shape[1] and sheet.shape[0] > h  # image + 4 tasks + legend


def test_module_entry_points_run():
    for mod in ("atrc_exp.cli.eval", "atrc_exp.cli.predict", "atrc_exp.cli.report"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_atrc_eval_original_weights_mismatch_is_a_clean_error(run_dir, tmp_path, capsys):
    import torch

    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {"backbone.nonexistent.weight": torch.zeros(1)}}, bogus)
    assert eval_main([str(bogus), "--config", str(run_dir), "--edge-workers", "0"]) == 2
    assert "original-implementation weights" in capsys.readouterr().err
