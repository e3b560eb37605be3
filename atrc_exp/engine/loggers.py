"""Experiment loggers: ``logger=none`` (nothing remote) and ``logger=wandb``.

A logger is built from ``logger._target_``: called with its group's keys, then the run's config and
folder (``cls(cfg, run_dir, **keys)``); it has ``log``, ``log_images`` and ``finish`` as
:class:`NullLogger`. Only the main process creates the configured logger; other ranks get
:class:`NullLogger`. Every logger is closed by ``finish(exit_code)``, also when the run fails.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..config import instantiate

log = logging.getLogger(__name__)


class NullLogger:
    """Logs nothing remotely (``metrics.json`` and the log file are written by the engine)."""

    wants_images = False

    def __init__(self, cfg: DictConfig | None = None, run_dir: Path | None = None):
        pass

    def log(self, data: dict[str, float], step: int) -> None:
        pass

    def log_images(self, panels: dict[str, np.ndarray], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    """Weights & Biases: resolved config, losses, lr, metrics and image panels per task."""

    def __init__(self, cfg: DictConfig, run_dir: Path, log_images: bool, num_images: int, **init):
        """``init``: arguments of ``wandb.init`` (``project``, ``entity``, ``group``, ``tags``, ``mode``)."""
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            **init,
            name=f"{cfg.run_name}/{run_dir.name}",
            dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="finish_previous",
        )
        self.wants_images = log_images
        self.num_images = num_images
        log.info("W&B run %s (%s) in %s", self.run.id, self.run.settings.mode, self.run.dir)

    def log(self, data: dict[str, float], step: int) -> None:
        self.run.log(dict(data), step=step)

    def log_images(self, panels: dict[str, np.ndarray], step: int) -> None:
        images = {
            f"val_images/{k}": self._wandb.Image(v, caption="image | ground truth | prediction")
            for k, v in panels.items()
        }
        self.run.log(images, step=step)

    def log_genotype(self, genotype: dict, tasks: list[str], step: int) -> None:
        """The genotype as a T×T heatmap image (target rows, source columns) and a table."""
        from ..models.genotype import GENOTYPE_TABLE_COLUMNS, genotype_heatmap, genotype_table_rows

        table = self._wandb.Table(
            columns=list(GENOTYPE_TABLE_COLUMNS), data=genotype_table_rows(genotype, tasks)
        )
        image = self._wandb.Image(genotype_heatmap(genotype, tasks), caption="target rows, source columns")
        self.run.log({"genotype/heatmap": image, "genotype/table": table}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(cfg: DictConfig, run_dir: Path, is_main: bool) -> Any:
    """The configured logger (``logger._target_``) on the main process, :class:`NullLogger` elsewhere."""
    return instantiate(cfg, "logger", _partial_=True)(cfg, run_dir) if is_main else NullLogger()
