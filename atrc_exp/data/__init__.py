"""Datasets, transforms and the synthetic generator.

``build_datasets(cfg)`` is what the engine calls: it makes sure the data exists (generating the
synthetic dataset on first use) and returns the train and validation datasets.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..config import ConfigError, resolve_data_dir
from .nyud import NYUDMT, DataError
from .transforms import build_train_transform, build_val_transform

__all__ = ["NYUDMT", "DataError", "build_datasets", "prepare_data"]


def prepare_data(cfg: DictConfig, progress: bool = True) -> Path:
    """Return the data folder for ``cfg``, generating the synthetic dataset there if needed.

    Call it on the main process first (the generator is also safe under concurrency).
    """
    data_dir = resolve_data_dir(cfg)
    if cfg.dataset.name == "synthetic":
        from .synthetic import ensure_synthetic_dataset

        g = cfg.dataset.generator
        ensure_synthetic_dataset(
            data_dir,
            n_train=int(g.n_train),
            n_val=int(g.n_val),
            height=int(g.height),
            width=int(g.width),
            seed=int(g.seed),
            progress=progress,
        )
    return data_dir


def build_datasets(cfg: DictConfig, data_dir: Path | None = None):
    """Train and validation datasets for the configured dataset and tasks."""
    data_dir = data_dir or resolve_data_dir(cfg)
    ds = cfg.dataset
    tasks = list(cfg.tasks.names)
    crop = list(ds.crop_size)
    aug = ds.augment
    train_tf = build_train_transform(crop, aug.scale_range, aug.flip, aug.photometric)
    val_tf = build_val_transform(crop)
    if ds.layout == "NYUD_MT":
        kw = dict(tasks=tasks, num_classes=int(ds.num_semseg_classes))
        return (
            NYUDMT(data_dir, ds.train_split, transform=train_tf, **kw),
            NYUDMT(data_dir, ds.val_split, transform=val_tf, **kw),
        )
    raise ConfigError(
        f"dataset={ds.name} ({ds.layout} layout) has no reader yet; available now: synthetic, nyud"
    )
