"""Colour renderings of inputs, targets and predictions (uint8 H×W×3 RGB arrays).

Used by the W&B panels and ``atrc-predict`` through each task kind's row
(:data:`atrc_exp.task_kinds.TASK_KINDS`); ignore pixels (255) render black.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .tasks import IGNORE_INDEX


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour palette, ``n``×3 uint8."""
    i = np.arange(n)
    pal = np.zeros((n, 3), np.uint8)
    for j in range(8):  # bit j of channel c is bit 3j + c of the index, from the top bit down
        for c in range(3):
            pal[:, c] |= ((i >> (3 * j + c)) & 1).astype(np.uint8) << (7 - j)
    return pal


_PALETTE = palette()


def argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """Class scores B×K×H×W → class indices B×H×W."""
    return logits.float().argmax(1)


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """B×3×H×W → L2-normalised B×3×H×W."""
    return F.normalize(x.float(), dim=1)


def to_uint8_prob(prob: np.ndarray) -> np.ndarray:
    """Probability map in [0, 1] → uint8 0..255 as written to a PNG: ``uint8(255·p)``, truncated
    as the original's cast (0.5 → 127, 1 → 255), the product in the map's own float precision
    (float32 maps in float32; other inputs in float64)."""
    p = np.asarray(prob)
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    return (np.clip(p, 0, 1) * p.dtype.type(255)).astype(np.uint8)


def _plane(value: np.ndarray) -> np.ndarray:
    return value[0] if value.ndim == 3 else value


def colorize_classes(value: np.ndarray) -> np.ndarray:
    """Class indices (H×W or 1×H×W) → VOC palette colours; 255 (no label) black."""
    lab = _plane(value).astype(np.int64)
    out = _PALETTE[np.clip(lab, 0, 255)].copy()
    out[lab == IGNORE_INDEX] = 0
    return out


def colorize_normals(value: np.ndarray) -> np.ndarray:
    """Unit normals (3×H×W or H×W×3) → RGB ``(n + 1)·127.5``; 255 (no label) black."""
    n = value.transpose(1, 2, 0) if value.ndim == 3 and value.shape[0] == 3 else value
    invalid = np.all(n == IGNORE_INDEX, axis=-1)
    out = ((np.clip(n, -1, 1) + 1) * 127.5).astype(np.uint8)
    out[invalid] = 0
    return out


def _labelled_plane(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 plane with 0 where there is no label, mask of the no-label pixels)``."""
    v0 = _plane(value)
    invalid = v0 == IGNORE_INDEX
    return np.where(invalid, 0, v0).astype(np.float32), invalid


def colorize_depth(value: np.ndarray) -> np.ndarray:
    """Depth (H×W or 1×H×W, metres) → viridis scaled to the map's maximum; 255 (no label) black."""
    v, invalid = _labelled_plane(value)
    vmax = max(float(v.max()), 1e-6)
    gray = (255 * v / vmax).astype(np.uint8)
    out = cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    out[invalid] = 0
    return out


def colorize_probability(value: np.ndarray) -> np.ndarray:
    """Probabilities or 0/1 labels (H×W or 1×H×W) → grey levels; 255 (no label) black."""
    v, invalid = _labelled_plane(value)
    gray = (255 * np.clip(v, 0, 1)).astype(np.uint8)
    out = np.repeat(gray[..., None], 3, axis=-1)
    out[invalid] = 0
    return out


def legend(names: list[str], height: int) -> np.ndarray:
    """A column of palette swatches with the class names (RGB uint8, ``height`` rows)."""
    row, width = 16, 12 + 8 * max([len(n) for n in names] + [4]) + 8
    out = np.full((max(height, row * len(names) + 4), width, 3), 255, np.uint8)
    for i, name in enumerate(names):
        y = 2 + i * row
        out[y : y + row - 3, 2:12] = _PALETTE[i]
        cv2.putText(out, name, (16, y + row - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return out[: max(height, row * len(names) + 4)]
