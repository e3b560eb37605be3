"""Switchable fast training paths (``trainer.*`` under ``# fast paths`` in ``conf/trainer/default.yaml``,
off by default, timed by ``make bench``): channels_last, ``torch.compile``, cuDNN autotuning, loader
settings; and ``mode.recompute`` (the memory-lean search). bf16 is ``trainer.mixed_precision=bf16``.

``trainer.compile.parts: [step]`` compiles the step's forward and loss as one function
(:func:`compile_step`), the backward from the same graph; the distillation step of every context
has no graph break (``tests/test_train_step.py``), the search breaks where ``mode.recompute``
checkpoints a target's ops. Module parts are compiled *in place* (``nn.Module.compile``), so
parameter names and state-dict keys stay unchanged: checkpoints, resume, ``init_from_original``
and the search's weight/α split work as without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError

#: What ``trainer.compile.parts`` may name: the step, or modules of the model.
COMPILE_PARTS = ("step", "backbone", "head")


def compile_options(cfg: DictConfig) -> dict[str, Any] | None:
    """``trainer.compile`` (a bool or ``{enabled, mode, fullgraph, dynamic, backend, parts,
    regional}``) as the arguments of :func:`compile_model`; None when off. A bad value raises
    :class:`~atrc_exp.config.ConfigError` naming the key."""
    c = cfg.trainer.compile
    if isinstance(c, bool):
        c = {"enabled": bool(c)}
    elif isinstance(c, DictConfig):
        c = OmegaConf.to_container(c, resolve=True)
    else:
        raise ConfigError(f"trainer.compile must be a bool or a dict, got {c!r}")
    if not c.get("enabled", False):
        return None
    mode = c.get("mode")
    parts = c.get("parts")
    parts = ("step",) if parts is None else (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in COMPILE_PARTS]
    if unknown or not parts:
        raise ConfigError(
            f"trainer.compile.parts must be a non-empty list of {list(COMPILE_PARTS)}, got {list(parts)}"
        )
    if "step" in parts and len(parts) > 1:
        raise ConfigError(
            f"trainer.compile.parts={list(parts)}: [step] compiles the whole step (the model included); "
            "name either [step] or modules ([backbone], [head], [backbone, head])"
        )
    return {
        "mode": None if mode in (None, "default") else str(mode),
        "fullgraph": bool(c.get("fullgraph", False)),
        "dynamic": c.get("dynamic"),
        "backend": str(c.get("backend") or "inductor"),
        "parts": parts,
        "regional": bool(c.get("regional", False)),
    }


def compile_regions(module: nn.Module) -> list[nn.Module]:
    """What ``regional=True`` compiles one by one: the module's own ``compile_regions()`` (HRNet:
    its stage-1 bottlenecks and high-resolution modules), else ``[module]``."""
    regions = getattr(module, "compile_regions", None)
    return list(regions()) if callable(regions) else [module]


def compile_model(
    model: nn.Module,
    parts: Sequence[str] = ("backbone", "head"),
    regional: bool = False,
    **compile_kwargs: Any,
) -> list[nn.Module]:
    """``torch.compile`` the module ``parts`` of ``model`` in place (``step`` is left to
    :func:`compile_step`), the backbone's :func:`compile_regions` when ``regional`` (dynamo reuses
    one compilation for modules of the same code and shapes); returns the modules compiled."""
    targets = []
    for name in parts:
        if name != "step":
            part = getattr(model, name)
            targets += compile_regions(part) if regional and name == "backbone" else [part]
    for m in targets:
        m.compile(**compile_kwargs)
    return targets


def apply_fast_paths(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """``model`` with ``mode.recompute`` (search), ``trainer.channels_last`` and the module parts of
    ``trainer.compile`` applied, and ``torch.backends.cudnn.benchmark`` set (process-wide, either
    way). Call after the weights are loaded and before ``Accelerator.prepare``; with everything off
    the model is returned untouched."""
    from ..models.relational_head import ATRCModule

    recompute = cfg.mode.get("recompute")  # a key of mode=search only
    for m in model.modules():
        if isinstance(m, ATRCModule) and recompute is not None:
            m.recompute = bool(recompute)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opts = compile_options(cfg)
    if opts is not None:
        compile_model(model, **opts)
    return model


def compile_step(fn: Callable, cfg: DictConfig) -> Callable:
    """``fn`` (the step's forward and loss) compiled when ``trainer.compile.parts`` is ``[step]``."""
    opts = compile_options(cfg)
    if opts is None or "step" not in opts["parts"]:
        return fn
    return torch.compile(fn, **{k: opts[k] for k in ("mode", "fullgraph", "dynamic", "backend")})


def prepare_input(image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The input batch in the memory format the model expects (NHWC when ``channels_last``)."""
    return (
        image.contiguous(memory_format=torch.channels_last) if channels_last and image.dim() == 4 else image
    )


def train_loader_kwargs(trainer_cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The train DataLoader's ``num_workers``, ``pin_memory`` (``auto``: only on CUDA) and, with
    workers, ``persistent_workers`` and ``prefetch_factor``."""
    nw, pin = int(trainer_cfg.num_workers), trainer_cfg.pin_memory
    kwargs: dict[str, Any] = {
        "num_workers": nw,
        "pin_memory": torch.device(device).type == "cuda" if pin == "auto" else bool(pin),
    }
    if nw > 0:
        kwargs["persistent_workers"] = bool(trainer_cfg.persistent_workers)
        kwargs["prefetch_factor"] = int(trainer_cfg.prefetch_factor)
    return kwargs
