"""NYUD-v2 reader for the published ``NYUD_MT`` layout.

``<data_dir>/NYUD_MT/``::

    images/<name>.jpg          RGB image
    segmentation/<name>.png    uint8 labels 1..K (0 = unlabelled) -> 0..K-1, 0 -> 255
    depth/<name>.npy           float32 H×W, metres (0 = missing)
    normals/<name>.npy         float32 H×W×3 unit normals (zero vector = missing)
    edge/<name>.npy            float32 H×W in {0, 1}
    gt_sets/{train,val}.txt    one name per line

The embedded synthetic dataset is written in this layout too, so both go through this reader.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from ..tasks import IGNORE_INDEX

#: Folder and file extension of every NYUD task.
NYUD_TASK_FILES = {
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
    "edge": ("edge", ".npy"),
}


class DataError(RuntimeError):
    """Missing or malformed data; the message names the file and what to do."""


def _read_split(root: Path, split: str) -> list[str]:
    split_file = root / "gt_sets" / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(
            f"split list {split_file} not found: expected the NYUD_MT layout (images/, segmentation/, "
            f"depth/, normals/, edge/, gt_sets/{{train,val}}.txt) under {root}. Get NYUD_MT.tgz "
            f"(see `atrc-data fetch`), unpack it in paths.data_dir, or use dataset=synthetic"
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
        tasks: the tasks to load (subset of :data:`NYUD_TASK_FILES`).
        transform: applied to the raw sample dict; ``None`` returns raw numpy arrays.
        num_classes: number of semseg classes; labels above it are an error.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable | None = None,
        num_classes: int = 40,
    ):
        self.root = Path(data_dir) / "NYUD_MT"
        if not self.root.is_dir():
            raise DataError(
                f"{self.root} does not exist: paths.data_dir must be the folder that contains NYUD_MT/ "
                f"(got {data_dir}). Fetch the NYUD_MT archive and unpack it there, or use dataset=synthetic"
            )
        unknown = [t for t in tasks if t not in NYUD_TASK_FILES]
        if unknown:
            raise DataError(f"NYUD-v2 has no task(s) {unknown}; it has {list(NYUD_TASK_FILES)}")
        self.split = split
        self.tasks = list(tasks)
        self.transform = transform
        self.num_classes = num_classes
        self.names = _read_split(self.root, split)

    def __len__(self) -> int:
        return len(self.names)

    def _path(self, folder: str, name: str, ext: str) -> Path:
        p = self.root / folder / f"{name}{ext}"
        if not p.is_file():
            raise DataError(f"missing file {p} (listed in gt_sets/{self.split}.txt)")
        return p

    def _load_npy(self, p: Path) -> np.ndarray:
        try:
            return np.load(p).astype(np.float32)
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable file {p}: {e}") from e

    def load_raw(self, index: int) -> dict:
        """The untransformed sample: numpy arrays in HWC layout plus ``meta``."""
        name = self.names[index]
        img_path = self._path("images", name, ".jpg")
        img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"unreadable image {img_path}")
        image = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)
        h, w = image.shape[:2]
        sample = {"image": image}
        for task in self.tasks:
            folder, ext = NYUD_TASK_FILES[task]
            p = self._path(folder, name, ext)
            if task == "semseg":
                raw = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                if raw is None:
                    raise DataError(f"unreadable label {p}")
                if raw.ndim == 3:
                    raw = raw[..., 0]
                if raw.max(initial=0) > self.num_classes:
                    raise DataError(f"{p}: label {raw.max()} > {self.num_classes} classes")
                lab = raw.astype(np.int64) - 1
                lab[raw == 0] = IGNORE_INDEX
                arr = lab
            elif task == "normals":
                arr = self._load_npy(p)
                if arr.ndim != 3 or arr.shape[2] != 3:
                    raise DataError(f"{p}: normals must be H×W×3, got {arr.shape}")
            else:
                arr = self._load_npy(p)
                if arr.ndim == 3:
                    arr = arr[..., 0]
            if arr.shape[:2] != (h, w):
                raise DataError(f"{p}: size {arr.shape[:2]} differs from its image {img_path} ({h}, {w})")
            sample[task] = arr
        sample["meta"] = {"name": name, "size": (h, w)}
        return sample

    def __getitem__(self, index: int) -> dict:
        sample = self.load_raw(index)
        return self.transform(sample) if self.transform is not None else sample
