"""What ``atrc-train`` returns to a Hydra sweeper (Optuna, Ax, Nevergrad): ``objective``.

``objective: null`` — the first task's main metric (``semseg/mIoU`` on NYUD-v2); a metric key
(``depth/rmse``); a list of them (a multi-objective sweep gets one value each); or ``delta_m`` —
Δm in percent (``atrc-report``'s definition: the mean over the tasks of the signed relative
change of each main metric) against the single-task ``context=none`` runs of the same dataset
and backbone found under ``objective_baselines`` (run folders or a sweep folder). The sweeper's
direction is the user's to set (``hydra.sweeper.direction``): maximise mIoU and Δm, minimise
RMSE and angles.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, ListConfig

from ..errors import ConfigError

DELTA_M = "delta_m"


class Objective:
    """The configured objective of a run, checked when built (before training): every key one of
    the run's metrics, and for ``delta_m`` a single-task baseline of every task."""

    def __init__(self, cfg: DictConfig, tasks: list):
        value = cfg.objective
        self.keys = list(value) if isinstance(value, ListConfig | list) else [value or tasks[0].main_metric]
        self.single = not isinstance(value, ListConfig | list)
        known = [k for t in tasks for k in t.metric_directions()]
        for key in self.keys:
            if key != DELTA_M and key not in known:
                raise ConfigError(
                    f"objective={key}: not a metric of this run; choose one of {', '.join(known)} "
                    f"or {DELTA_M} (with objective_baselines=<single-task run or sweep folders>)"
                )
        self.tasks = [t.name for t in tasks]
        self.baselines = self._baselines(cfg) if DELTA_M in self.keys else None

    def _baselines(self, cfg: DictConfig) -> dict[str, float]:
        from .report import Row, build_rows, find_runs, load_run, single_task_baselines

        paths = cfg.objective_baselines
        paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
        if not paths:
            raise ConfigError(
                "objective=delta_m needs the single-task baselines: objective_baselines=<run or sweep folder>"
            )
        try:
            rows = build_rows([load_run(p) for p in find_runs(paths)])
        except FileNotFoundError as e:
            raise ConfigError(f"objective_baselines: {e}") from None
        backbone = str(cfg.backbone._target_).rsplit(".", 1)[-1]
        ours = Row(str(cfg.dataset.name), backbone, tuple(self.tasks), str(cfg.context.name), "", "")
        base, _ = single_task_baselines(rows, ours)
        missing = [t for t in self.tasks if not any(k.startswith(f"{t}/") for k in base)]
        if missing:
            raise ConfigError(
                f"objective=delta_m: no single-task context=none run of {', '.join(missing)} "
                f"(dataset={ours.dataset}, backbone={backbone}) under {', '.join(map(str, paths))}"
            )
        return base

    def value(self, metrics: Mapping[str, float]) -> float | list[float]:
        """The objective's value(s) from a run's final validation ``metrics``."""
        from .report import delta_m

        values = [
            delta_m(metrics, self.baselines, self.tasks) if k == DELTA_M else float(metrics[k])
            for k in self.keys
        ]
        return values[0] if self.single else values
