"""Import weights trained with the original ATRC implementation (PyTorch Lightning).

The original LightningModule's state dict has ``backbone.*`` (MMSeg-style HRNet keys) and ``head.*``
(``head.bottleneck.<t>``, ``head.aux_conv.<t>``, ``head.aux_logits.<t>``,
``head.atrc_module.cp_blocks.<t>.<s>.*``, ``head.atrc_module.out_proj.<t>``,
``head.atrc_module.bottleneck.<t>``, ``head.final_logits.<t>``; a search block
``cp_blocks.<t>.<s>.arch_param`` / ``.op_list.<i>.*``) plus the loss modules' buffers
(``criterion.*``: the normals aux centroids, the aux edge class weights), which are not weights
(nor are ``metrics_dict.*`` entries, which Lightning < 1.0.7 saved for metric states; the
original's Lightning 1.1.8 does not). Our modules carry the same names, so the key map is the
identity apart from the dropped entries and wrapper prefixes (``module.``, ``_orig_mod.``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state_dict import WeightsError, load_strict, read_checkpoint, stand_in, strip_prefixes

#: Entries of an original checkpoint's state dict that are not network weights.
DROPPED_PREFIXES: tuple[str, ...] = ("criterion.", "metrics_dict.")


def _defaultdict_as_dict(*_: Any) -> dict:
    """``collections.defaultdict(factory)`` read back as a plain dict (the factory is not kept)."""
    return {}


#: Known-harmless classes that Lightning checkpoints of the original may reference outside the weights,
#: allowed while loading with ``weights_only=True``. Hyper-parameter containers of packages we do not
#: import (jsonargparse, Lightning, OmegaConf) map to inert :class:`~atrc_exp.models.state_dict.StandIn` subclasses,
#: never to the real classes; Lightning's ``AttributeDict`` (a ``dict`` subclass) to ``dict``; a few
#: builtins OmegaConf metadata refers to, to themselves. Nothing else is allowed: a file referencing
#: any other global is refused unless the caller opts in to a full unpickle.
CHECKPOINT_SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    *[(t, f"builtins.{t.__name__}") for t in (dict, list, int, float, str, bool)],
    *[
        (dict, f"{m}.AttributeDict")
        for m in (
            "pytorch_lightning.utilities.parsing",
            "lightning.pytorch.utilities.parsing",
            "lightning_fabric.utilities.data",
            "lightning.fabric.utilities.data",
        )
    ],
    (_defaultdict_as_dict, "collections.defaultdict"),
    *[
        (stand_in(n), n)
        for n in (
            "jsonargparse.Namespace",
            "jsonargparse.namespace.Namespace",
            "jsonargparse._namespace.Namespace",
            # Lightning 1.x keys callback states by the callback's class
            "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
            "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
            # an OmegaConf config as hyper-parameters (and ``hparams_type``)
            "omegaconf.dictconfig.DictConfig",
            "omegaconf.listconfig.ListConfig",
            "omegaconf.base.ContainerMetadata",
            "omegaconf.base.Metadata",
            *[
                f"omegaconf.nodes.{k}Node"
                for k in ("Any", "String", "Integer", "Float", "Boolean", "Path", "Bytes")
            ],
            "typing.Any",
        )
    ],
]


def load_original_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any] | str | os.PathLike,
    weights_only: bool | None = True,
) -> dict[str, Any]:
    """Load weights of the original implementation into ``model`` (built by :func:`build_model`).

    Args:
        model: our network.
        state_dict: a Lightning checkpoint dict (its ``state_dict`` entry is used), a bare state dict,
            or the path of either (``.ckpt`` / ``.pth``).
        weights_only: for a path: ``True`` (default; ``None`` means the same) loads with
            ``torch.load(weights_only=True)``, allowing only :data:`CHECKPOINT_SAFE_GLOBALS` (mapped to
            inert stand-ins): no code from the file runs, and a file that needs anything else is refused
            with a :class:`WeightsError`. ``False``: a full unpickle, which can run arbitrary code — an
            explicit opt-in for files you trust (logs a warning); classes of modules that are not
            installed (``pytorch_lightning``) are read as inert stand-ins.

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
        obj = read_checkpoint(
            path,
            "a Lightning .ckpt of the original ATRC implementation or a state dict saved with torch.save",
            weights_only=weights_only is not False,
            safe_globals=CHECKPOINT_SAFE_GLOBALS,
            trust_hint="; if you trust this file, allow a full unpickle: atrc-eval/atrc-predict "
            "--trust-checkpoint, trainer.init_from_original_trusted=true, or "
            "load_original_state_dict(..., weights_only=False)",
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: not a state dict or Lightning checkpoint (got {type(obj).__name__})")

    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in obj.items():
        ours = strip_prefixes(k, ("module.", "_orig_mod."))  # DDP, torch.compile
        if ours.startswith(DROPPED_PREFIXES):
            dropped.append(k)
            continue
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__})")
        if ours in mapped:
            raise WeightsError(f"{source}: key {ours!r} appears twice after stripping prefixes (from {k!r})")
        mapped[ours] = v

    n_nbt = load_strict(
        model,
        mapped,
        f"original weights from {source}",
        hint=" (does the config — dataset, backbone, tasks, context/genotype — match the checkpoint?)",
        limit=8,
    )
    return dict(loaded=len(mapped) - n_nbt, dropped=dropped, missing_num_batches_tracked=n_nbt)
