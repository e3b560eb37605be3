"""Read back what W&B recorded offline: the records of ``offline-run-*/run-<id>.wandb`` (W&B's
record log, online runs keep one too: a ``:W&B`` header, then LevelDB-log framed protobuf
``Record`` messages; a log cut short by a kill ends at its last whole record). The W&B logger
reads the last step a killed run recorded; tests read back what a run recorded."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

_BLOCK = 32768  # LevelDB log blocks; a record header is 7 bytes: crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    """The ``Record`` messages of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B record log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # the rest of a block is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:  # cut short
            return
        pos += 7 + length
        parts = chunk if kind in (_FULL, _FIRST) else parts + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(parts)
            except Exception:  # noqa: BLE001 - a damaged tail
                return
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def last_step(wandb_dir: Path, run_id: str) -> int:
    """The last ``step`` the local record logs of W&B run ``run_id`` under ``wandb_dir`` hold
    (online and offline runs write one; -1: none)."""
    steps = [-1]
    for path in Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb"):
        for r in records(path):
            if r.WhichOneof("record_type") == "history":
                steps += [int(json.loads(i.value_json)) for i in r.history.item if _key(i) == "step"]
    return max(steps)


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
