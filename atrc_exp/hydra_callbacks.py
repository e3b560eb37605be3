"""Hydra callbacks of ``atrc-train`` (registered in ``conf/hydra/default.yaml``)."""

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
    """Before a run or sweep: the output folder must be writable. After a sweep: a summary of the
    failed jobs (their ``FAILED.json``, written with ``continue_on_failure=true``), exit 1 if any."""

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
        jobs = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
        lines = [f"sweep {sweep}: {len(failed)} of {len(jobs)} job(s) failed"]
        for marker in failed:
            info = json.loads(marker.read_text())
            lines.append(
                f"  job {marker.parent.name} ({' '.join(info.get('overrides', []))}): {info['error']}"
            )
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)
