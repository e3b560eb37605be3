"""Hydra callbacks of ``atrc-train`` (registered in ``conf/hydra/default.yaml``).

* Before a run or a sweep starts: the output folder must be writable (one-line error otherwise).
* After a sweep: a summary of failed jobs (``FAILED.json`` in their run dirs, written by
  :func:`atrc_exp.train.main` when ``continue_on_failure=true``), and a non-zero exit if any failed.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import is_main_rank

FAILED_MARKER = "FAILED.json"


def check_writable(folder: str | Path, what: str) -> None:
    """Create ``folder`` and a file in it, or exit with a one-line error saying what to change."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(
            f"error: cannot write the {what} {folder} ({e.strerror or e}); choose a writable folder "
            f"with paths.log_dir=/path (or hydra.run.dir / hydra.sweep.dir)",
            file=sys.stderr,
        )
        sys.exit(2)


class RunGuards(Callback):
    """Output-folder checks and the end-of-sweep failure report."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(OmegaConf.select(config, "hydra.run.dir"), "run directory")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(OmegaConf.select(config, "hydra.sweep.dir"), "sweep directory")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_rank():
            return
        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        failed = sorted(sweep.glob(f"*/{FAILED_MARKER}"), key=lambda p: p.parent.name)
        if not failed:
            return
        jobs = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()] if sweep.is_dir() else []
        lines = [f"sweep {sweep}: {len(failed)} of {len(jobs)} job(s) failed"]
        for marker in failed:
            info = json.loads(marker.read_text())
            lines.append(
                f"  job {marker.parent.name} ({' '.join(info.get('overrides', []))}): {info['error']}"
            )
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)
