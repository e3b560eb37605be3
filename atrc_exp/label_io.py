"""Reading label files: :class:`DataError` and the decoders every reader shares, and the per-kind
readers of the folder dataset format (``labels/<task>/<id>.png | .npy``), each returning its kind's
raw label convention (:mod:`atrc_exp.data.transforms`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tasks import IGNORE_INDEX


class DataError(RuntimeError):
    """Missing or malformed data; the message names the file and what to do."""


def _where(listed_in: Path | str) -> str:
    return f" (listed in {listed_in})" if listed_in else ""


def read_label_png(path: Path, split_file: Path | str = "", keep_channels: bool = False) -> np.ndarray:
    """A label PNG as uint8/uint16 H×W: palette PNGs give their indices (as PIL reads them in the
    original loaders), grey PNGs their values; an RGB PNG its first channel (all three channels,
    H×W×3, with ``keep_channels``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if keep_channels and im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"unreadable label {path}{_where(split_file)}: {e}") from e
    if arr.ndim == 3 and not keep_channels:
        arr = arr[..., 0]
    if keep_channels and arr.ndim == 3:
        arr = arr[..., :3]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def read_npy(path: Path, split_file: Path | str = "") -> np.ndarray:
    """A ``.npy`` label file as float32 (a :class:`DataError` naming the file if unreadable)."""
    try:
        return np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"unreadable file {path}{_where(split_file)}: {e}") from e


def _check_2d(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {what} must be an H×W map, got shape {arr.shape}")
    return arr


def read_class_map(path: Path, num_classes: int) -> np.ndarray:
    """Segmentation: a PNG (or ``.npy``) of class indices 0..K-1, 255 = no label → int64 H×W."""
    raw = read_npy(path) if path.suffix == ".npy" else read_label_png(path)
    raw = _check_2d(raw, path, "a class map")
    if raw.dtype.kind == "f":
        raw = np.where(np.isfinite(raw), raw, IGNORE_INDEX)
        if (raw != np.round(raw)).any():
            raise DataError(f"{path}: class indices must be integers")
    lab = raw.astype(np.int64)
    bad = ((lab < 0) | (lab >= num_classes)) & (lab != IGNORE_INDEX)
    if bad.any():
        raise DataError(
            f"{path}: class index {int(lab[bad].max() if (lab[bad] >= 0).any() else lab[bad].min())} "
            f"outside 0..{num_classes - 1} (and not 255 = no label): the task has {num_classes} classes"
        )
    return lab


def read_depth(path: Path) -> np.ndarray:
    """Depth: ``.npy`` float32 metres (NaN or ≤ 0 = no label) or a 16-bit PNG in millimetres
    (0 = no label) → float32 H×W metres with 0 = no label."""
    if path.suffix == ".npy":
        d = _check_2d(read_npy(path), path, "depth")
    else:
        raw = _check_2d(read_label_png(path), path, "depth")
        if raw.dtype != np.uint16:
            raise DataError(f"{path}: a depth PNG must be 16-bit (millimetres), got {raw.dtype}")
        d = raw.astype(np.float32) / 1000.0
    d = np.where(np.isfinite(d) & (d > 0), d, np.float32(0)).astype(np.float32)
    return d


def read_normals(path: Path) -> np.ndarray:
    """Normals: ``.npy`` float32 H×W×3 unit vectors (NaN = no label) or an RGB PNG with
    n = 2v/255 − 1 ((0, 0, 0) = no label) → float32 H×W×3, the zero vector = no label."""
    if path.suffix == ".npy":
        n = read_npy(path)
        if n.ndim != 3 or n.shape[2] != 3:
            raise DataError(f"{path}: normals must be H×W×3, got shape {n.shape}")
        n = np.where(np.isfinite(n).all(axis=2, keepdims=True), n, np.float32(0)).astype(np.float32)
        return n
    raw = read_label_png(path, keep_channels=True)
    if raw.ndim != 3:
        raise DataError(f"{path}: a normals PNG must be RGB, got shape {raw.shape}")
    missing = (raw == 0).all(axis=2, keepdims=True)
    n = raw.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return np.where(missing, np.float32(0), n).astype(np.float32)


def read_edge(path: Path) -> np.ndarray:
    """Edges: a PNG (or ``.npy``), non-zero = edge → float32 H×W in {0, 1}."""
    raw = read_npy(path) if path.suffix == ".npy" else read_label_png(path)
    raw = _check_2d(raw, path, "an edge map")
    return (raw != 0).astype(np.float32)


def read_saliency(path: Path) -> np.ndarray:
    """Saliency: a PNG, > 127 = salient (or ``.npy`` with values in [0, 1], > 0.5) → int64 H×W 0/1."""
    if path.suffix == ".npy":
        raw = _check_2d(read_npy(path), path, "a saliency map")
        return (raw > 0.5).astype(np.int64)
    raw = _check_2d(read_label_png(path), path, "a saliency map")
    return (raw > 127).astype(np.int64)
