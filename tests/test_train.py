"""End-to-end runs on tiny synthetic data: single-task, multi-task, resume, multirun, 2 processes, W&B."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_cfg, tiny_overrides
from wandb_runs import offline_runs

from atrc_exp.engine import fit

RANGES = {
    "semseg/mIoU": (0.0, 100.0),
    "depth/rmse": (0.0, 50.0),
    "normals/mean_angle": (0.0, 180.0),
    "edge/loss": (0.0, 100.0),
}


def _check_metrics(metrics: dict, tasks: list[str], trained: bool = True) -> None:
    for task in tasks:
        keys = [k for k in metrics if k.startswith(f"{task}/")]
        assert keys, f"no metric for {task}: {metrics}"
    for k, v in metrics.items():
        assert math.isfinite(v), (k, v)
        if trained and k in RANGES:
            lo, hi = RANGES[k]
            assert lo <= v <= hi, (k, v)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


NO_AUG = {
    "dataset.augment.scale_range": "[1.0,1.0]",
    "dataset.augment.flip": "false",
    "dataset.augment.photometric": "false",
}


@pytest.mark.parametrize("tasks", ["all", "semseg"])
def test_tiny_run_trains_and_reports(tiny_data_dir, tmp_path, tasks):
    steps = 30
    cfg = compose_cfg(
        tiny_overrides(
            tiny_data_dir,
            **NO_AUG,
            **{"tasks": tasks, "trainer.max_steps": steps, "trainer.val_interval": steps, "trainer.lr": 0.01},
        )
    )
    metrics = fit(cfg, tmp_path)
    names = list(cfg.tasks.names)
    _check_metrics(metrics, names)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["step"] == steps and saved["metrics"] == pytest.approx(metrics)
    losses = _losses(tmp_path)
    assert len(losses) == steps
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == [f"step_{steps:08d}"]


def test_resume_continues_from_checkpoint(tiny_data_dir, tmp_path):
    over = tiny_overrides(tiny_data_dir, **{"trainer.max_steps": 4, "trainer.val_interval": 2})
    fit(compose_cfg(over), tmp_path)
    assert len(_losses(tmp_path)) == 4
    # a longer run resumed from the step-4 checkpoint trains only steps 5..6
    over6 = tiny_overrides(
        tiny_data_dir, **{"trainer.max_steps": 6, "trainer.val_interval": 2, "trainer.resume": "auto"}
    )
    fit(compose_cfg(over6), tmp_path)
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 6


def cli_overrides(data_dir: Path, **extra: object) -> list[str]:
    """:func:`tiny_overrides` with the configured DataLoader worker count (``trainer.num_workers``,
    2), as a user runs the CLIs and launchers: their tests must exercise worker start-up."""
    return [o for o in tiny_overrides(data_dir, **extra) if not o.startswith("trainer.num_workers=")]


def _run_cli(args: list[str], cwd: Path, timeout=600, launcher: list[str] | None = None):
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    cmd = (launcher or [sys.executable, "-m", "atrc_exp.train"]) + args
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\nSTDOUT\n{out.stdout[-3000:]}\nSTDERR\n{out.stderr[-3000:]}"
    return out


def test_multirun_two_jobs_two_run_dirs(tiny_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    out = _run_cli(
        [
            "--multirun",
            "tasks=semseg,depth",
            "context=none",
            f"hydra.sweep.dir={sweep}",
            *cli_overrides(tiny_data_dir, **{"trainer.max_steps": 2}),
        ],
        cwd=tmp_path,
    )
    dirs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(dirs) == 2, out.stdout
    keys = [set(json.loads((d / "metrics.json").read_text())["metrics"]) for d in dirs]
    assert any(
        any(k.startswith("semseg/") for k in ks) and not any(k.startswith("depth/") for k in ks)
        for ks in keys
    )
    assert any(
        any(k.startswith("depth/") for k in ks) and not any(k.startswith("semseg/") for k in ks)
        for ks in keys
    )
    assert "final validation metrics" in out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_validation_equals_one_process(tiny_data_dir, tmp_path):
    """Same weights (same seed, no training): 2 gloo processes reduce to the 1-process metrics."""
    over = tiny_overrides(
        tiny_data_dir, **{"trainer.max_steps": 0, "trainer.cpu": "true", "trainer.val_batch_size": 2}
    )
    one = fit(compose_cfg(over), tmp_path / "one")
    two_dir = tmp_path / "two"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "atrc_exp.train",
    ]
    # the CLI run with DataLoader workers, as users run it (workers do not change the data)
    cli = [o for o in over if not o.startswith("trainer.num_workers=")]
    _run_cli([f"hydra.run.dir={two_dir}", *cli], cwd=tmp_path, launcher=launcher)
    two = json.loads((two_dir / "metrics.json").read_text())["metrics"]
    assert set(two) == set(one)
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    log = (two_dir / "train.log").read_text()
    assert "2 process(es)" in log


def test_wandb_offline_run_has_metrics(tiny_data_dir, tmp_path):
    cfg = compose_cfg(
        tiny_overrides(tiny_data_dir, **{"logger": "wandb", "logger.mode": "offline", "trainer.max_steps": 2})
    )
    metrics = fit(cfg, tmp_path)
    (run,) = offline_runs(tmp_path / "wandb")  # W&B's own record log, read back
    logged = {k for row in run["history"] for k in row}
    for key in [f"val/{k}" for k in metrics] + ["train/loss", "train/lr"]:
        assert key in logged, key
    assert run["exit"]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    panels = {
        p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "images" / "val_images").glob("*.png")
    }
    assert panels == {"semseg", "depth", "normals", "edge"}


def test_make_train_cli_prints_table(tiny_data_dir, tmp_path):
    out = _run_cli(
        [f"hydra.run.dir={tmp_path / 'run'}", *cli_overrides(tiny_data_dir, **{"trainer.max_steps": 1})],
        cwd=REPO,
    )
    for key in ("semseg/mIoU", "depth/rmse", "normals/mean_angle", "edge/loss"):
        assert key in out.stdout


@pytest.mark.parametrize("context", ["none", "local"])
def test_bf16_mixed_precision_runs_on_cpu(tiny_data_dir, tmp_path, context):
    cfg = compose_cfg(
        tiny_overrides(
            tiny_data_dir, **{"trainer.mixed_precision": "bf16", "trainer.max_steps": 2, "context": context}
        )
    )
    metrics = fit(cfg, tmp_path)
    _check_metrics(metrics, list(cfg.tasks.names), trained=False)


def test_wandb_run_is_closed_when_the_job_fails(tiny_data_dir, tmp_path):
    import wandb

    # a batch larger than the train split fails inside the loop set-up, after W&B started
    cfg = compose_cfg(
        tiny_overrides(
            tiny_data_dir, **{"logger": "wandb", "logger.mode": "offline", "trainer.batch_size": 16}
        )
    )
    with pytest.raises(ValueError, match="fewer than trainer.batch_size"):
        fit(cfg, tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B had not started"
    assert wandb.run is None


def test_joblib_multiprocessing_launcher_sweep(tiny_data_dir, tmp_path):
    """The README's parallel sweep with the default DataLoader workers: jobs run in joblib's loky
    worker processes, whose default start method (``loky``) cannot start DataLoader workers."""
    sweep = tmp_path / "sweep"
    _run_cli(
        [
            "--multirun",
            "hydra/launcher=joblib_mp",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
            *cli_overrides(tiny_data_dir, **{"trainer.max_steps": 1, "tasks": "depth"}),
        ],
        cwd=tmp_path,
    )
    results = [
        json.loads(p.read_text())["metrics"]["depth/rmse"] for p in sorted(sweep.glob("*/metrics.json"))
    ]
    assert len(results) == 2 and results[0] != results[1]  # different seeds, different runs


def _loader_in_loky_worker(num_workers: int) -> tuple[str | None, list[int]]:
    """In a joblib loky worker: the process's start method and the batches of a DataLoader."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from atrc_exp.engine.trainer import worker_start_context

    loader = DataLoader(
        list(range(4)),
        batch_size=2,
        num_workers=num_workers,
        multiprocessing_context=worker_start_context(num_workers),
    )
    return multiprocessing.get_start_method(), [int(x) for batch in loader for x in batch]


