"""Switchable fast training paths: channels_last, ``torch.compile``, cuDNN autotuning, loader
settings; and ``mode.recompute`` (the memory-lean search).

Every switch lives in ``conf/trainer/default.yaml`` under ``# fast paths``, off by default, so a
run's numbers do not change unless asked for. ``make bench`` (``benchmarks/bench_train.py``) times
them against the plain float32 step in the same run. bf16 is not here: it is
``trainer.mixed_precision=bf16`` (Accelerate's autocast).

``mode.recompute`` (search only, default true)
    Sets :attr:`~atrc_exp.models.relational_head.ATRCModule.recompute`: each target's candidate
    ops run under activation checkpointing (about half the step memory, a slower step).

``trainer.channels_last`` (bool)
    Weights and activations in NHWC (``torch.channels_last``). :func:`apply_fast_paths` converts
    the model; the training step converts each input batch with :func:`prepare_input`. Numerically the
    same computation (float rounding aside).

``trainer.compile`` (``false`` | ``true`` | ``{enabled, mode, fullgraph, dynamic, backend, parts, regional}``)
    ``torch.compile``. ``parts: [step]`` (the default) compiles the training step's forward and
    loss as one function (:func:`compile_step`, used by the trainer); its backward is compiled
    from the same graph (AOTAutograd). The distillation step of every context has no graph break
    (``tests/test_train_step.py``); the search step breaks where ``mode.recompute`` checkpoints a
    target's ops (``torch.utils.checkpoint`` with the side effects of its batch-norm bookkeeping),
    none with ``mode.recompute=false``. ``parts: [backbone, head]`` (or one of them) compiles those
    modules *in place* instead (``nn.Module.compile``), so parameter names and state-dict keys stay
    unchanged either way: checkpoints, resume, ``init_from_original`` and the weight/α split of the
    search work as without it. ``mode`` is torch.compile's (``default``, ``reduce-overhead`` —
    CUDA graphs —, ``max-autotune``, ...), ``backend`` its backend (``inductor``; ``aot_eager`` or
    ``eager`` to debug a compile problem); ``fullgraph: true`` turns any graph break into an
    error. ``regional: true`` (with module parts) compiles the backbone's repeated modules one by
    one (:func:`compile_regions`: HRNet's high-resolution modules and stage-1 bottlenecks;
    identical modules share one compilation). The local-attention op is a ``torch.library``
    custom op (``torch.ops.atrc_exp.local_attention_fwd`` / ``_bwd``) with fake implementations,
    so it compiles without a graph break. Compilation happens on the first step (minutes with a
    cold cache, seconds from inductor's cache); switching between train and eval mode and a new
    input size recompile once each.

``trainer.cudnn_benchmark`` (bool)
    ``torch.backends.cudnn.benchmark``: cuDNN times its convolution algorithms for each new input
    shape on first use and keeps the fastest (the crop size is fixed in training, so this happens
    once per shape). GPU only; other algorithms round differently, and the choice can differ
    between runs, so bit-exact GPU reruns need it off (the default). Set for the process by
    :func:`apply_fast_paths`, from the config, on every call.

``trainer.pin_memory`` (``auto`` | bool), ``trainer.persistent_workers`` (bool), ``trainer.prefetch_factor`` (int)
    Train DataLoader settings, see :func:`train_loader_kwargs`. ``auto`` pins host memory only
    when training on CUDA; the worker settings apply only with ``trainer.num_workers > 0``. The
    trainer's train loader is a single endless iterator (step-indexed sampler), so its workers
    live for the whole run either way; ``persistent_workers`` only matters for loaders that are
    iterated again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError

__all__ = [
    "apply_fast_paths",
    "compile_model",
    "compile_options",
    "compile_regions",
    "prepare_input",
    "train_loader_kwargs",
]


#: What ``trainer.compile.parts`` may name: ``step`` (the default: the training step's forward and
#: loss as one graph, its backward through AOTAutograd — compiled by the trainer, see
#: :func:`atrc_exp.engine.step.make_forward_loss`), or modules of the model compiled in place.
COMPILE_PARTS = ("step", "backbone", "head")
MODULE_PARTS = ("backbone", "head")


def compile_options(cfg: DictConfig) -> dict[str, Any] | None:
    """What ``trainer.compile`` asks for, or None when compile is off: torch.compile's keyword
    arguments (``mode``, ``fullgraph``, ``dynamic``, ``backend``) plus ``parts`` (a tuple of
    :data:`COMPILE_PARTS`) and ``regional`` (bool), the arguments of :func:`compile_model`.

    Accepts a bool (``trainer.compile=true``) or a dict ``{enabled, mode, fullgraph, dynamic,
    backend, parts, regional}``; a bad value raises :class:`~atrc_exp.config.ConfigError` (a
    ``ValueError``) naming the key.
    """
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
    """The modules :func:`compile_model` compiles one by one for ``regional=True``: the module's own
    ``compile_regions()`` (HRNet: its stage-1 bottlenecks and high-resolution modules), or
    ``[module]`` when it has none (compiled whole)."""
    regions = getattr(module, "compile_regions", None)
    return list(regions()) if callable(regions) else [module]


def compile_model(
    model: nn.Module,
    parts: Sequence[str] = MODULE_PARTS,
    regional: bool = False,
    **compile_kwargs: Any,
) -> list[nn.Module]:
    """``torch.compile`` the module ``parts`` of ``model`` in place (``nn.Module.compile``: names
    and state-dict keys unchanged) and return the modules compiled (``step`` is not a module: the
    trainer compiles its step function, see :func:`compile_step`).

    ``regional``: the backbone's :func:`compile_regions` instead of the backbone (dynamo reuses
    one compilation for modules of the same code and shapes). A model without ``backbone`` /
    ``head`` attributes is compiled whole. ``compile_kwargs`` go to ``torch.compile``.
    """
    parts = [p for p in parts if p != "step"]  # the step is compiled by the trainer
    if not parts:
        return []
    if not any(isinstance(getattr(model, n, None), nn.Module) for n in MODULE_PARTS):
        targets = [model]
    else:
        targets = []
        for name in parts:
            part = getattr(model, name, None)
            if isinstance(part, nn.Module):
                targets += compile_regions(part) if regional and name == "backbone" else [part]
    for m in targets:
        m.compile(**compile_kwargs)
    return targets


def apply_fast_paths(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """Apply the model-side fast paths of ``cfg.trainer`` to ``model`` and return it.

    * ``mode.recompute``: :attr:`~atrc_exp.models.relational_head.ATRCModule.recompute` (search);
    * ``channels_last``: ``model.to(memory_format=torch.channels_last)`` (4-D weights become NHWC);
    * ``compile``: :func:`compile_model` (``model.backbone`` and ``model.head``, or the parts and
      regions ``trainer.compile`` names, compiled in place);
    * ``cudnn_benchmark``: ``torch.backends.cudnn.benchmark`` (process-wide, set either way).

    Call it after the weights are loaded and before ``Accelerator.prepare`` / DDP wrapping. With
    everything off the model is returned untouched.
    """
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
    """``fn`` (the step's forward and loss) compiled as ``trainer.compile`` asks when its parts are
    ``[step]`` (the default), else ``fn`` itself."""
    opts = compile_options(cfg)
    if opts is None or "step" not in opts["parts"]:
        return fn
    kwargs = {k: opts[k] for k in ("mode", "fullgraph", "dynamic", "backend")}
    return torch.compile(fn, **kwargs)


def prepare_input(image: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The input batch in the memory format the model expects (NHWC when ``channels_last``)."""
    if channels_last and image.dim() == 4:
        return image.contiguous(memory_format=torch.channels_last)
    return image


def train_loader_kwargs(trainer_cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments of the train loader from ``trainer.*``.

    ``num_workers``; ``pin_memory`` (``auto``: only when ``device`` is CUDA); with workers,
    ``persistent_workers`` and ``prefetch_factor``.
    """
    nw = int(trainer_cfg.num_workers)
    pin = trainer_cfg.pin_memory
    if isinstance(pin, str):
        if pin.lower() != "auto":
            raise ConfigError(f"trainer.pin_memory must be auto, true or false, got {pin!r}")
        pin = torch.device(device).type == "cuda"
    kwargs: dict[str, Any] = {"num_workers": nw, "pin_memory": bool(pin)}
    if nw > 0:
        kwargs["persistent_workers"] = bool(trainer_cfg.persistent_workers)
        kwargs["prefetch_factor"] = int(trainer_cfg.prefetch_factor)
    return kwargs
