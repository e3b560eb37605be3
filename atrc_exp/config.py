"""Config helpers: OmegaConf resolvers used by ``conf/``, path resolution and config validation.

``register_resolvers()`` must run before Hydra composes ``conf/train.yaml`` (``atrc_exp.train``
does it at import; tests that compose configs call it too).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .tasks import ALL_TASKS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: Contexts that need the relational-context head (built by ``atrc_exp.models.context``).
RELATIONAL_CONTEXTS = ("global", "local", "tlabel", "slabel", "atrc", "search")


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


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


def rank_suffix() -> str:
    """``""`` on rank 0, ``"_rank<N>"`` elsewhere (per-rank log files)."""
    rank = int(os.environ.get("RANK", "0"))
    return "" if rank == 0 else f"_rank{rank}"


def register_resolvers() -> None:
    """Register the ``atrc_*`` OmegaConf resolvers (idempotent)."""
    for name, fn in {
        "atrc_stamp": run_stamp,
        "atrc_rank_suffix": rank_suffix,
        "atrc_cache_dir": lambda: str(cache_dir()),
    }.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


def synthetic_data_dir(cfg: DictConfig) -> Path:
    """Default folder of the synthetic dataset for its generator settings."""
    g = cfg.dataset.generator
    tag = f"v1_n{g.n_train}-{g.n_val}_{g.height}x{g.width}_s{g.seed}"
    return Path(cfg.paths.cache_dir) / "synthetic" / tag


def resolve_data_dir(cfg: DictConfig) -> Path:
    """The folder that holds ``NYUD_MT/`` / ``PASCAL_MT/`` for this config."""
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
    tasks = list(cfg.tasks.names)
    if not tasks:
        raise ConfigError("tasks.names is empty: choose tasks=all or one task, e.g. tasks=semseg")
    for t in tasks:
        if t not in ALL_TASKS:
            raise ConfigError(f"unknown task {t!r}; known: {', '.join(ALL_TASKS)}")
        if t not in cfg.dataset.tasks:
            raise ConfigError(
                f"task {t!r} is not in dataset={cfg.dataset.name} (its tasks: "
                f"{', '.join(cfg.dataset.tasks)}); choose tasks=all or one of those"
            )
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks.names lists a task twice: {tasks}")
    ctx, mode = cfg.context.name, cfg.mode.name
    if ctx == "search" and mode != "search":
        raise ConfigError("context=search goes with mode=search (got mode=distill)")
    if mode == "search" and ctx != "search":
        raise ConfigError(f"mode=search needs context=search (got context={ctx})")
    if cfg.trainer.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"trainer.mixed_precision={cfg.trainer.mixed_precision!r}: use no, bf16 or fp16")
    if int(cfg.trainer.batch_size) < 1:
        raise ConfigError("trainer.batch_size must be >= 1")
    if int(cfg.trainer.val_interval) < 1:
        raise ConfigError("trainer.val_interval must be >= 1 (steps between validations)")
    centroids = cfg.dataset.get("normal_centroids", None)
    if centroids not in (None, "kmeans", "nyud", "pascal_context"):
        raise ConfigError(
            f"dataset.normal_centroids={centroids!r}: use kmeans (computed from the training split) "
            "or a published set of the original, nyud or pascal_context"
        )
