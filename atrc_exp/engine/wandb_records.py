"""Read back what W&B recorded offline: the records of ``offline-run-*/run-<id>.wandb`` (W&B's
record log, online runs keep one too: a ``:W&B`` header, then LevelDB-log framed protobuf
``Record`` messages; a log cut short by a kill ends at its last whole record). The W&B logger
reads the last step a killed run recorded; ``tests/wandb_runs.py`` reads back a whole run."""

from __future__ import annotations

import json
import struct
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
