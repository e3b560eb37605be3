"""Δm and ``atrc-report`` over a small synthetic multirun (single-task + multi-task runs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_overrides
from omegaconf import OmegaConf

from atrc_exp.cli.report import main as report_main
from atrc_exp.engine import fit
from atrc_exp.evaluation.report import build_rows, delta_m, find_runs, load_run


def test_delta_m_hand_computed_mixed_directions():
    base = {"semseg/mIoU": 36.0, "depth/rmse": 0.6, "normals/mean_angle": 20.0, "edge/odsF": 70.0}
    mt = {"semseg/mIoU": 40.0, "depth/rmse": 0.5, "normals/mean_angle": 21.0, "edge/odsF": 70.0}
    # semseg +4/36 = +11.11 %; depth (lower is better) -(0.5-0.6)/0.6 = +16.67 %;
    # normals (lower is better) -(21-20)/20 = -5 %; edge 0 %  -> mean 5.694 %
    expected = (100 * 4 / 36 + 100 * 0.1 / 0.6 - 5.0 + 0.0) / 4
    assert delta_m(mt, base, ["semseg", "depth", "normals", "edge"]) == pytest.approx(expected)
    assert expected == pytest.approx(5.6944, abs=1e-4)
    # keyed by task name works too, and the baseline itself gives 0
    assert delta_m({"depth": 0.6}, {"depth": 0.6}, ["depth"]) == 0.0
    assert delta_m({"sal/maxF": 60.0}, {"sal/maxF": 50.0}, ["sal"]) == pytest.approx(20.0)


# (job number, tasks override, seed): ST semseg ×2 seeds, ST depth, MT semseg+depth ×2 seeds
JOBS = [
    (0, "tasks=semseg", 0),
    (1, "tasks=semseg", 1),
    (2, "tasks=depth", 0),
    (3, "tasks.names=[semseg,depth]", 0),
    (4, "tasks.names=[semseg,depth]", 1),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A Hydra-multirun-like folder: <sweep>/<job>/{metrics.json, .hydra/config.yaml, .hydra/overrides.yaml}."""
    from atrc_exp.data.layouts import ensure_synthetic_dataset

    data = tmp_path_factory.mktemp("synthetic_report")
    ensure_synthetic_dataset(data, n_train=8, n_val=4, height=48, width=64, seed=0, progress=False)
    root = tmp_path_factory.mktemp("sweep")
    for num, task_override, seed in JOBS:
        over = [
            task_override,
            "context=none",
            f"seed={seed}",
            *tiny_overrides(data, **{"trainer.max_steps": 1, "trainer.val_interval": 1}),
        ]
        cfg = compose_cfg(over)
        run = root / str(num)
        fit(cfg, run)
        (run / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        OmegaConf.save(
            OmegaConf.create([task_override, "context=none", f"seed={seed}"]),
            run / ".hydra" / "overrides.yaml",
        )
    return root


def _metric(run: Path, key: str) -> float:
    return json.loads((run / "metrics.json").read_text())["metrics"][key]


def test_rows_mean_std_and_delta_m(sweep):
    runs = [load_run(d) for d in find_runs([sweep])]
    assert len(runs) == 5
    rows = build_rows(runs)
    by_tasks = {r.tasks: r for r in rows}
    assert set(by_tasks) == {("semseg",), ("depth",), ("semseg", "depth")}
    st_seg, st_depth, mt = by_tasks[("semseg",)], by_tasks[("depth",)], by_tasks[("semseg", "depth")]
    assert st_seg.seeds == [0, 1] and mt.seeds == [0, 1] and st_depth.seeds == [0]
    seg = [_metric(sweep / str(i), "semseg/mIoU") for i in (0, 1)]
    assert st_seg.mean["semseg/mIoU"] == pytest.approx(sum(seg) / 2)
    assert st_seg.std["semseg/mIoU"] == pytest.approx(abs(seg[0] - seg[1]) / 2**0.5)
    # the single-task rows are their own baselines
    assert st_seg.delta_m == pytest.approx(0.0) and st_depth.delta_m == pytest.approx(0.0)
    b_seg, b_depth = sum(seg) / 2, _metric(sweep / "2", "depth/rmse")
    m_seg = sum(_metric(sweep / str(i), "semseg/mIoU") for i in (3, 4)) / 2
    m_depth = sum(_metric(sweep / str(i), "depth/rmse") for i in (3, 4)) / 2
    expected = ((m_seg - b_seg) / b_seg - (m_depth - b_depth) / b_depth) * 100 / 2
    assert mt.delta_m == pytest.approx(expected)


def test_atrc_report_cli_writes_table_csv_json(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| dataset | backbone | tasks |" in text
    assert "semseg+depth" in text and "Δm" in text
    assert "Lower is better" in text and "depth/rmse" in text and "Higher is better" in text
    assert "5 runs, 3 configurations" in text
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert len(rows) == 3 and {r["tasks"] for r in rows} == {"semseg", "depth", "semseg+depth"}
    data = json.loads((out / "report.json").read_text())
    assert sum(len(r["runs"]) for r in data["rows"]) == 5
    assert (out / "report.md").read_text().startswith("| dataset")


def test_atrc_report_with_baselines_file(sweep, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("synthetic:\n  hrnet18:\n    semseg/mIoU: 10.0\n    depth/rmse: 2.0\n")
    out = tmp_path / "r"
    assert report_main([str(sweep / "3"), str(sweep / "4"), "--baselines", str(base), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    (row,) = data["rows"]
    m_seg, m_depth = row["mean"]["semseg/mIoU"], row["mean"]["depth/rmse"]
    assert row["delta_m"] == pytest.approx(((m_seg - 10) / 10 - (m_depth - 2) / 2) * 100 / 2)
    assert "baselines file" in capsys.readouterr().out


def test_atrc_report_wandb_offline(sweep, tmp_path):
    assert report_main([str(sweep), "--wandb", "--wandb-mode", "offline"]) == 0
    runs = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert len(runs) == 1
    (table,) = runs[0].glob("files/media/table/report_*.table.json")
    data = json.loads(table.read_text())
    assert "delta_m" in data["columns"] and len(data["data"]) == 3


def test_atrc_report_no_runs(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_a_pipeline_job_counts_once_by_its_stages(tmp_path):
    """A ``mode=pipeline`` job's own metrics.json repeats its distillation's: only the stages
    (search, distill, baseline) are runs."""
    job = tmp_path / "job"
    for folder, mode in ((job, "pipeline"), (job / "search", "search"), (job / "distill", "distill")):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(f"mode:\n  name: {mode}\n")
        (folder / "metrics.json").write_text("{}")
    assert find_runs([job]) == [job / "distill", job / "search"]
    assert find_runs([job / "distill"]) == [job / "distill"]
