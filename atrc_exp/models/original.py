"""Import weights trained with the original ATRC implementation (PyTorch Lightning).

The original LightningModule's state dict has ``backbone.*`` (MMSeg-style HRNet keys) and
``head.*`` (``head.bottleneck.<t>``, ``head.aux_conv.<t>``, ``head.aux_logits.<t>``,
``head.atrc_module.cp_blocks.<t>.<s>.*``, ``head.atrc_module.out_proj.<t>``,
``head.atrc_module.bottleneck.<t>``, ``head.final_logits.<t>``; a search block
``cp_blocks.<t>.<s>.arch_param`` / ``.op_list.<i>.*``) plus non-weight entries (``criterion.*``,
``metrics_dict.*``). Our modules carry the same names, so the key map is the identity apart from
the dropped entries and wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``);
:data:`KEY_RENAMES` holds any (prefix → prefix) renames should a layout ever differ.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state_dict import WeightsError, load_strict, strip_prefixes

__all__ = ["DROPPED_PREFIXES", "KEY_RENAMES", "load_original_state_dict", "original_to_ours"]

log = logging.getLogger(__name__)

#: Entries of an original checkpoint's state dict that are not network weights.
DROPPED_PREFIXES: tuple[str, ...] = ("criterion.", "metrics_dict.")
#: Wrapper prefixes removed from keys (DDP, torch.compile).
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: (original prefix, our prefix) renames, applied in order (none needed: our names are the original's).
KEY_RENAMES: tuple[tuple[str, str], ...] = ()


def original_to_ours(key: str) -> str | None:
    """Our key for an original state-dict key, or ``None`` for an entry that is not a weight."""
    key = strip_prefixes(key, _WRAPPER_PREFIXES)
    if key.startswith(DROPPED_PREFIXES):
        return None
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
    return key


def _read(path: Path, weights_only: bool | None) -> Any:
    if weights_only is not None:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints may pickle hyper-parameter objects (e.g. jsonargparse Namespaces)
        log.warning("%s: not loadable with weights_only=True; loading it as a trusted pickle", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def load_original_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """Load weights of the original implementation into ``model`` (built by :func:`build_model`).

    Args:
        model: our network.
        state_dict: a Lightning checkpoint dict (its ``state_dict`` entry is used), a bare state dict,
            or the path of either (``.ckpt`` / ``.pth``).
        weights_only: for a path: passed to ``torch.load``; ``None`` tries ``True`` and falls back to
            a full (trusted) unpickle for Lightning checkpoints holding hyper-parameter objects.

    ``criterion.*`` and ``metrics_dict.*`` entries are dropped. Any missing key (BatchNorm
    ``num_batches_tracked`` buffers aside), unexpected key or shape mismatch raises ``ValueError``
    naming the keys; nothing is loaded then.

    Returns:
        ``{"loaded": n, "dropped": [keys], "missing_num_batches_tracked": n}``.
    """
    source = "<state dict>"
    obj: Any = state_dict
    if isinstance(state_dict, str | os.PathLike):
        path = Path(state_dict).expanduser()
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"original checkpoint not found: {path}")
        obj = _read(path, weights_only)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: not a state dict or Lightning checkpoint (got {type(obj).__name__})")

    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in obj.items():
        ours = original_to_ours(k)
        if ours is None:
            dropped.append(k)
            continue
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__})")
        if ours in mapped:
            raise WeightsError(f"{source}: key {ours!r} appears twice after renaming (from {k!r})")
        mapped[ours] = v

    n_nbt = load_strict(
        model,
        mapped,
        f"original weights from {source}",
        hint=" (does the config — dataset, backbone, tasks, context/genotype — match the checkpoint?)",
        limit=8,
    )
    return {
        "loaded": len(mapped) - n_nbt,
        "dropped": dropped,
        "missing_num_batches_tracked": n_nbt,
    }
