"""Strict state-dict loading with errors that name the offending keys."""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn

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
    """A weights file that does not fit the model (wrong keys or shapes, not a state dict)."""


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
