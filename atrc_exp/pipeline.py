"""The ATRC pipeline as one Hydra job, ``atrc-train mode=pipeline`` (README, "Usage"): search →
``<run dir>/search``, distillation (``context=atrc``, the search's genotype) → ``<run dir>/distill``,
the multi-task baseline (``context=none``, if ``mode.baseline``) → ``<run dir>/baseline``. The job's
``metrics.json`` is the distillation's; it prints the genotype and ATRC's metrics next to the baseline's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from .config import compose, is_main_rank, rank_suffix, validate_config

log = logging.getLogger("atrc_exp")

#: The stages of a pipeline job, in order; each is a sub-folder of the job's run dir.
STAGES = ("search", "distill", "baseline")


def shared_overrides(overrides: list[str]) -> list[str]:
    """``overrides`` without those of ``mode``/``context`` and their keys (the stages set those)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        text
        for text, o in zip(overrides, parsed, strict=True)
        if o.key_or_group.split(".", 1)[0] not in ("mode", "context")
    ]


def stage_configs(
    cfg: DictConfig, overrides: list[str], run_dir: str | Path, config_name: str = "train"
) -> dict[str, DictConfig]:
    """The composed config of each stage of the pipeline job ``cfg`` whose command-line overrides
    were ``overrides``, by stage name (:data:`STAGES` order; ``baseline`` only if ``mode.baseline``);
    each stage's ``max_steps`` and ``val_interval`` (one validation, at the end) from
    ``mode.search_steps`` / ``mode.distill_steps``. Raises :class:`ConfigError` for a config that
    cannot run."""
    from .engine.loggers import sweep_group

    validate_config(cfg)
    pm, run_dir = cfg.mode, Path(run_dir)
    base = shared_overrides(overrides)
    groups = {"search": ["mode=search", "context=search"], "distill": ["mode=distill", "context=atrc"]}
    if bool(pm.baseline):
        groups["baseline"] = ["mode=distill", "context=none"]
    stages = {}
    # the stages' W&B group: <logger.group, else the sweep's, else run_name>/<job folder>
    group = f"{cfg.logger.get('group') or sweep_group() or cfg.run_name}/{run_dir.name}"
    for stage, extra in groups.items():
        s = compose([*base, *extra], config_name)
        steps = pm.search_steps if stage == "search" else pm.distill_steps
        with open_dict(s):
            if stage == "search":  # the search settings as given under mode.search
                s.mode = OmegaConf.merge(s.mode, pm.search)
                s.mode.name = "search"
            if stage == "distill":
                s.context.genotype = str(run_dir / "search")
            if steps is not None:
                s.trainer.max_steps = int(steps)
                s.trainer.val_interval = int(steps)
            if "job_type" in s.logger:  # a logger with W&B's run groups
                s.logger.group, s.logger.job_type = group, stage
        validate_config(s)
        stages[stage] = s
    return stages


def genotype_table(genotype: dict, tasks: list[str]) -> str:
    """The genotype as text: target rows, source columns, context names in the cells."""
    from .models.context_blocks import context_spec

    w = max(len(t) for t in tasks + ["target \\ source"]) + 2
    lines = ["target \\ source".ljust(w) + "".join(s.ljust(w) for s in tasks)]
    for t in tasks:
        lines.append(t.ljust(w) + "".join(context_spec(genotype[t][s]).display.ljust(w) for s in tasks))
    return "\n".join(lines)


def comparison_table(atrc: dict[str, float], baseline: dict[str, float]) -> str:
    """Metrics of ATRC and the baseline side by side."""
    keys = [k for k in atrc if k in baseline]
    w = max(len(k) for k in keys) + 2
    lines = [f"{'metric'.ljust(w)}{'ATRC':>12}{'MT baseline':>14}", "-" * (w + 26)]
    lines += [f"{k.ljust(w)}{atrc[k]:>12.4f}{baseline[k]:>14.4f}" for k in keys]
    return "\n".join(lines)


def _run_stage(stage: str, cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """``fit`` one stage in ``run_dir``, its log lines also in ``run_dir/train.log``."""
    from .engine import fit

    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / f"train{rank_suffix()}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        log.info("pipeline stage %s: %s", stage, run_dir)
        if is_main_rank():
            print(f"\n=== {stage}: {run_dir}", flush=True)
        return fit(cfg, run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def run_pipeline(
    cfg: DictConfig, run_dir: str | Path, overrides: list[str], config_name: str = "train"
) -> dict[str, float]:
    """Run the pipeline job ``cfg`` (composed from ``overrides``) in ``run_dir``; returns the
    distillation's metrics."""
    from .engine.checkpoint import write_json_atomic
    from .metrics import format_metrics_table
    from .models.genotype import load_genotype

    run_dir = Path(run_dir)
    stages = stage_configs(cfg, overrides, run_dir, config_name)
    if cfg.context.genotype is not None:
        msg = "mode=pipeline distils with the genotype its search finds; context.genotype=%s ignored"
        log.warning(msg, cfg.context.genotype)
    results = {stage: _run_stage(stage, s, run_dir / stage) for stage, s in stages.items()}
    atrc, baseline = results["distill"], results.get("baseline")
    if is_main_rank():
        distilled = json.loads((run_dir / "distill" / "metrics.json").read_text())
        write_json_atomic(run_dir / "metrics.json", distilled)
        tasks = list(cfg.tasks.names)
        print("\ngenotype found by the search (target rows, source columns):")
        print(genotype_table(load_genotype(run_dir / "search", tasks), tasks))
        table = (
            comparison_table(atrc, baseline) if baseline else format_metrics_table(atrc, "ATRC final metrics")
        )
        print(f"\n{table}\n\nruns: {run_dir}", flush=True)
    return atrc
