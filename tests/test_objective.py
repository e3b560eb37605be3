"""``objective``: what ``atrc-train`` returns to a Hydra sweeper — a metric, several, or Δm against
single-task baselines — and a 2-trial Optuna sweep that minimises depth RMSE."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, compose_cfg, tiny_overrides
from wandb_runs import offline_runs

from atrc_exp.config import ConfigError, config_tasks
from atrc_exp.evaluation.objective import Objective


def _objective(*overrides: str) -> Objective:
    cfg = compose_cfg(["dataset=nyud", *overrides])
    return Objective(cfg, config_tasks(cfg))


def _single_task_run(folder, task: str, metrics: dict) -> None:
    (folder / ".hydra").mkdir(parents=True)
    config = {
        "dataset": {"name": "nyud"},
        "backbone": {"_target_": "atrc_exp.models.backbones.hrnet18"},
        "tasks": {"names": [task]},
        "context": {"name": "none"},
        "mode": {"name": "distill"},
        "seed": 0,
    }
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"step": 10, "metrics": metrics}))


def test_a_metric_several_or_the_first_tasks_main_one():
    metrics = {"semseg/mIoU": 40.0, "depth/rmse": 0.6, "normals/mean_angle": 20.0, "edge/odsF": 70.0}
    assert _objective().value(metrics) == 40.0  # NYUD's first task, semseg: mIoU
    assert _objective("objective=depth/rmse").value(metrics) == 0.6
    assert _objective("objective=[depth/rmse,semseg/mIoU]").value(metrics) == [0.6, 40.0]
    with pytest.raises(ConfigError, match="objective=depth/mIoU: not a metric of this run; choose one of"):
        _objective("objective=depth/mIoU")
    with pytest.raises(ConfigError, match="objective_baselines=<run or sweep folder>"):
        _objective("objective=delta_m")


def test_delta_m_against_single_task_runs_by_hand(tmp_path):
    sweep = tmp_path / "baselines"
    _single_task_run(sweep / "0", "semseg", {"semseg/mIoU": 40.0})
    _single_task_run(sweep / "1", "depth", {"depth/rmse": 0.5})
    objective = _objective("tasks.names=[semseg,depth]", "objective=delta_m", f"objective_baselines={sweep}")
    # semseg +10% (44 vs 40, higher is better), depth -20% (0.6 vs 0.5, lower is better): mean -5%
    assert objective.value({"semseg/mIoU": 44.0, "depth/rmse": 0.6}) == pytest.approx(-5.0)
    with pytest.raises(ConfigError, match="no single-task context=none run of normals"):
        _objective("tasks.names=[semseg,normals]", "objective=delta_m", f"objective_baselines={sweep}")


def test_an_optuna_sweep_minimises_depth_rmse(tiny_data_dir, tmp_path):
    """The README's sweep, two trials: the best value Optuna reports is a job's depth RMSE (the
    lowest), and the jobs' W&B runs share the sweep's group."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    over = tiny_overrides(
        tiny_data_dir, **{"trainer.max_steps": 2, "logger": "wandb", "logger.mode": "offline"}
    )
    cmd = [
        sys.executable,
        "-m",
        "atrc_exp.train",
        "--multirun",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.direction=minimize",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweep.dir={sweep}",
        "objective=depth/rmse",
        "trainer.lr=interval(0.001,0.02)",
        *over,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    rmse = [json.loads((sweep / j / "metrics.json").read_text())["metrics"]["depth/rmse"] for j in ("0", "1")]
    assert best == pytest.approx(min(rmse), rel=1e-12)
    groups = {run["group"] for j in ("0", "1") for run in offline_runs(sweep / j / "wandb")}
    assert groups == {"sweep"}
