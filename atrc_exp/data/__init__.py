"""Datasets, transforms, auxiliary targets and the synthetic generator.

``prepare_data(cfg)`` makes sure the data exists (generating the synthetic dataset on first use),
``build_datasets(cfg, data_dir)`` returns the train and validation datasets and
``normal_centroids(cfg, data_dir)`` the 40 normal centroids of the aux normals target. The
dataset layouts (reader class and everything else layout-specific) are the rows of
:data:`~atrc_exp.data.layouts.LAYOUTS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import config_tasks, resolve_data_dir
from ..task_kinds import Task
from .layouts import LAYOUTS, Layout, ensure_synthetic_dataset, get_layout
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
    "depth_range",
    "normal_centroids",
    "prepare_data",
    "resolve_task_constants",
]


def prepare_data(cfg: DictConfig, progress: bool = True) -> Path:
    """Return the data folder for ``cfg``, generating the synthetic dataset there if needed.

    Call it on the main process first (the generator is also safe under concurrency). An unknown
    ``dataset.layout`` is a ``ConfigError`` that lists the known ones.
    """
    get_layout(str(cfg.dataset.layout), where=f"dataset={cfg.dataset.name}: ")
    data_dir = resolve_data_dir(cfg)
    if str(cfg.dataset.name).startswith("synthetic") or "generator" in cfg.dataset:  # the embedded ones
        g = {k: int(cfg.dataset.generator[k]) for k in ("n_train", "n_val", "height", "width", "seed")}
        ensure_synthetic_dataset(data_dir, **g, progress=progress, layout=str(cfg.dataset.layout))
    return data_dir


def _make(cfg: DictConfig, data_dir: Path, split: str, tasks: list, transform):
    """The reader of ``cfg.dataset.layout`` for one split (``ConfigError`` for an unknown layout)."""
    ds = cfg.dataset
    spec = get_layout(str(ds.layout), where=f"dataset={ds.name}: ")
    return spec.reader(data_dir, split, tasks, transform=transform, **spec.reader_kwargs(cfg))


def build_datasets(cfg: DictConfig, data_dir: Path | None = None):
    """Train and validation datasets for the configured dataset and tasks (their kinds say what
    the transforms do with each label). Validation pads to the crop size, or to what the layout
    says (the folder dataset: the split's largest image, rounded up to a multiple of 32)."""
    data_dir = data_dir or resolve_data_dir(cfg)
    ds = cfg.dataset
    tasks = config_tasks(cfg)
    crop = list(ds.crop_size)
    aug = ds.augment
    ratio_task = aug.get("cat_max_ratio_task")
    train_tf = build_train_transform(
        crop, aug.scale_range, aug.flip, aug.photometric, float(aug.cat_max_ratio), ratio_task, tasks
    )
    val = _make(cfg, data_dir, ds.val_split, tasks, None)
    val.transform = build_val_transform(get_layout(str(ds.layout)).val_size(val, crop), tasks=tasks)
    return _make(cfg, data_dir, ds.train_split, tasks, train_tf), val


def resolve_task_constants(cfg: DictConfig, tasks: list[Task], data_dir: Path | None = None) -> list[Task]:
    """``tasks`` with the constants their aux losses need taken from the data where the spec leaves
    them open: a normals task's ``centroids`` (a published set's, or k-means of the training labels,
    :func:`normal_centroids`) and a depth task's ``range`` (the training labels' 1st–99th
    percentile, :func:`depth_range`)."""
    out = []
    for t in tasks:
        if "centroids" in t.kind.options and isinstance(t.options.get("centroids"), str):
            t = t.with_options(centroids=normal_centroids(cfg, data_dir, task=t).numpy())
        if "range" in t.kind.options and t.options.get("range") is None:
            t = t.with_options(range=depth_range(cfg, t, data_dir))
        out.append(t)
    return out


def _training_labels(cfg: DictConfig, data_dir: Path | None, task: Task, max_images: int):
    """``(cache key, labels)``: ``labels()`` yields ``task``'s labels of up to ``max_images`` evenly
    spaced training images; the key names the dataset, its split list and those images."""
    reader = _make(cfg, Path(data_dir or resolve_data_dir(cfg)), cfg.dataset.train_split, [task], None)
    n = len(reader)
    idx = sorted({int(i) for i in torch.linspace(0, n - 1, min(n, max_images)).round().tolist()})
    sf = reader.split_file.stat()
    key = {
        "name": f"{cfg.dataset.name}_{cfg.dataset.layout}_{task.name}",
        "root": str(reader.root.resolve()),
        "split": cfg.dataset.train_split,
        "split_list": f"{sf.st_size}:{sf.st_mtime_ns}",
        "images": len(idx),
        "normals_valid": [int(c) for c in getattr(reader, "normals_valid_classes", [])],
    }
    return key, lambda: (reader.load_raw(i)[task.name] for i in idx)


def normal_centroids(
    cfg: DictConfig, data_dir: Path | None = None, *, max_images: int = 500, task: Task | None = None
) -> torch.Tensor:
    """The 40 normal centroids (40×3 float32 unit vectors) of a normals task's aux target (default:
    the dataset's first normals task), as its ``centroids`` option says: the name of a published
    set (``nyud``, ``pascal_context``: the original's, shipped with the package), a list of rows,
    or ``kmeans``: k-means over normals sampled from up to ``max_images`` images (evenly spaced)
    of the training split, cached in ``paths.cache_dir/normal_centroids/``. Raises
    :class:`DataError` when the dataset has no normals or names an unknown set."""
    from .targets import cached_normal_centroids, published_normal_centroids

    ds = cfg.dataset
    if task is None:
        normals = [t for t in config_tasks(cfg, list(ds.task_specs)) if "centroids" in t.kind.options]
        if not normals:
            raise DataError(f"dataset={ds.name} has no normals task, so no normal centroids")
        task = normals[0]
    choice = task.options.get("centroids") or "kmeans"
    if not isinstance(choice, str):
        return torch.as_tensor(np.asarray(choice, np.float32))
    if choice != "kmeans":
        try:
            return torch.from_numpy(published_normal_centroids(choice))
        except ValueError as e:
            raise DataError(f"task {task.name!r}, centroids: {e}") from None
    key, labels = _training_labels(cfg, data_dir, task, max_images)
    return torch.from_numpy(cached_normal_centroids(Path(str(cfg.paths.cache_dir)), key, labels))


def depth_range(
    cfg: DictConfig, task: Task, data_dir: Path | None = None, *, max_images: int = 500
) -> list[float]:
    """``[min, max]`` (metres) of a depth task's aux bins from its training labels: the 1st and
    99th percentile of the labelled depths of up to ``max_images`` images (evenly spaced), cached in
    ``paths.cache_dir/depth_ranges/`` as the normal centroids are."""
    from .targets import cached_array, depth_label_range

    key, labels = _training_labels(cfg, data_dir, task, max_images)

    def compute() -> np.ndarray:
        rng = depth_label_range(labels())
        if rng.size == 0:
            raise DataError(
                f"task {task.name!r}: no labelled depth in the training split, so no range for its aux "
                f"bins; give it as `range: [min, max]` (metres)"
            )
        return rng

    cache_dir = Path(str(cfg.paths.cache_dir))
    return [float(x) for x in cached_array(cache_dir, "depth_ranges", key, (2,), compute)]
