"""Colour renderings of inputs, targets and predictions (uint8 H×W×3 RGB arrays).

Used by the W&B panels; ignore pixels (255) render black.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .tasks import IGNORE_INDEX


def palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour palette, ``n``×3 uint8."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


_PALETTE = palette()


def postprocess(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Network output (B×C×H×W) → the prediction in target units (B×H×W labels or B×C×H×W maps)."""
    logits = logits.float()
    if task in ("semseg", "human_parts"):
        return logits.argmax(1)
    if task == "sal":
        return logits.softmax(1)[:, 1:2]
    if task == "edge":
        return logits.sigmoid()
    if task == "depth":
        return logits.clamp(min=0)
    if task == "normals":
        return F.normalize(logits, dim=1)
    raise ValueError(f"unknown task {task!r}")


def colorize(task: str, value: np.ndarray, is_target: bool = False) -> np.ndarray:
    """Render a prediction or target of ``task`` (H×W or C×H×W numpy) as RGB uint8."""
    if value.ndim == 3 and task != "normals":
        value = value[0]
    if task in ("semseg", "human_parts"):
        lab = value.astype(np.int64)
        out = _PALETTE[np.clip(lab, 0, 255)].copy()
        out[lab == IGNORE_INDEX] = 0
        return out
    if task == "normals":
        n = value.transpose(1, 2, 0) if value.shape[0] == 3 else value
        invalid = np.all(n == IGNORE_INDEX, axis=-1)
        out = ((np.clip(n, -1, 1) + 1) * 127.5).astype(np.uint8)
        out[invalid] = 0
        return out
    invalid = value == IGNORE_INDEX
    v = np.where(invalid, 0, value).astype(np.float32)
    if task == "depth":
        vmax = max(float(v.max()), 1e-6)
        gray = (255 * v / vmax).astype(np.uint8)
        out = cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)
    else:  # sal, edge: probabilities or 0/1 labels
        gray = (255 * np.clip(v, 0, 1)).astype(np.uint8)
        out = np.repeat(gray[..., None], 3, axis=-1)
    out[invalid] = 0
    return out
