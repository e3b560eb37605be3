"""Read back what W&B recorded offline: the records of ``offline-run-*/run-<id>.wandb`` (W&B's
record log: a ``:W&B`` header, then LevelDB-log framed protobuf ``Record`` messages)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768  # LevelDB log blocks; a record header is 7 bytes: crc32, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    """The ``Record`` messages of one ``.wandb`` file, in order."""
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
        pos += 7 + length
        parts = chunk if kind in (_FULL, _FIRST) else parts + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def offline_runs(wandb_dir: Path, timeout: float = 60.0) -> list[dict]:
    """Every offline run under ``wandb_dir`` (oldest first) as ``{"id", "group", "job_type",
    "tags", "resumed", "history": [{key: value}], "metrics": {name: summary kinds},
    "artifacts": [name], "files": Path}``; waits (up to ``timeout`` s) for each run's exit record,
    which W&B's service writes after ``finish`` returns."""
    runs = []
    for folder in sorted(Path(wandb_dir).glob("offline-run-*")):
        deadline = time.monotonic() + timeout
        while True:
            recs = list(records(next(folder.glob("run-*.wandb"))))
            if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
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
