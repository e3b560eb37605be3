"""NYUD-v2 reader for the published ``NYUD_MT`` layout.

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
from torch.utils.data import Dataset

from ..label_io import DataError, read_label_png  # noqa: F401  (DataError: re-exported)
from ..tasks import IGNORE_INDEX

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


def _read_split(root: Path, split: str) -> list[str]:
    split_file = root / "gt_sets" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(
            f"split list {split_file} not found: expected the NYUD_MT layout (images/, segmentation/, "
            f"depth/, normals/, edge/, gt_sets/{{train,val}}.txt) under {root}. Get it with "
            f"`atrc-data fetch --dataset nyud --dest <paths.data_dir>` so that <paths.data_dir>/NYUD_MT/ "
            f"exists, or use dataset=synthetic"
        )
    names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    if not names:
        raise DataError(f"split list {split_file} is empty")
    return names


class NYUDMT(Dataset):
    """One split of NYUD_MT. Items are transformed samples (see :mod:`atrc_exp.data.transforms`).

    Args:
        data_dir: the folder that holds ``NYUD_MT/``.
        split: ``train`` or ``val`` (a file ``gt_sets/<split>.txt``).
        tasks: the tasks to load (:class:`~atrc_exp.task_kinds.Task` objects or names, a subset of
            :data:`NYUD_TASK_FILES`).
        transform: applied to the raw sample dict; ``None`` returns raw numpy arrays.
        num_classes: number of semseg classes; labels above it are an error.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        tasks: Sequence,
        transform: Callable | None = None,
        num_classes: int = 40,
    ):
        self.root = require_layout_dir(data_dir, "NYUD_MT", "nyud")
        tasks = [getattr(t, "name", t) for t in tasks]
        unknown = [t for t in tasks if t not in NYUD_TASK_FILES]
        if unknown:
            raise DataError(f"NYUD-v2 has no task(s) {unknown}; it has {list(NYUD_TASK_FILES)}")
        self.split = split
        self.tasks = list(tasks)
        self.transform = transform
        self.num_classes = num_classes
        self.split_file = self.root / "gt_sets" / f"{split}.txt"
        self.names = _read_split(self.root, split)

    def __len__(self) -> int:
        return len(self.names)

    def _path(self, folder: str, name: str, ext: str) -> Path:
        p = self.root / folder / f"{name}{ext}"
        if not p.is_file():
            raise DataError(f"missing file {p} (listed in {self.split_file})")
        return p

    def _load_npy(self, p: Path) -> np.ndarray:
        try:
            arr = np.load(p).astype(np.float32)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"unreadable file {p} (listed in {self.split_file}): {e}") from e
        bad = ~np.isfinite(arr)
        if bad.any():  # missing measurements: 0 marks them ignore (NormalizePadToTensor)
            arr[bad] = 0.0
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
        h, w = image.shape[:2]
        sample = {"image": image}
        read = {"semseg": self._semseg, "normals": self._normals, "depth": self._map, "edge": self._map}
        for task in self.tasks:
            folder, ext = NYUD_TASK_FILES[task]
            p = self._path(folder, name, ext)
            arr = read[task](p)
            if arr.shape[:2] != (h, w):
                raise DataError(
                    f"{p}: size {arr.shape[:2]} differs from its image {img_path} ({h}, {w}) "
                    f"(listed in {self.split_file})"
                )
            sample[task] = arr
        sample["meta"] = {"name": name, "size": (h, w)}
        return sample

    def __getitem__(self, index: int) -> dict:
        sample = self.load_raw(index)
        return self.transform(sample) if self.transform is not None else sample
