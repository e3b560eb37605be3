"""Config helpers: the functions behind ``conf/``'s resolvers, composition, path resolution and
config validation.

The ``atrc_*`` resolvers that ``conf/train.yaml`` uses are registered when ``atrc_exp`` is imported
(:func:`atrc_exp.register_resolvers`), so Hydra's compose API works after ``import atrc_exp``;
:func:`compose` composes ``conf/train.yaml`` in one call.

The shipped data folders (``conf/``, ``genotypes/``, ``kernels/``) are found by :func:`resource_dir`:
inside the installed package (a wheel carries them as ``atrc_exp/<name>/``) or at the top of the
checkout (editable install, ``make install``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent
#: The data folders shipped with atrc_exp (see :func:`resource_dir`).
RESOURCE_DIRS: tuple[str, ...] = ("conf", "genotypes", "kernels")


def resource_dir(name: str) -> Path:
    """The folder of the shipped data ``name`` (one of :data:`RESOURCE_DIRS`): the copy inside the
    installed package (``<site-packages>/atrc_exp/<name>``, from a wheel) when it exists, else the
    top-level folder of the checkout (``<repo>/<name>``: editable install or source tree)."""
    if name not in RESOURCE_DIRS:
        raise ValueError(f"unknown resource folder {name!r}; known: {', '.join(RESOURCE_DIRS)}")
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
    """``e``, or the error a config interpolation raised inside it (a folder dataset's resolver,
    a missing ``dataset.root``): what the user should read."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    while isinstance(e, InterpolationResolutionError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", "") or ""
        return ConfigError(f"{key or 'a key'} has no value: pass {key or 'it'}=<value> on the command line")
    return e


def config_tasks(cfg: DictConfig, names=None) -> list:
    """The :class:`~atrc_exp.task_kinds.Task` objects of ``tasks.names`` (or ``names``), from
    ``dataset.task_specs``; a :class:`ConfigError` naming the problem otherwise."""
    from .task_kinds import TaskSpecError, make_tasks

    names = list(cfg.tasks.names if names is None else names)
    specs = cfg.dataset.get("task_specs")
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
    """Compose ``conf/<config_name>.yaml`` (``train``) with Hydra's compose API and ``overrides`` (the command-line
    syntax of ``atrc-train``, e.g. ``["dataset=nyud", "backbone.pretrained=false"]``).

    The result is what ``atrc-train`` would run, without the ``hydra`` node's run-time values: pass it
    to :func:`atrc_exp.build_model`. Interpolations (``paths.cache_dir`` …) resolve on access.
    Inside a running Hydra job (``atrc-train``: the pipeline's stages) it composes with that job's
    config loader (its config folder and search path); elsewhere from ``conf/`` with a temporary
    global Hydra state, so it works inside an initialised Hydra too (a notebook's) and leaves it as it was.
    """
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    overrides = list(overrides or [])
    outer = GlobalHydra.instance()
    if outer.is_initialized() and HydraConfig.initialized():
        return _compose(config_name=config_name, overrides=overrides)
    saved = outer.hydra if outer.is_initialized() else None
    if saved is not None:
        outer.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return _compose(config_name=config_name, overrides=overrides)
    finally:
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


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


def validate_config(cfg: DictConfig) -> None:
    """Check cross-group consistency; raise :class:`ConfigError` naming the fix."""
    if "root" in cfg.dataset.keys() and OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError(f"dataset={cfg.dataset.name} needs its folder: pass dataset.root=<dir>")
    tasks = list(cfg.tasks.names)
    if not tasks:
        raise ConfigError("tasks.names is empty: choose tasks=all or one task, e.g. tasks=semseg")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks.names lists a task twice: {tasks}")
    config_tasks(cfg)  # every task known to the dataset, every spec valid
    ctx, mode = cfg.context.name, cfg.mode.name
    if mode == "pipeline":  # search (context=search, set by the pipeline) then distillation with `context`
        if ctx != "atrc":
            raise ConfigError(
                f"mode=pipeline distils with context=atrc (its search stage uses context=search by "
                f"itself); got context={ctx}: drop the context override (or pass context=atrc)"
            )
        for key in ("search_steps", "distill_steps"):
            n = cfg.mode.get(key)
            if n is not None and int(n) < 1:
                raise ConfigError(f"mode.{key}={n}: use a number of steps >= 1 (or null: trainer.max_steps)")
    if ctx == "search" and mode != "search":
        raise ConfigError(f"context=search goes with mode=search (got mode={mode})")
    if mode == "search" and ctx != "search":
        raise ConfigError(f"mode=search needs context=search (got context={ctx})")
    if cfg.trainer.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"trainer.mixed_precision={cfg.trainer.mixed_precision!r}: use no, bf16 or fp16")
    if int(cfg.trainer.batch_size) < 1:
        raise ConfigError("trainer.batch_size must be >= 1")
    if int(cfg.trainer.val_interval) < 1:
        raise ConfigError("trainer.val_interval must be >= 1 (steps between validations)")
