"""Datasets, transforms, auxiliary targets and the synthetic generator.

``prepare_data(cfg)`` makes sure the data exists (generating the synthetic dataset on first use),
``build_datasets(cfg, data_dir)`` returns the train and validation datasets and
``normal_centroids(cfg, data_dir)`` the 40 normal centroids of the aux normals target. The
dataset layouts (reader class and everything else layout-specific) are the rows of
:data:`~atrc_exp.data.layouts.LAYOUTS`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import resolve_data_dir
from .layouts import LAYOUTS, Layout, get_layout
from .nyud import NYUDMT, DataError
from .pascal import PASCALMT
from .transforms import build_train_transform, build_val_transform

__all__ = [
    "LAYOUTS",
    "NYUDMT",
    "PASCALMT",
    "DataError",
    "Layout",
    "build_datasets",
    "get_layout",
    "normal_centroids",
    "prepare_data",
]


def is_synthetic(ds_cfg: DictConfig) -> bool:
    """True for the embedded synthetic datasets (they carry ``generator`` settings)."""
    return str(ds_cfg.name).startswith("synthetic") or "generator" in ds_cfg


def prepare_data(cfg: DictConfig, progress: bool = True) -> Path:
    """Return the data folder for ``cfg``, generating the synthetic dataset there if needed.

    Call it on the main process first (the generator is also safe under concurrency). An unknown
    ``dataset.layout`` is a ``ConfigError`` that lists the known ones.
    """
    get_layout(str(cfg.dataset.layout), where=f"dataset={cfg.dataset.name}: ")
    data_dir = resolve_data_dir(cfg)
    if is_synthetic(cfg.dataset):
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
            layout=str(cfg.dataset.layout),
        )
    return data_dir


def _make(cfg: DictConfig, data_dir: Path, split: str, tasks: list[str], transform):
    """The reader of ``cfg.dataset.layout`` for one split (``ConfigError`` for an unknown layout)."""
    ds = cfg.dataset
    spec = get_layout(str(ds.layout), where=f"dataset={ds.name}: ")
    return spec.reader(
        data_dir,
        split,
        tasks,
        transform=transform,
        num_classes=int(ds.num_semseg_classes),
        **spec.reader_kwargs(cfg),
    )


def build_datasets(cfg: DictConfig, data_dir: Path | None = None):
    """Train and validation datasets for the configured dataset and tasks."""
    data_dir = data_dir or resolve_data_dir(cfg)
    ds = cfg.dataset
    tasks = list(cfg.tasks.names)
    crop = list(ds.crop_size)
    aug = ds.augment
    train_tf = build_train_transform(
        crop, aug.scale_range, aug.flip, aug.photometric, cat_max_ratio=float(aug.get("cat_max_ratio", 0.75))
    )
    val_tf = build_val_transform(crop)
    return (
        _make(cfg, data_dir, ds.train_split, tasks, train_tf),
        _make(cfg, data_dir, ds.val_split, tasks, val_tf),
    )


def normal_centroids(cfg: DictConfig, data_dir: Path | None = None, *, max_images: int = 500) -> torch.Tensor:
    """The 40 normal centroids (40×3 float32 unit vectors) of the aux normals target, as
    ``dataset.normal_centroids`` says: the name of a published set (``nyud``, ``pascal_context``:
    the original's, shipped with the package), or ``kmeans``: k-means over normals sampled from up
    to ``max_images`` images (evenly spaced) of the training split, cached in
    ``paths.cache_dir/normal_centroids/``. Raises :class:`DataError` when the dataset has no
    normals or names an unknown set."""
    from .targets import cached_normal_centroids, published_normal_centroids

    ds = cfg.dataset
    if "normals" not in ds.tasks:
        raise DataError(f"dataset={ds.name} has no normals, so no normal centroids")
    choice = str(ds.get("normal_centroids", None) or "kmeans")
    if choice != "kmeans":
        try:
            return torch.from_numpy(published_normal_centroids(choice))
        except ValueError as e:
            raise DataError(f"dataset.normal_centroids: {e}") from None
    data_dir = Path(data_dir or resolve_data_dir(cfg))
    reader = _make(cfg, data_dir, ds.train_split, ["normals"], None)
    n = len(reader)
    idx = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_images)).round().tolist()})
    sf = reader.split_file.stat()
    key = {
        "name": f"{ds.name}_{ds.layout}",
        "root": str(reader.root.resolve()),
        "split": ds.train_split,
        "split_list": f"{sf.st_size}:{sf.st_mtime_ns}",
        "images": len(idx),
        "normals_valid": [int(c) for c in getattr(reader, "normals_valid_classes", [])],
    }
    cent = cached_normal_centroids(
        Path(str(cfg.paths.cache_dir)), key, lambda: (reader.load_raw(i)["normals"] for i in idx), seed=0
    )
    return torch.from_numpy(cent)