def test_dataloader_workers_start_inside_joblib_loky_worker():
    """Normal runs keep multiprocessing's default start method (fork on Linux: no pickling); in a
    loky worker, whose default is loky's own, the platform's standard method is used instead."""
    from joblib import Parallel, delayed

    from atrc_exp.engine.trainer import worker_start_context

    assert worker_start_context(0) is None and worker_start_context(2) is None
    [(method, data)] = Parallel(n_jobs=2, backend="loky")([delayed(_loader_in_loky_worker)(2)])
    assert method == "loky" and data == [0, 1, 2, 3]


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from atrc_exp.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "extra",
    [
        {"context": "local"},
        {"context": "local", "trainer.mixed_precision": "bf16"},
        {"context": "search", "mode": "search"},
    ],
    ids=["local-fp32", "local-bf16", "search"],
)
def test_training_runs_on_cuda_with_the_cuda_op(tiny_data_dir, tmp_path, extra):
    """A few steps on the GPU through Accelerate with the CUDA local-attention kernel forced
    (``backend=cuda`` is refused on any other device), validation included."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    overrides = {"trainer.max_steps": 4, "ops.local_attention.backend": "cuda", **extra}
    cfg = compose_cfg(tiny_overrides(tiny_data_dir, **overrides))
    metrics = fit(cfg, tmp_path)
    _check_metrics(metrics, list(cfg.tasks.names), trained=False)
    assert torch.cuda.max_memory_allocated() > 0
    assert all(math.isfinite(x) for x in _losses(tmp_path))
