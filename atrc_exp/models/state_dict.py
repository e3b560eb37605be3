"""Reading weights files safely (one-line errors) and strict state-dict loading with errors that name
the offending keys."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import types
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
    while key.startswith(prefixes):
        key = next(key.removeprefix(p) for p in prefixes if key.startswith(p))
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


def truncated(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the beginning of a weights file whose end is missing: a zip archive
    (``torch.save``'s format) without its central directory, or a ``.safetensors`` file shorter than
    its header says."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"PK\x03\x04"):
            try:
                zipfile.ZipFile(f).close()
            except zipfile.BadZipFile:
                return True
            return False
        if path.suffix != ".safetensors" or len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        text = f.read(min(n, size - 8))
        if not text.startswith(b'{"'):  # not a safetensors header: some other problem
            return False
        if size < 8 + n:
            return True
        try:
            header = json.loads(text)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return False  # not a safetensors header: some other problem
        return size < 8 + n + int(end)


def truncated_error(path: str | os.PathLike) -> WeightsError:
    """The one-line error for a truncated file (see :func:`truncated`)."""
    return WeightsError(
        f"{path}: truncated ({Path(path).stat().st_size} bytes, its end is missing): an incomplete "
        f"download or copy; download or copy it again"
    )


class StandIn(dict):
    """Inert stand-in for a class that a checkpoint references outside its weights and that is not
    imported: one of the known hyper-parameter containers (:data:`~atrc_exp.models.original.CHECKPOINT_SAFE_GLOBALS`),
    or, in a trusted full unpickle, any class that cannot be imported here (a package that is not
    installed, e.g. ``pytorch_lightning``). It keeps what the pickle gives it (arguments,
    attributes, dict items, list items) and runs nothing. ``original`` names the class it stands for."""

    original: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__.update(kwargs)
        if args:
            self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        pair = isinstance(state, tuple) and len(state) == 2 and all(isinstance(p, dict | None) for p in state)
        for part in state if pair else (state,):  # (attributes, slots) or one state
            if isinstance(part, dict):
                self.__dict__.update(part)
            elif part is not None:
                self.__dict__["_state"] = part

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("_items", []).extend(items)

    def __hash__(self) -> int:  # a stand-in may be a dict key (Lightning keys callback states by class)
        return id(self)

    def __repr__(self) -> str:
        return f"<stand-in for {self.original}: {sorted(self.__dict__)}>"


def stand_in(name: str) -> type:
    """A :class:`StandIn` class of its own for the class ``name`` (``module.qualname``)."""
    return type(name.rsplit(".", 1)[-1], (StandIn,), {"original": name, "__module__": __name__})


def _lenient_pickle(missing: dict[str, type]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler builds a :func:`stand_in` (recorded in
    ``missing``) for every class it cannot import, instead of failing."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                key = f"{module}.{name}"
                if key not in missing:
                    missing[key] = stand_in(key)
                return missing[key]

    mod = types.ModuleType("atrc_exp_lenient_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    return mod


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

    ``expected``: what the file should be, for the error message. ``weights_only=True``:
    ``torch.load(weights_only=True)``, which never runs code from the file, allowing also
    ``safe_globals`` (``torch.serialization.safe_globals`` items); ``False``: a full unpickle (only
    for trusted files; logs a warning) that reads a class whose module cannot be imported
    (``pytorch_lightning`` not installed) as an inert :class:`StandIn`. ``trust_hint`` is appended
    to the refusal message (how the caller opts in to a full unpickle).

    Raises:
        WeightsError (one line, naming the file): an empty or truncated file, a file that is no
        checkpoint (JSON, random bytes, ...) and what was expected, or a checkpoint that needs a full
        unpickle (naming the globals it references).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: empty file, not a checkpoint (expected {expected})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any failure means: not a safetensors file
            if truncated(path):
                raise truncated_error(path) from None
            raise WeightsError(f"{path}: not a safetensors file ({_short(e)}); expected {expected}") from None
    missing: dict[str, type] = {}
    if weights_only:
        load_args: dict[str, Any] = {"weights_only": True}
    else:
        log.warning("%s: full unpickle (weights_only=False): only do this for files you trust", path)
        load_args = {"weights_only": False, "pickle_module": _lenient_pickle(missing)}
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            obj = torch.load(path, map_location="cpu", **load_args)
        except Exception as e:  # noqa: BLE001 - classified below, re-raised as one line
            unsafe = _unsafe_globals(path, e) if weights_only else []
            err = e
        else:
            if missing:
                log.warning("%s: read as inert stand-ins (not importable here): %s", path, ", ".join(missing))
            return obj
    if truncated(path):
        raise truncated_error(path) from None
    if missing:
        raise WeightsError(
            f"{path}: a full unpickle failed ({_short(err)}); it references {', '.join(missing)}, which "
            f"cannot be imported here: install the package(s) that provide them"
        ) from None
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

    Missing :data:`OPTIONAL_BUFFERS` keep the model's values; any other missing or unexpected key or
    shape mismatch raises :class:`WeightsError` ``"cannot load {what} into <Model>: ...{hint}"``
    listing up to ``limit`` keys of each kind.
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
    kinds = {"missing key(s)": missing, "unexpected key(s)": unexpected, "shape mismatch(es)": mismatched}
    problems = [f"{len(keys)} {kind}: {format_keys(keys, limit)}" for kind, keys in kinds.items() if keys]
    if problems:
        raise WeightsError(f"cannot load {what} into {type(model).__name__}: " + "; ".join(problems) + hint)
    for k in missing_nbt:
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return len(missing_nbt)
