"""Composable sample transforms for multi-task dense data.

A *sample* is a dict of numpy arrays in HWC layout as a reader returns it:
``image`` float32 H×W×3 RGB in [0, 255]; ``semseg``/``human_parts``/``sal`` int64 H×W;
``depth``/``edge`` float32 H×W; ``normals`` float32 H×W×3; plus ``meta`` (a dict, untouched).
:class:`ToTensor` turns it into the batch conventions of :mod:`atrc_exp.tasks`.

Invariants: labels are never interpolated (nearest), depth is divided by the scale factor,
a horizontal flip negates the x component of normals, only the image is changed photometrically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

from ..tasks import IGNORE_INDEX

Sample = dict
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

#: Fill value of each key when padding.
PAD_VALUES = {
    "image": 0.0,
    "semseg": IGNORE_INDEX,
    "human_parts": IGNORE_INDEX,
    "sal": IGNORE_INDEX,
    "edge": IGNORE_INDEX,
    "normals": 0.0,  # zero norm -> ignore in IgnoreRegions
    "depth": 0.0,  # 0 -> ignore in IgnoreRegions
}
_LABEL_KEYS = ("semseg", "human_parts", "sal", "edge", "depth", "normals")


def torch_seeded_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG, so augmentation follows ``torch.manual_seed`` and
    DataLoader workers' per-worker seeds (reproducible runs, no shared numpy state across workers)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


def _dense_keys(sample: Sample) -> list[str]:
    return [k for k in sample if k != "meta"]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


class RandomScale:
    """Rescale by a factor drawn uniformly from ``scale_range``.

    Image: bilinear; every label: nearest; depth values are divided by the factor (an object seen
    larger is nearer).
    """

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), rng: np.random.Generator | None = None):
        self.lo, self.hi = float(scale_range[0]), float(scale_range[1])
        self.rng = rng

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or torch_seeded_rng()
        s = float(rng.uniform(self.lo, self.hi))
        h, w = sample["image"].shape[:2]
        size = (max(1, round(w * s)), max(1, round(h * s)))  # cv2 wants (W, H)
        out = dict(sample)
        for k in _dense_keys(sample):
            interp = cv2.INTER_LINEAR if k == "image" else cv2.INTER_NEAREST
            arr = sample[k]
            res = cv2.resize(arr, size, interpolation=interp)
            if arr.ndim == 3 and res.ndim == 2:
                res = res[..., None]
            out[k] = res
        if "depth" in out:
            d = out["depth"]
            valid = (d > 0) & (d != IGNORE_INDEX)
            out["depth"] = np.where(valid, d / s, d).astype(np.float32)
        return out


class RandomCrop:
    """Crop to ``size`` (H, W) at a random position (no-op along dims already smaller)."""

    def __init__(self, size: Sequence[int], rng: np.random.Generator | None = None):
        self.size = (int(size[0]), int(size[1]))
        self.rng = rng

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or torch_seeded_rng()
        h, w = sample["image"].shape[:2]
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        out = dict(sample)
        for k in _dense_keys(sample):
            out[k] = np.ascontiguousarray(sample[k][y0 : y0 + ch, x0 : x0 + cw])
        return out


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``; the x component of normals changes sign."""

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None):
        self.p = p
        self.rng = rng

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or torch_seeded_rng()
        if rng.random() >= self.p:
            return sample
        out = dict(sample)
        for k in _dense_keys(sample):
            out[k] = np.ascontiguousarray(sample[k][:, ::-1])
        if "normals" in out:
            n = out["normals"].copy()
            n[..., 0] *= -1
            out["normals"] = n
        return out


class PhotometricDistortion:
    """Random brightness (±32), contrast (×[0.5, 1.5]), saturation (×[0.5, 1.5]) and hue (±18°),
    each with probability 0.5, contrast first or last (MMSegmentation's scheme). Image only."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or torch_seeded_rng()
        img = sample["image"].astype(np.float32)
        if rng.random() < 0.5:
            img = img + rng.uniform(-32, 32)
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            img = img * rng.uniform(0.5, 1.5)
        img = np.clip(img, 0, 255)
        hsv = cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if rng.random() < 0.5:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if rng.random() < 0.5:  # OpenCV hue is in [0, 180): ±18 degrees = ±9 units
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-9, 9)) % 180
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        if not contrast_first and rng.random() < 0.5:
            img = np.clip(img * rng.uniform(0.5, 1.5), 0, 255)
        out = dict(sample)
        out["image"] = img
        return out


class Normalize:
    """``(image - mean) / std`` (ImageNet statistics in the 0..255 range by default)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = ((sample["image"].astype(np.float32) - self.mean) / self.std).astype(np.float32)
        return out


class PadToSize:
    """Pad bottom/right up to ``size`` (H, W) with :data:`PAD_VALUES` (larger inputs are kept)."""

    def __init__(self, size: Sequence[int]):
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[:2]
        ph, pw = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if ph == 0 and pw == 0:
            return sample
        out = dict(sample)
        for k in _dense_keys(sample):
            arr = sample[k]
            pad = ((0, ph), (0, pw)) + ((0, 0),) * (arr.ndim - 2)
            out[k] = np.pad(arr, pad, constant_values=PAD_VALUES.get(k, 0))
        return out


class IgnoreRegions:
    """Mark invalid targets with 255: normals of zero norm (all channels), depth 0."""

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        if "normals" in sample:
            n = sample["normals"].astype(np.float32).copy()
            zero = np.linalg.norm(n, axis=-1) == 0
            n[zero] = IGNORE_INDEX
            out["normals"] = n
        if "depth" in sample:
            d = sample["depth"].astype(np.float32).copy()
            d[d == 0] = IGNORE_INDEX
            out["depth"] = d
        return out


class ToTensor:
    """HWC numpy → the batch tensors of :mod:`atrc_exp.tasks` (CHW, int64 class maps)."""

    def __call__(self, sample: Sample) -> dict:
        out: dict = {}
        for k, v in sample.items():
            if k == "meta":
                out[k] = v
            elif k in ("semseg", "human_parts", "sal"):
                out[k] = torch.from_numpy(np.ascontiguousarray(v).astype(np.int64))
            else:
                arr = v if v.ndim == 3 else v[..., None]
                out[k] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32))
        return out


def build_train_transform(crop_size: Sequence[int], scale_range=(0.5, 2.0), flip=True, photometric=True):
    """The training pipeline: scale, crop, flip, photometric, normalise, pad, ignore regions."""
    steps: list = [RandomScale(scale_range), RandomCrop(crop_size)]
    if flip:
        steps.append(RandomHorizontalFlip(0.5))
    if photometric:
        steps.append(PhotometricDistortion())
    steps += [Normalize(), PadToSize(crop_size), IgnoreRegions(), ToTensor()]
    return Compose(steps)


def build_val_transform(crop_size: Sequence[int]):
    """The validation pipeline: normalise, pad to the crop size, ignore regions."""
    return Compose([Normalize(), PadToSize(crop_size), IgnoreRegions(), ToTensor()])


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :class:`Normalize` for a C×H×W or B×C×H×W tensor → float in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(-1, 1, 1)
    return (image.float() * std + mean).clamp(0, 255)
