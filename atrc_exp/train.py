"""``atrc-train``: the one Hydra entry point (also ``python -m atrc_exp.train``), and its alias
``atrc-pipeline`` (:func:`pipeline_main`).

atrc-train                                   # defaults: synthetic data, HRNet18, multi-task FCN
atrc-train tasks=semseg                      # single-task baseline
atrc-train --multirun tasks=semseg,depth     # one run dir per job, each with metrics.json
atrc-train mode=pipeline                     # ATRC: search, distillation, baseline (atrc_exp.pipeline)
atrc-train --help                            # config groups and options
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import CONF_DIR, ConfigError, config_tasks, is_main_rank, user_error, validate_config

log = logging.getLogger("atrc_exp")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (data, config, weights), not a bug: one line with a
    hint, no traceback (``HYDRA_FULL_ERROR=1`` shows it)."""
    from .data import DataError
    from .engine.faults import NonFiniteError
    from .models.state_dict import WeightsError

    return (ConfigError, FileNotFoundError, DataError, WeightsError, NonFiniteError)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; an error re-raised from a DataLoader worker loses the
    worker's traceback and keeps its last line."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        msg = rest if sep and head.endswith(type(e).__name__) else last
    return " ".join(msg.split("\n")).strip()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | list[float] | None:
    """Run one job (``mode=pipeline``: :func:`atrc_exp.pipeline.run_pipeline`); returns the value
    of ``objective`` (for Hydra sweepers, :mod:`atrc_exp.evaluation.objective`)."""
    from .engine import fit
    from .engine.faults import Preempted
    from .evaluation.objective import Objective
    from .hydra_callbacks import FAILED_MARKER
    from .metrics import format_metrics_table
    from .pipeline import run_pipeline

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    sweeping = hc.mode == RunMode.MULTIRUN
    pipeline = cfg.mode.name == "pipeline"
    try:
        validate_config(cfg)  # every value in its range before anything starts
        objective = Objective(cfg, config_tasks(cfg))  # its metrics known, its baselines found
        if pipeline:
            metrics = run_pipeline(cfg, run_dir, list(hc.overrides.task), hc.job.config_name)
        else:
            metrics = fit(cfg, run_dir)
    except Preempted as e:
        log.warning("%s", e)
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as raised:
        e = user_error(raised)  # a config interpolation's own error (a folder dataset's YAML)
        known = isinstance(e, user_errors())
        if sweeping and cfg.continue_on_failure:
            # record it and let the sweep go on; the end-of-sweep callback reports and exits non-zero
            log.error("job failed: %s", one_line(e), exc_info=not known)
            if is_main_rank():
                marker = {"error": f"{type(e).__name__}: {one_line(e)}", "overrides": list(hc.overrides.task)}
                (Path(run_dir) / FAILED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
                print(f"error: {one_line(e)} (job {hc.job.num}, run dir {run_dir})", file=sys.stderr)
            return None
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (known or sweeping):
            raise raised
        if not known:  # a bug, in a sweep that must stop here: the traceback goes to the job's log
            log.exception("job failed")
        log.error("%s: %s", type(e).__name__, one_line(e))
        hint = f"\n(run dir: {run_dir}; set HYDRA_FULL_ERROR=1 for the traceback)"
        print(f"error: {one_line(e)}{'' if isinstance(e, ConfigError) else hint}", file=sys.stderr)
        sys.exit(2)
    if is_main_rank() and not pipeline:  # the pipeline printed its tables
        print(format_metrics_table(metrics, f"final validation metrics ({cfg.run_name}, {run_dir})"))
    return objective.value(metrics)


_FLAGS = {"--search-steps": "mode.search_steps", "--distill-steps": "mode.distill_steps", "--out": None}


def _quote(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def translate_args(argv: list[str]) -> list[str]:
    """``atrc-pipeline``'s command line as ``atrc-train``'s: ``mode=pipeline`` first, then
    ``--search-steps N`` → ``mode.search_steps=N``, ``--distill-steps N`` → ``mode.distill_steps=N``,
    ``--no-baseline`` → ``mode.baseline=false``, ``--out DIR`` → ``hydra.run.dir=DIR``
    (``hydra.sweep.dir`` with ``--multirun``), everything else unchanged. Raises
    :class:`ConfigError` for a flag without its value or another ``mode``."""
    multirun = any(a in ("--multirun", "-m") for a in argv)
    out, i = ["mode=pipeline"], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in _FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"atrc-pipeline: {name} needs a value, e.g. {name} 100")
                i += 1
                value = argv[i]
            if name == "--out":
                out.append(f"hydra.{'sweep' if multirun else 'run'}.dir={_quote(value)}")
            else:
                out.append(f"{_FLAGS[name]}={value}")
        elif a == "--no-baseline":
            out.append("mode.baseline=false")
        elif name == "mode":
            if value != "pipeline":
                raise ConfigError(
                    f"atrc-pipeline runs mode=pipeline; for mode={value} use atrc-train mode={value}"
                )
        else:
            out.append(a)
        i += 1
    return out


def pipeline_main(argv: list[str] | None = None) -> int:
    """``atrc-pipeline``: ``atrc-train mode=pipeline`` with the old flags translated."""
    try:
        args = translate_args(sys.argv[1:] if argv is None else list(argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *args]
    main()
    return 0


if __name__ == "__main__":
    main()
