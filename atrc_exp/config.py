"""Config helpers: the functions behind ``conf/``'s ``atrc_*`` resolvers (registered by
:func:`atrc_exp.register_resolvers`), composition, path resolution and validation (:data:`SCHEMA`)."""

from __future__ import annotations

import datetime as _dt
import functools
import importlib
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder of the shipped data ``name`` (``conf``, ``genotypes``, ``kernels``): the copy inside
    the installed package (``<site-packages>/atrc_exp/<name>``, from a wheel) when it exists, else
    the top-level folder of the checkout (``<repo>/<name>``: editable install or source tree)."""
    inside = _PACKAGE_DIR / name
    return inside if inside.is_dir() else _PACKAGE_DIR.parent / name


#: Hydra's config folder (holds ``train.yaml``).
CONF_DIR = resource_dir("conf")


def cache_dir() -> Path:
    """The user's cache folder for atrc_exp (``$XDG_CACHE_HOME/atrc_exp`` or ``~/.cache/atrc_exp``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "atrc_exp"


def _launcher_start_time() -> float | None:
    """Start time of the launcher (torchrun / accelerate) that spawned this rank, if any.

    All ranks of one node are children of the same launcher process, so its start time is a value
    they agree on without communicating.
    """
    try:
        ppid = os.getppid()
        with open(f"/proc/{ppid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def run_stamp() -> str:
    """Timestamp naming a run directory, identical on every process of one launch.

    ``$ATRC_RUN_STAMP`` wins (set it for multi-node jobs); under a multi-process launcher
    (``WORLD_SIZE`` > 1) the launcher's start time is used; otherwise the current time.
    """
    if os.environ.get("ATRC_RUN_STAMP"):
        return os.environ["ATRC_RUN_STAMP"]
    t = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        t = _launcher_start_time()
    when = _dt.datetime.fromtimestamp(t) if t is not None else _dt.datetime.now()
    return when.strftime("%Y-%m-%d_%H-%M-%S")


def is_main_rank() -> bool:
    """True on rank 0 of a multi-process launch (``$RANK``), and without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_suffix() -> str:
    """``""`` on rank 0, ``"_rank<N>"`` elsewhere (per-rank log files)."""
    return "" if is_main_rank() else f"_rank{int(os.environ['RANK'])}"


def user_error(e: BaseException) -> BaseException:
    """``e``, or the error it wraps that the user should read: a config interpolation's own error
    (a folder dataset's resolver, a missing ``dataset.root``), a ``_target_``'s own error."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    wrappers = (InterpolationResolutionError, InstantiationException)
    while isinstance(e, wrappers) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", "") or ""
        return ConfigError(f"{key or 'a key'} has no value: pass {key or 'it'}=<value> on the command line")
    return e


def instantiate(cfg: DictConfig, key: str, *args, **kwargs):
    """The object of the config node ``key`` (``_target_`` and its arguments) with ``args`` and
    ``kwargs`` added: :func:`hydra.utils.instantiate` with plain Python containers. The target's own
    error is raised, not Hydra's wrapper; arguments its signature does not take are a :class:`ConfigError`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    node = OmegaConf.select(cfg, key)
    try:
        return hydra_instantiate(node, *args, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = user_error(e)
        if isinstance(cause, TypeError):  # e.g. a user's class without an argument its group passes
            raise ConfigError(f"{key}._target_={node._target_}: {cause}") from None
        raise cause from None


def config_tasks(cfg: DictConfig, names=None) -> list:
    """The :class:`~atrc_exp.task_kinds.Task` objects of ``tasks.names`` (or ``names``), from
    ``dataset.task_specs``; a :class:`ConfigError` naming the problem otherwise."""
    from .task_kinds import TaskSpecError, make_tasks

    names = list(cfg.tasks.names if names is None else names)
    specs = cfg.dataset.task_specs if "task_specs" in cfg.dataset else None
    if specs is None:
        raise ConfigError(f"dataset={cfg.dataset.name} has no task_specs: say what each task is (its kind)")
    if isinstance(specs, DictConfig):
        specs = OmegaConf.to_container(specs, resolve=True)
    for t in names:
        if t not in specs:
            raise ConfigError(
                f"task {t!r} is not in dataset={cfg.dataset.name} (its tasks: {', '.join(specs)}); "
                f"choose tasks=all or some of those"
            )
    try:
        return make_tasks(specs, names)
    except TaskSpecError as e:
        raise ConfigError(f"dataset={cfg.dataset.name}: {e}") from None


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra's compose API and ``overrides`` (the command-line
    syntax of ``atrc-train``, e.g. ``["dataset=nyud", "backbone.pretrained=false"]``).

    The result is what ``atrc-train`` would run, without the ``hydra`` node's run-time values, checked
    by :func:`validate_config` (a :class:`ConfigError` otherwise): pass it to
    :func:`atrc_exp.build_model`. Interpolations (``paths.cache_dir`` …) resolve on access. Inside
    a running Hydra job (``atrc-train``: the pipeline's stages) it composes with that job's config
    loader (its config folder and search path); elsewhere from ``conf/`` with a temporary global
    Hydra state, so it works inside an initialised Hydra too (a notebook's) and leaves it as it was.
    """
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    overrides = list(overrides or [])
    outer = GlobalHydra.instance()
    if outer.is_initialized() and HydraConfig.initialized():
        cfg = _compose(config_name=config_name, overrides=overrides)
    else:
        saved = outer.hydra if outer.is_initialized() else None
        if saved is not None:
            outer.clear()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = _compose(config_name=config_name, overrides=overrides)
        finally:
            if saved is not None:
                GlobalHydra.instance().initialize(saved)
    validate_config(cfg)
    return cfg


def synthetic_data_dir(cfg: DictConfig) -> Path:
    """Default folder of the synthetic dataset for its generator settings."""
    g = cfg.dataset.generator
    tag = f"v1_n{g.n_train}-{g.n_val}_{g.height}x{g.width}_s{g.seed}"
    return Path(cfg.paths.cache_dir) / "synthetic" / tag


def resolve_data_dir(cfg: DictConfig) -> Path:
    """The folder that holds ``NYUD_MT/`` / ``PASCAL_MT/`` for this config (a dataset with its
    own ``root``, the folder dataset: that folder)."""
    if "root" in cfg.dataset.keys() and cfg.dataset.root not in (None, ""):
        return Path(str(cfg.dataset.root)).expanduser()
    if cfg.paths.data_dir not in (None, "", "null"):
        return Path(str(cfg.paths.data_dir)).expanduser()
    if cfg.dataset.name == "synthetic":
        return synthetic_data_dir(cfg)
    raise ConfigError(
        f"dataset={cfg.dataset.name} needs its data folder: pass paths.data_dir=/path/to/folder "
        f"(the folder that contains {cfg.dataset.layout}/) or set $ATRC_DATA_DIR"
    )


#: The search's settings (``mode=search``; under ``mode.search`` in ``mode=pipeline``).
_SEARCH_SCHEMA = {
    "name": "str",
    "arch_lr": "float > 0",
    "tau": "pair of float > 0",
    "entropy_weight": "pair of float",
    "freeze_gap": "float in [0, 1]",
    "grad_clip": "null|float > 0",
    "recompute": "bool",
}

#: The type and range of every key of ``conf/`` (its values, the defaults, live there and only
#: there), checked right after composition by :func:`validate_config`. A spec reads
#: ``[null|][list of |pair of ]ALTS[ RANGE]``: ALTS are ``|``-separated types (``int``, ``float``,
#: ``bool``, ``str``, ``target``: an importable ``_target_``, ``any``: not checked) or literal
#: words; RANGE is ``>= a``, ``> a`` or ``in [a, b)`` (brackets inclusive, parentheses exclusive),
#: for numbers and every item of a list. Keys a group option does not have are skipped; a
#: ``_target_`` node takes keys beyond those listed (its class's own arguments).
SCHEMA: dict = {
    "seed": "int",
    "run_name": "str",
    "continue_on_failure": "bool",
    "objective": "any",  # checked by atrc_exp.evaluation.objective.Objective
    "objective_baselines": "any",  # a folder or a list of them, checked by Objective
    "paths": {
        "data_dir": "null|str",
        "cache_dir": "str",
        "weights_dir": "str",
        "log_dir": "str",
        "output_dir": "any",  # Hydra's run directory
    },
    "dataset": {
        "name": "str",
        "layout": "str",
        "root": "str",
        "tasks": "list of str",
        "task_specs": "any",  # checked by atrc_exp.task_kinds.make_tasks
        "default_lr": "float > 0",
        "crop_size": "pair of int >= 1",
        "train_split": "str",
        "val_split": "str",
        "normals_valid_classes": "null|list of int >= 0",
        "edge_eval_thresholds": "int >= 1",
        "augment": {
            "scale_range": "pair of float > 0",
            "flip": "bool",
            "photometric": "bool",
            "cat_max_ratio": "float in (0, 1]",
            "cat_max_ratio_task": "null|str",
        },
        "generator": {
            "n_train": "int >= 1",
            "n_val": "int >= 1",
            "height": "int >= 8",
            "width": "int >= 8",
            "seed": "int",
        },
    },
    "backbone": {
        "_target_": "target",
        "pretrained": "bool|str",
        "weights_dir": "str",
        "download_timeout": "null|float > 0",
        "model_name": "str",
        "out_indices": "null|list of int >= 0",
    },
    "tasks": {"names": "list of str"},
    "context": {
        "name": "str",
        "genotype": "null|str",
        "head": {"_target_": "target", "tasks": "list of str", "genotype": "any"},
    },
    "mode": {
        **_SEARCH_SCHEMA,
        "search_steps": "null|int >= 1",
        "distill_steps": "null|int >= 1",
        "baseline": "bool",
        "search": _SEARCH_SCHEMA,
    },
    "trainer": {
        "max_steps": "int >= 0",  # 0: validate the initial weights only
        "batch_size": "int >= 1",
        "val_batch_size": "int >= 1",
        "lr": "float > 0",
        "momentum": "float in [0, 1)",
        "weight_decay": "float >= 0",
        "poly_power": "float >= 0",
        "grad_clip": "null|float > 0",
        "val_interval": "int >= 1",
        "edge_eval_workers": "int >= 0",
        "edge_eval_thresholds": "int >= 1",
        "checkpoint_interval": "int >= 1",
        "keep_checkpoints": "int >= 0",
        "init_from_original": "null|str",
        "init_from_original_trusted": "bool",
        "resume": "null|str",
        "on_nonfinite": "stop|skip",
        "max_skipped_steps": "int >= 0",
        "num_workers": "int >= 0",
        "mixed_precision": "no|bf16|fp16",
        "cpu": "bool",
        "log_interval": "int >= 1",
        "progress": "bool",
        "channels_last": "bool",
        "compile": {
            "enabled": "bool",
            "mode": "default|reduce-overhead|max-autotune|max-autotune-no-cudagraphs",
            "fullgraph": "bool",
            "backend": "str",
            "parts": "list of step|backbone|head",
            "regional": "bool",
        },
        "cudnn_benchmark": "bool",
        "pin_memory": "auto|bool",
        "persistent_workers": "bool",
        "prefetch_factor": "int >= 1",
    },
    "ops": {"local_attention": {"backend": "auto|cpp|cuda|torch"}},
    "logger": {
        "_target_": "target",
        "project": "str",
        "entity": "null|str",
        "group": "null|str",
        "job_type": "null|str",
        "tags": "list of str",
        "mode": "null|online|offline|disabled",
        "log_images": "bool",
        "num_images": "int >= 0",
        "log_checkpoints": "bool",
    },
}

_SPEC = re.compile(
    r"(?P<null>null\|)?(?P<shape>list of |pair of )?(?P<alts>[\w|-]+)"
    r"(?: (?:(?P<op>>=|>) (?P<bound>\S+)|in (?P<lo_br>[\[(])(?P<lo>\S+), (?P<hi>\S+)(?P<hi_br>[\])])))?"
)


def _fits(value, alts: list[str]) -> bool:
    """``value`` is one of the types / literal words ``alts``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    kinds = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number,
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "target": isinstance(value, str),
    }
    return any(kinds.get(a, isinstance(value, str) and value == a) for a in alts)


def _in_range(value, m: re.Match) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool) or not (m["op"] or m["lo"]):
        return True
    if m["op"]:
        bound = float(m["bound"])
        return value >= bound if m["op"] == ">=" else value > bound
    lo, hi = float(m["lo"]), float(m["hi"])
    above = value >= lo if m["lo_br"] == "[" else value > lo
    return above and (value <= hi if m["hi_br"] == "]" else value < hi)


def _check_value(key: str, value, spec: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``value`` fits ``spec`` (see :data:`SCHEMA`)."""
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"SCHEMA[{key!r}]: cannot read the spec {spec!r}")
    if m["alts"] == "any" or value is None and m["null"]:
        return
    items = value if m["shape"] else [value]
    shape_ok = not m["shape"] or isinstance(value, list) and (m["shape"] == "list of " or len(value) == 2)
    if not (shape_ok and all(_fits(v, m["alts"].split("|")) and _in_range(v, m) for v in items)):
        raise ConfigError(f"{key}={value}: must be {spec}")
    if m["alts"] == "target":
        module, _, name = value.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(f"{key}={value}: cannot import it ({e}); is its package on PYTHONPATH?") from e


def _check_schema(node: DictConfig, schema: dict, prefix: str = "") -> None:
    """Check the keys of ``node`` that ``schema`` (a part of :data:`SCHEMA`) lists."""
    for name, spec in schema.items():
        key = prefix + name
        if OmegaConf.is_missing(node, name):
            raise ConfigError(f"{key} has no value: pass {key}=<value> on the command line")
        if name not in node or spec == "any":
            continue
        value = node[name]  # resolved
        if isinstance(spec, dict):
            if not isinstance(value, DictConfig):
                raise ConfigError(f"{key}={value}: must be a mapping of {', '.join(spec)}")
            _check_schema(value, spec, key + ".")
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        _check_value(key, value, spec)


def validate_config(cfg: DictConfig) -> None:
    """Check every key against :data:`SCHEMA`, then the consistency of the groups; raise a
    one-line :class:`ConfigError` naming the fix."""
    try:
        _check_schema(cfg, SCHEMA)
    except Exception as e:  # an interpolation's own error (a folder dataset's YAML), a missing value
        raise user_error(e) from None
    tasks = list(cfg.tasks.names)
    if not tasks:
        raise ConfigError("tasks.names is empty: choose tasks=all or one task, e.g. tasks=semseg")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks.names lists a task twice: {tasks}")
    config_tasks(cfg)  # every task known to the dataset, every spec valid
    ctx, mode = cfg.context.name, cfg.mode.name
    # the pipeline: search (context=search, set by the pipeline), then distillation with context=atrc
    if mode == "pipeline" and ctx != "atrc":
        raise ConfigError(
            f"mode=pipeline distils with context=atrc (its search stage uses context=search by "
            f"itself); got context={ctx}: drop the context override (or pass context=atrc)"
        )
    if ctx == "search" and mode != "search":
        raise ConfigError(f"context=search goes with mode=search (got mode={mode})")
    if mode == "search" and ctx != "search":
        raise ConfigError(f"mode=search needs context=search (got context={ctx})")
