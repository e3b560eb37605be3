"""Reading weights files safely (one-line errors) and strict state-dict loading with errors that name
the offending keys."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Buffers a checkpoint may lack (the model keeps its own value): BatchNorm counters absent from
#: pre-0.4.1 files.
OPTIONAL_BUFFERS = ("num_batches_tracked",)
#: A search block's frozen choice (:class:`~atrc_exp.models.search_block.SearchCPBlock`): present
#: exactly for the pairs frozen when the state dict was saved, on either side; the checkpoint decides.
FREEZE_BUFFER = "fixed_weights"


def _freeze_state(key: str, keys) -> bool:
    """``key`` is the frozen choice of a search block that ``keys`` (a model's state dict) has."""
    return key.endswith("." + FREEZE_BUFFER) and key[: -len(FREEZE_BUFFER)] + "arch_param" in keys


def strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any of ``prefixes`` from the front of ``key``, repeatedly (``module.backbone.x`` → ``x``)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def format_keys(keys: list[str], limit: int = 5) -> str:
    """``a, b, c (+N more)``: the first ``limit`` keys of a list."""
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


class WeightsError(ValueError):
    """A weights file that does not fit the model (wrong keys or shapes, not a state dict, not a checkpoint,
    unsafe to unpickle) or cannot be fetched. Its message is one line."""


#: torch's weights-only unpickler naming a global it refuses (or a blocked module).
_UNSAFE_GLOBAL = re.compile(
    r"GLOBAL (\S+) was not an allowed global|GLOBAL (\S+) whose module \S+ is blocked"
)
#: ... or refusing an operation on an allowed object (in a file that is a real ``torch.save`` archive).
_UNSAFE_OP = re.compile(r"(Trying to call reduce for unrecognized function|Can only \w+ [^\n]*)")


def _short(e: BaseException, limit: int = 160) -> str:
    """``e`` as a short one-line reason."""
    msg = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", msg, re.S)
    if m:
        msg = m.group(1)
    msg = " ".join(msg.split())
    if isinstance(e, KeyError | EOFError) or not msg:
        msg = f"{type(e).__name__}{': ' + msg if msg else ''}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not just a character cut at the end of the 512 bytes
            return False
        text = head[: e.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c.isspace() for c in text)


def _is_torch_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unsafe_globals(path: Path, err: BaseException) -> list[str]:
    """The globals that kept ``path`` from loading with ``weights_only=True`` (empty: it is no checkpoint)."""
    # torch's messages drop the "builtins." of builtins; its scanner keeps it
    found = [
        n if "." in n else f"builtins.{n}" for a, b in _UNSAFE_GLOBAL.findall(str(err)) for n in [a or b]
    ]
    if _is_torch_zip(path):
        try:  # every offending name, not only the first (needs the caller's safe_globals still active)
            found = sorted(set(found) | set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))))
        except Exception:  # noqa: BLE001 - best effort: the names from the error message stay
            pass
        if not found:
            op = _UNSAFE_OP.search(str(err))
            if op:
                found = [f"an object the weights-only unpickler refuses ({op.group(1).strip()})"]
    return found


def read_checkpoint(
    path: str | os.PathLike,
    expected: str,
    weights_only: bool = True,
    safe_globals: Sequence[Any] = (),
    trust_hint: str = "",
) -> Any:
    """Read a weights file (``torch.save`` output, or ``.safetensors``) on the CPU, safely by default.

    Args:
        path: the file (must exist).
        expected: what the file should be, for the error message (e.g. ``"backbone weights saved with
            torch.save or .safetensors"``).
        weights_only: ``True``: ``torch.load(weights_only=True)``, which never runs code from the file;
            ``False``: a full unpickle (can run arbitrary code: only for trusted files; logs a warning).
        safe_globals: extra globals allowed while loading (``torch.serialization.safe_globals`` items:
            harmless classes or ``(stand_in, "module.qualname")`` pairs).
        trust_hint: appended to the refusal message (how the caller opts in to a full unpickle).

    Raises:
        WeightsError (one line, naming the file): an empty file, a file that is no checkpoint (JSON,
        random bytes, ...) and what was expected, or a checkpoint that needs a full unpickle (naming the
        globals it references).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file, not a checkpoint (expected {expected})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means: not a safetensors file
            raise WeightsError(f"{path}: not a safetensors file ({_short(e)}); expected {expected}") from None
    if not weights_only:
        log.warning("%s: full unpickle (weights_only=False): only do this for files you trust", path)
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            return torch.load(path, map_location="cpu", weights_only=bool(weights_only))
        except Exception as e:  # noqa: BLE001 - classified below, re-raised as one line
            unsafe = _unsafe_globals(path, e) if weights_only else []
            err = e
    if unsafe:
        raise WeightsError(
            f"{path}: refusing to load it: it references {', '.join(unsafe)}, which only a full unpickle "
            f"can build, and a full unpickle can run arbitrary code{trust_hint}"
        ) from None
    what = "it is a text file" if _looks_like_text(path) else f"torch.load: {_short(err)}"
    raise WeightsError(f"{path}: not a PyTorch checkpoint ({what}); expected {expected}") from None


def load_strict(
    model: nn.Module, state: MutableMapping[str, torch.Tensor], what: str, hint: str = "", limit: int = 5
) -> int:
    """Load ``state`` into ``model`` strictly; returns how many ``num_batches_tracked`` were missing.

    Missing :data:`OPTIONAL_BUFFERS` keep the model's values; any other missing or unexpected key or shape mismatch raises :class:`WeightsError`
    ``"cannot load {what} into <Model>: ...{hint}"`` listing up to ``limit`` keys of each kind.
    """
    own = model.state_dict()
    unexpected = [k for k in state if k not in own and not _freeze_state(k, own)]
    missing = [k for k in own if k not in state and not _freeze_state(k, own)]
    missing_nbt = [k for k in missing if k.endswith(OPTIONAL_BUFFERS)]
    missing = [k for k in missing if not k.endswith(OPTIONAL_BUFFERS)]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {format_keys(missing, limit)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {format_keys(unexpected, limit)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {format_keys(mismatched, limit)}")
    if problems:
        raise WeightsError(f"cannot load {what} into {type(model).__name__}: " + "; ".join(problems) + hint)
    for k in missing_nbt:
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return len(missing_nbt)
