"""Experiment loggers, built from ``logger._target_`` as ``cls(cfg, run_dir, **keys)`` on the main
process (:class:`NullLogger` elsewhere), with the methods of :class:`NullLogger`; ``finish(exit_code)``
closes one, also when the run fails."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..config import instantiate
from .wandb_records import last_step

log = logging.getLogger(__name__)


class NullLogger:
    """Logs nothing remotely (``metrics.json`` and the log file are written by the engine)."""

    wants_images = False

    def __init__(self, cfg: DictConfig | None = None, run_dir: Path | None = None): ...

    def log(self, data: dict[str, float], step: int) -> None: ...

    def log_images(self, panels: dict[str, np.ndarray], step: int) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


#: The W&B run of a run folder: its id (a resumed run continues it).
WANDB_RUN_FILE = "wandb_run.json"


def sweep_group() -> str | None:
    """In a Hydra ``--multirun``, the sweep folder's name (its jobs' W&B group); else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


class WandbLogger:
    """Weights & Biases (README, "W&B"): group ``logger.group`` or the sweep's,
    ``job_type`` ``logger.job_type`` or the mode, tags ``logger.tags`` + ``mode:<m>``,
    ``context:<c>``; one W&B run per run folder (its id in ``wandb_run.json``), which a resumed
    training continues with every step logged once; ``step`` the x axis, each validation metric's
    summary its best value; the genotype and the final weights as artifacts when the run ends well."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        log_images: bool,
        num_images: int,
        log_checkpoints: bool,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        **init,
    ):
        """``init``: further arguments of ``wandb.init`` (``project``, ``entity``, ``mode``, ...)."""
        import wandb

        from ..config import config_tasks

        self._wandb = wandb
        self.run_dir = run_dir
        state_file = run_dir / WANDB_RUN_FILE
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        resumed = state is not None and cfg.trainer.resume is not None
        self.state = state if resumed else {"id": uuid.uuid4().hex[:12]}
        # steps up to here are in the W&B run already (what its local record logs hold)
        self.logged_before = last_step(run_dir / "wandb", self.state["id"]) if resumed else -1
        self.run = wandb.init(
            **init,
            id=self.state["id"],
            resume="allow" if resumed else None,
            group=group or sweep_group(),
            job_type=job_type or cfg.mode.name,
            tags=[*tags, f"mode:{cfg.mode.name}", f"context:{cfg.context.name}"],
            name=f"{cfg.run_name}/{run_dir.name}",
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )
        (run_dir / WANDB_RUN_FILE).write_text(json.dumps(self.state) + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        for task in config_tasks(cfg):
            for key, higher in task.metric_directions().items():
                self.run.define_metric(f"val/{key}", step_metric="step", summary="max" if higher else "min")
        self.wants_images, self.log_checkpoints = log_images, log_checkpoints
        how = "new"
        if resumed:
            recorded, self.logged_before = self.logged_before, self._catch_up()
            how = f"resumed: steps up to {recorded} recorded, up to {self.logged_before} from the run's logs"
        log.info("W&B run %s (%s, %s) in %s", self.run.id, self.run.settings.mode, how, self.run.dir)

    def _catch_up(self) -> int:
        """Log the steps of the run's ``train_log.jsonl`` and ``metrics_history.jsonl`` that W&B
        did not record; returns the last step now logged."""
        rows: dict[int, dict] = {}
        for name, prefix in (("train_log.jsonl", ""), ("metrics_history.jsonl", "val/")):
            path = self.run_dir / name
            for line in path.read_text().splitlines() if path.is_file() else []:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by the kill
                    continue
                data = row.get("metrics", row)
                rows.setdefault(row["step"], {}).update(
                    {prefix + k: v for k, v in data.items() if k != "step"}
                )
        for step in sorted(rows):
            self.log(rows[step], step)
        return max([self.logged_before, *rows])

    def log(self, data: dict, step: int) -> None:
        """``data`` at ``step``, unless this W&B run logged that step before it was resumed."""
        if step > self.logged_before:
            self.run.log({**data, "step": step}, step=step)

    def log_images(self, panels: dict[str, np.ndarray], step: int) -> None:
        caption = "image | ground truth | prediction"
        self.log({f"val_images/{k}": self._wandb.Image(v, caption=caption) for k, v in panels.items()}, step)

    def log_genotype(self, genotype: dict, tasks: list[str], step: int) -> None:
        """The genotype as a T×T heatmap image (target rows, source columns) and a table."""
        from ..models.genotype import GENOTYPE_TABLE_COLUMNS, genotype_heatmap, genotype_table_rows

        table = self._wandb.Table(list(GENOTYPE_TABLE_COLUMNS), genotype_table_rows(genotype, tasks))
        image = self._wandb.Image(genotype_heatmap(genotype, tasks), caption="target rows, source columns")
        self.log({"genotype/heatmap": image, "genotype/table": table}, step)

    def _log_artifacts(self) -> None:
        """The genotype of a search and the final checkpoint's model weights, as W&B artifacts."""
        from ..models.genotype import GENOTYPE_FILENAME
        from .checkpoint import list_checkpoints

        genotype = self.run_dir / GENOTYPE_FILENAME
        files = [("genotype", [genotype])] if genotype.is_file() else []
        ckpts = list_checkpoints(self.run_dir / "checkpoints") if self.log_checkpoints else []
        if ckpts:
            weights = [
                p for p in sorted(ckpts[-1].iterdir()) if p.name.startswith(("model", "pytorch_model"))
            ]
            files.append(("model", weights))
        for kind, paths in files:
            artifact = self._wandb.Artifact(f"{kind}-{self.run.id}", type=kind)
            for path in paths:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        if exit_code == 0:
            self._log_artifacts()
        self.run.finish(exit_code=exit_code)


def build_logger(cfg: DictConfig, run_dir: Path, is_main: bool) -> Any:
    """The configured logger (``logger._target_``) on the main process, :class:`NullLogger` elsewhere."""
    return instantiate(cfg, "logger", _partial_=True)(cfg, run_dir) if is_main else NullLogger()
