"""Checkpoints in ``<run_dir>/checkpoints/step_<N>/`` (Accelerate ``save_state`` + ``meta.json``).

A checkpoint is valid only when its ``meta.json`` exists: the state is written to a temporary
folder first, ``meta.json`` last, then the folder is renamed, so a killed write never leaves a
checkpoint that looks valid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..files import write_atomic
from ..models.state_dict import truncated, truncated_error

META = "meta.json"


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Valid checkpoints under ``ckpt_root``, oldest first."""
    found = [p for p in ckpt_root.glob("step_*") if (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """Map ``trainer.resume`` to a checkpoint folder (or ``None`` for a fresh start).

    ``auto``: newest valid checkpoint of ``run_dir`` (fresh start when there is none);
    a run dir: its newest checkpoint; a checkpoint folder: itself.
    """
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        ckpts = list_checkpoints(run_dir / "checkpoints")
        return ckpts[-1] if ckpts else None
    path = Path(str(resume)).expanduser()
    if (path / META).is_file():
        return path
    for root in (path / "checkpoints", path):
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1]
    raise FileNotFoundError(
        f"trainer.resume={resume}: no valid checkpoint there (expected <run_dir>/checkpoints/step_N/{META})"
    )


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, step: int, keep: int, extra: dict | None = None
) -> Path:
    """Save the full training state at ``step`` (call on every process); keep the newest ``keep``."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / META, {"step": step, **(extra or {})})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, ckpt: Path) -> dict:
    """Restore the state saved by :func:`save_checkpoint`; returns its ``meta.json``. A truncated
    file in it is a one-line :class:`~atrc_exp.models.state_dict.WeightsError` naming it."""
    try:
        accelerator.load_state(str(ckpt))
    except Exception:
        bad = [p for p in sorted(Path(ckpt).iterdir()) if p.is_file() and truncated(p)]
        if bad:
            raise truncated_error(bad[0]) from None
        raise
    return json.loads((ckpt / META).read_text())


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
    for path in (Path(run_dir) / "train_log.jsonl", Path(run_dir) / "metrics_history.jsonl"):
        if path.is_file():
            lines = path.read_text().splitlines()
            write_atomic(path, "".join(x + "\n" for x in lines if x and json.loads(x).get("step", 0) <= step))
