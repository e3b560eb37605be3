"""``logger=wandb`` as a W&B user expects it, read back from the offline run's own record log
(``tests/wandb_records.py``): one W&B run across a SIGKILL and the resume, every step once; the
group, job type and tags; best-value summaries; the genotype and the model as artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import compose_cfg, tiny_overrides
from wandb_runs import offline_runs

from atrc_exp.engine.loggers import WANDB_RUN_FILE
from atrc_exp.pipeline import stage_configs

STEPS = 7


def _train(run_dir, data_dir, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("ATRC_FAULT_INJECT", None)
    if fault:
        env["ATRC_FAULT_INJECT"] = fault
    over = {
        "mode": "search",
        "context": "search",
        "trainer.max_steps": STEPS,
        "trainer.val_interval": STEPS,
        "trainer.checkpoint_interval": 3,
        "logger": "wandb",
        "logger.mode": "offline",
        "logger.tags": "[mine]",
    }
    cmd = [
        sys.executable,
        "-m",
        "atrc_exp.train",
        f"hydra.run.dir={run_dir}",
        *tiny_overrides(data_dir, **over),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_one_wandb_run_across_a_sigkill_and_the_resume(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    killed = _train(run_dir, tiny_data_dir, fault="sigkill@5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run_dir / WANDB_RUN_FILE).is_file()
    done = _train(run_dir, tiny_data_dir)  # trainer.resume=auto: from the step-3 checkpoint
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = offline_runs(run_dir / "wandb")
    # one W&B run: the resumed process continued the killed one's id
    assert first["id"] == second["id"] and second["resumed"] and not first["resumed"]
    steps = [row["step"] for run in (first, second) for row in run["history"] if "train/loss" in row]
    assert steps == list(range(1, STEPS + 1))  # every step once (4 logged before the kill)
    assert second["exit"]
    # job type and tags from the mode and context; no group outside a sweep or a pipeline
    assert first["job_type"] == "search" and first["group"] == ""
    assert {"mine", "mode:search", "context:search"} <= set(first["tags"])
    # step is the x axis; the summaries are the best values in each metric's direction
    assert second["metrics"]["val/semseg/mIoU"] == {"max"}
    assert second["metrics"]["val/depth/rmse"] == {"min"}
    assert second["metrics"]["val/normals/mean_angle"] == {"min"}
    # the genotype and the final checkpoint's weights are artifacts of the run
    run_id = first["id"]
    assert {(f"genotype-{run_id}", "genotype"), (f"model-{run_id}", "model")} <= set(second["artifacts"])


def test_no_model_artifact_when_opted_out(tiny_data_dir, tmp_path):
    from atrc_exp.engine import fit

    over = {"logger": "wandb", "logger.mode": "offline", "logger.log_checkpoints": "false"}
    over.update({"trainer.max_steps": 2, "trainer.checkpoint_interval": 2, "logger.group": "g1"})
    fit(compose_cfg(tiny_overrides(tiny_data_dir, **over)), tmp_path)
    (run,) = offline_runs(tmp_path / "wandb")
    assert not [a for a in run["artifacts"] if a[1] == "model"]
    assert run["group"] == "g1" and run["job_type"] == "distill"


def test_a_pipelines_stages_share_a_group_with_their_job_types(tiny_data_dir, tmp_path):
    job = tmp_path / "job"
    cfg = compose_cfg(tiny_overrides(tiny_data_dir, mode="pipeline", logger="wandb"))
    stages = stage_configs(cfg, ["mode=pipeline", "logger=wandb"], job)
    assert {s: c.logger.job_type for s, c in stages.items()} == {
        "search": "search",
        "distill": "distill",
        "baseline": "baseline",
    }
    assert {c.logger.group for c in stages.values()} == {f"{cfg.run_name}/job"}
