"""NYUD-v2 reader for the published ``NYUD_MT`` layout, and the base of the published layouts' readers.

``<data_dir>/NYUD_MT/``::

    images/<name>.jpg          RGB image
    segmentation/<name>.png    uint8 labels 1..K (0 = unlabelled) -> 0..K-1, 0 -> 255
    depth/<name>.npy           float32 H×W, metres (0 = missing)
    normals/<name>.npy         float32 H×W×3 unit normals (zero vector = missing)
    edge/<name>.npy            float32 H×W in {0, 1}
    gt_sets/{train,val}.txt    one name per line

The embedded synthetic dataset is written in this layout too, so both go through this reader.
Its row in :data:`atrc_exp.data.layouts.LAYOUTS` holds the rest (published sizes, archive, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from ..label_io import DataError, read_label_png, read_npy
from ..tasks import IGNORE_INDEX
from .folder import SplitDataset

#: Folder and file extension of every NYUD task.
NYUD_TASK_FILES = {
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
    "edge": ("edge", ".npy"),
}


def read_image(path: Path, split_file: Path | str = "") -> np.ndarray:
    """An RGB image as uint8 H×W×3 (OpenCV decode, BGR → RGB); the transforms keep it uint8 as long
    as they can (see :mod:`atrc_exp.data.transforms`)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        where = f" (listed in {split_file})" if split_file else ""
        raise DataError(f"unreadable image {path}{where}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def require_layout_dir(data_dir: str | Path, layout: str, dataset: str) -> Path:
    """``data_dir/layout`` if it exists and is not empty, else a :class:`DataError` saying how to get it."""
    root = Path(data_dir) / layout
    if not root.is_dir() or not any(root.iterdir()):
        raise DataError(
            f"{root} does not exist or is empty: paths.data_dir must be the folder that contains "
            f"{layout}/ (got {data_dir}). Download it with `atrc-data fetch --dataset {dataset} --dest "
            f"{data_dir}`, or use dataset=synthetic"
        )
    return root


class LayoutReader(SplitDataset):
    """One split of a published layout ``data_dir/<LAYOUT>/``, whose split lists are
    ``<SPLIT_DIR>/<split>.txt`` and whose other folders are ``FOLDERS``; ``tasks`` (task objects
    or names) are a subset of ``TASKS``."""

    NAME, LAYOUT, DATASET, SPLIT_DIR, FOLDERS, UNPACK = "", "", "", "", "", ""
    TASKS: Sequence[str] = ()

    def __init__(self, data_dir: str | Path, split: str, tasks: Sequence, transform: Callable | None = None):
        self.root = require_layout_dir(data_dir, self.LAYOUT, self.DATASET)
        self.tasks = [getattr(t, "name", t) for t in tasks]
        unknown = [t for t in self.tasks if t not in self.TASKS]
        if unknown:
            raise DataError(f"{self.NAME} has no task(s) {unknown}; it has {list(self.TASKS)}")
        self.split = split
        self.transform = transform
        self.split_file = self.root / self.SPLIT_DIR / f"{split}.txt"
        if not self.split_file.is_file():
            raise DataError(
                f"split list {self.split_file} not found: expected the {self.LAYOUT} layout ({self.FOLDERS}, "
                f"{self.SPLIT_DIR}/{{train,val}}.txt) under {self.root}. Get it with `atrc-data fetch "
                f"--dataset {self.DATASET} --dest <paths.data_dir>`{self.UNPACK} so that "
                f"<paths.data_dir>/{self.LAYOUT}/ exists, or use dataset=synthetic"
            )
        self.names = [ln.strip() for ln in self.split_file.read_text().splitlines() if ln.strip()]
        if not self.names:
            raise DataError(f"split list {self.split_file} is empty")

    def _path(self, folder: str, name: str, ext: str) -> Path:
        p = self.root / folder / f"{name}{ext}"
        if not p.is_file():
            raise DataError(f"missing file {p} (listed in {self.split_file})")
        return p

    def _check_size(self, arr: np.ndarray, p: Path, img_path: Path, hw: tuple[int, int]) -> None:
        if arr.shape[:2] != hw:
            where = f"(listed in {self.split_file})"
            raise DataError(f"{p}: size {arr.shape[:2]} differs from its image {img_path} {hw} {where}")


class NYUDMT(LayoutReader):
    """One split of NYUD_MT (``split``: ``train`` or ``val``); ``num_classes``: semseg classes,
    labels above it are an error."""

    NAME, LAYOUT, DATASET, SPLIT_DIR = "NYUD-v2", "NYUD_MT", "nyud", "gt_sets"
    FOLDERS = "images/, segmentation/, depth/, normals/, edge/"
    TASKS = tuple(NYUD_TASK_FILES)

    def __init__(self, data_dir, split, tasks, transform=None, num_classes: int = 40):
        super().__init__(data_dir, split, tasks, transform)
        self.num_classes = num_classes

    def _load_npy(self, p: Path) -> np.ndarray:
        arr = read_npy(p, self.split_file)
        arr[~np.isfinite(arr)] = 0.0  # missing measurements: 0 marks them ignore (NormalizePadToTensor)
        return arr

    def _semseg(self, p: Path) -> np.ndarray:
        """Labels 1..K -> 0..K-1; 0 (unlabelled) and 255 -> ignore."""
        raw = read_label_png(p, self.split_file)
        bad = (raw > self.num_classes) & (raw != IGNORE_INDEX)
        if bad.any():
            raise DataError(
                f"{p}: label {int(raw[bad].max())} > {self.num_classes} classes (listed in {self.split_file})"
            )
        lab = raw.astype(np.int64) - 1
        lab[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
        return lab

    def _normals(self, p: Path) -> np.ndarray:
        arr = self._load_npy(p)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DataError(f"{p}: normals must be H×W×3, got {arr.shape} (listed in {self.split_file})")
        return arr

    def _map(self, p: Path) -> np.ndarray:
        arr = self._load_npy(p)
        return arr[..., 0] if arr.ndim == 3 else arr

    def load_raw(self, index: int) -> dict:
        """The untransformed sample: numpy arrays in HWC layout plus ``meta``."""
        name = self.names[index]
        img_path = self._path("images", name, ".jpg")
        image = read_image(img_path, self.split_file)
        hw = image.shape[:2]
        sample = {"image": image}
        read = {"semseg": self._semseg, "normals": self._normals, "depth": self._map, "edge": self._map}
        for task in self.tasks:
            folder, ext = NYUD_TASK_FILES[task]
            p = self._path(folder, name, ext)
            sample[task] = read[task](p)
            self._check_size(sample[task], p, img_path, hw)
        sample["meta"] = {"name": name, "size": hw}
        return sample
