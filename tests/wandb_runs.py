"""What W&B recorded offline, read back from its record log (for the W&B tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from atrc_exp.engine.wandb_records import _key, records


def offline_runs(wandb_dir: Path, timeout: float = 60.0) -> list[dict]:
    """Every offline run under ``wandb_dir`` (oldest first) as ``{"id", "group", "job_type",
    "tags", "resumed", "history": [{key: value}], "metrics": {name: summary kinds},
    "artifacts": [(name, type)], "files": Path, "exit": bool}``; waits (up to ``timeout`` s) for
    each run's exit record, which W&B's service writes after ``finish`` returns (a killed run's
    log has none: it is read once it stops growing)."""
    runs = []
    for folder in sorted(Path(wandb_dir).glob("offline-run-*")):
        log = next(folder.glob("run-*.wandb"))
        deadline, size, still = time.monotonic() + timeout, -1, 0
        while True:  # until the exit record, or a log that stopped growing (a killed run's)
            recs = list(records(log))
            if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
                break
            still = still + 1 if log.stat().st_size == size else 0
            if still >= 10:
                break
            size = log.stat().st_size
            time.sleep(0.3)
        run = {"history": [], "metrics": {}, "artifacts": [], "files": folder / "files", "exit": False}
        for r in recs:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    id=r.run.run_id,
                    group=r.run.run_group,
                    job_type=r.run.job_type,
                    tags=list(r.run.tags),
                    resumed=r.run.resume,
                )
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in r.history.item}
                run["history"].append(row)
            elif kind == "metric" and r.metric.name:
                s = r.metric.summary
                run["metrics"][r.metric.name] = {k for k in ("max", "min", "last") if getattr(s, k)}
            elif kind == "artifact":
                run["artifacts"].append((r.artifact.name, r.artifact.type))
            elif kind == "exit":
                run["exit"] = True
        runs.append(run)
    return runs
