"""``atrc-train``: the one Hydra entry point (also ``python -m atrc_exp.train``).

atrc-train                                   # defaults: synthetic data, HRNet18, multi-task FCN
atrc-train tasks=semseg                      # single-task baseline
atrc-train --multirun tasks=semseg,depth     # one run dir per job, each with metrics.json
atrc-train --help                            # config groups and options
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import CONF_DIR, ConfigError, register_resolvers

register_resolvers()
log = logging.getLogger("atrc_exp")

#: Errors caused by the user's input: one line with a hint, no traceback (HYDRA_FULL_ERROR=1 shows it).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def format_metrics_table(metrics: dict[str, float], title: str = "final validation metrics") -> str:
    """A plain-text two-column table of ``metrics``."""
    width = max([len(k) for k in metrics] + [6])
    lines = [title, "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one job; returns the first validation metric (for Hydra sweepers)."""
    from .data import DataError
    from .engine import fit

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = fit(cfg, run_dir)
    except (*USER_ERRORS, DataError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(e).__name__, e)
        print(f"error: {e}\n(run dir: {run_dir}; set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    if _is_main_rank():
        print(format_metrics_table(metrics, f"final validation metrics ({cfg.run_name}, {run_dir})"))
    return next(iter(metrics.values()), None)


if __name__ == "__main__":
    main()
