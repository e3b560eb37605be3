"""Composable sample transforms for multi-task dense data.

A *sample* is a dict of numpy arrays in HWC layout as a reader returns it:
``image`` uint8 H×W×3 RGB (float32 in [0, 255] is accepted too, through slower float paths,
until :class:`PhotometricDistortion` truncates it to uint8); class maps int64 H×W; ``depth``/``edge``
float32 H×W; ``normals`` float32 H×W×3; plus ``meta`` (a dict, untouched). Transforms never modify
their input arrays in place; an output array may be a view of an input one.
:class:`NormalizePadToTensor` (:mod:`atrc_exp.data.to_tensor`) turns a sample into the batch
conventions of :mod:`atrc_exp.tasks`.

Random transforms take an optional ``rng`` (a ``np.random.Generator``, or anything with its
``random`` / ``uniform`` / ``integers``); without one they draw from torch's RNG (:class:`TorchDraws`).

Invariants: labels are never interpolated (nearest), depth is divided by the scale factor,
a horizontal flip negates the x component of normals, only the image is changed photometrically
(on a uint8 image, truncating after every step, as the original), padding puts the image in the
centre of the crop. ``reference_train_steps`` in ``tests/reference_pipeline.py`` states the same
pipeline step by step as plain code; both give identical samples for the same draws.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch

from ..tasks import IGNORE_INDEX
from .to_tensor import _GREY, IMAGENET_MEAN, IMAGENET_STD, LabelRules, NormalizePadToTensor, _dense_keys

Sample = dict


class TorchDraws:
    """Uniform draws from torch's default generator, fetched 16 at a time, behind the three
    ``np.random.Generator`` methods the transforms use: it follows ``torch.manual_seed`` and the
    DataLoader workers' seeds, without seeding a numpy generator from torch on every call."""

    __slots__ = ("_buf", "_i")

    def __init__(self) -> None:
        self._buf: list[float] = []
        self._i = 0

    def random(self) -> float:
        """Uniform in [0, 1) (53-bit float64)."""
        if self._i == len(self._buf):
            self._buf, self._i = torch.rand(16, dtype=torch.float64).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, low: int, high: int) -> int:
        """Uniform in ``low .. high-1``."""
        return low + min(int((high - low) * self.random()), high - low - 1)


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


def class_ratio_ok(seg: np.ndarray, cat_max_ratio: float) -> bool:
    """MMSegmentation's crop criterion: at least two classes (ignore excluded) and none covering
    ``cat_max_ratio`` or more of the labelled pixels."""
    flat = np.asarray(seg).ravel()
    cnt = None
    if flat.size and flat.dtype.kind in "iu" and flat.max() < 65536:
        try:
            cnt = np.bincount(flat, minlength=IGNORE_INDEX + 1)
        except (TypeError, ValueError):  # negative labels, uint64
            pass
        else:
            cnt[IGNORE_INDEX] = 0
            cnt = cnt[cnt > 0]
    if cnt is None:
        labels, cnt = np.unique(flat, return_counts=True)
        cnt = cnt[labels != IGNORE_INDEX]
    return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


def _nearest_index(n_src: int, n_dst: int, start: int, length: int) -> np.ndarray:
    """Source indices of destination pixels ``start .. start+length-1`` when ``cv2.resize`` maps
    ``n_src`` pixels to ``n_dst`` with ``INTER_NEAREST`` (``floor(x / (n_dst / n_src))``)."""
    inv = 1.0 / (n_dst / n_src)
    idx = np.floor(np.arange(start, start + length) * inv).astype(np.intp)
    return np.minimum(idx, n_src - 1)


def _nearest_map(rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """The ``cv2.remap`` map (``CV_16SC2``: len(rows)×len(cols)×2 int16 x, y) that gathers
    ``arr[rows][:, cols]``; ``None`` where an index does not fit in int16."""
    if rows.size == 0 or cols.size == 0 or max(rows.max(), cols.max()) >= 32768 or sys.byteorder != "little":
        return None
    packed = (rows.astype(np.int32)[:, None] << 16) | cols.astype(np.int32)[None]  # y high, x low half
    return packed.view(np.int16).reshape(len(rows), len(cols), 2)


#: The dtype that cv2.remap (INTER_NEAREST) and cv2.flip move values of each item size as (bit-exact).
_REMAP_VIEW = {1: np.uint8, 2: np.uint16, 4: np.float32, 8: np.float64}


def _cv2_view(arr: np.ndarray) -> np.ndarray | None:
    """``arr`` viewed as the same-size uint/float items that cv2 moves bit for bit (H×W or H×W×C,
    C ≤ 4), or ``None``."""
    chans = 1 if arr.ndim == 2 else arr.shape[2] if arr.ndim == 3 else 0
    view = _REMAP_VIEW.get(arr.dtype.itemsize)
    if 1 <= chans <= 4 and view is not None and arr.dtype.kind in "biuf":
        return arr.view(view)
    return None


def _gather(
    arr: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    nmap: np.ndarray | None = None,
    whole: tuple[int, int] | None = None,
) -> np.ndarray:
    """``arr[rows][:, cols]`` as a new contiguous array: ``cv2.resize(INTER_NEAREST)`` to ``whole``
    (W, H) when the rows and columns are those of the whole resized map, else ``cv2.remap`` with
    ``nmap`` (:func:`_nearest_map`), else two ``np.take`` passes (rows, then columns)."""
    src = _cv2_view(arr)
    if src is not None and (whole is not None or nmap is not None):
        if whole is not None:
            res = cv2.resize(src, whole, interpolation=cv2.INTER_NEAREST)
        else:
            res = cv2.remap(src, nmap, None, cv2.INTER_NEAREST)
        return res.reshape(len(rows), len(cols), *arr.shape[2:]).view(arr.dtype)
    a = np.take(arr, rows, 0)
    if a.ndim == 2:
        return np.take(a, cols, 1)
    c = int(np.prod(a.shape[2:]))
    idx = (cols[:, None] * c + np.arange(c)).ravel()
    return np.take(a.reshape(a.shape[0], -1), idx, 1).reshape(len(rows), len(cols), *a.shape[2:])


class RandomScaleCrop:
    """Rescale by a factor drawn from ``scale_range``, then crop to ``crop_size`` at a random position
    (MMSeg's class-ratio rule on ``ratio_task``: up to ``MAX_TRIES`` positions checked, then one more
    taken as it is), fused: labels are resampled only inside the crop window.

    Same draws and the same output as the two steps one after the other (``scale+crop`` of
    ``tests/reference_pipeline.py``): the factor ``s`` uniform in ``scale_range``,
    the rescaled size ``round(h·s) × round(w·s)``, crop positions uniform in it. Labels are gathered
    with the index arrays of ``cv2.resize(INTER_NEAREST)`` (bit-identical to resize-then-crop),
    depth is divided by ``s``; the image is ``cv2.resize(INTER_LINEAR)`` of the whole image in
    float32 (as the original, which reads images as float32: the values are not rounded), then
    cropped (a view into that resized array).
    """

    MAX_TRIES = 10

    def __init__(self, scale_range, crop_size, cat_max_ratio=0.75, rng=None, ratio_task=None, tasks=None):
        self.ratio_task = ratio_task
        self.rules = LabelRules(tasks)
        self.lo, self.hi = float(scale_range[0]), float(scale_range[1])
        self.size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.rng = rng

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or TorchDraws()
        s = float(rng.uniform(self.lo, self.hi))
        h, w = sample["image"].shape[:2]
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        ch, cw = min(self.size[0], sh), min(self.size[1], sw)

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))

        whole = (sw, sh) if (ch, cw) == (sh, sw) else None  # the crop is the whole rescaled map

        def window(y0: int, x0: int) -> tuple:
            rows, cols = _nearest_index(h, sh, y0, ch), _nearest_index(w, sw, x0, cw)
            return rows, cols, (None if whole else _nearest_map(rows, cols))

        y0, x0 = draw()
        rows, cols, nmap = window(y0, x0)
        seg_crop = None  # the accepted crop of the ratio task's class map, reused below
        if self.cat_max_ratio < 1.0 and self.ratio_task in sample:
            pos = None  # (a position drawn again gets the same verdict: no need to look twice)
            for i in range(self.MAX_TRIES + 1):
                if i:
                    y0, x0 = draw()
                if (y0, x0) != pos:
                    if pos is not None:
                        rows, cols, nmap = window(y0, x0)
                    seg = _gather(sample[self.ratio_task], rows, cols, nmap, whole)
                    seg_crop, pos, ok = seg, (y0, x0), None
                if i == self.MAX_TRIES:
                    break
                if ok is None:
                    ok = class_ratio_ok(seg_crop, self.cat_max_ratio)
                if ok:
                    break
        out = dict(sample)
        for k in _dense_keys(sample):
            arr = sample[k]
            if k == "image":
                res = cv2.resize(arr.astype(np.float32, copy=False), (sw, sh), interpolation=cv2.INTER_LINEAR)
                if arr.ndim == 3 and res.ndim == 2:
                    res = res[..., None]
                out[k] = res[y0 : y0 + ch, x0 : x0 + cw]
            elif k == self.ratio_task and seg_crop is not None:
                out[k] = seg_crop
            else:
                out[k] = _gather(arr, rows, cols, nmap, whole)
        for k in self.rules.keys_where("scale_divides_values", out):
            out[k] = _divide_valid_depth(out[k], s)
        return out


def _divide_valid_depth(d: np.ndarray, s: float) -> np.ndarray:
    """``d / s`` where ``d > 0`` and ``d != 255`` (float32), in place (``d`` is a fresh array)."""
    d = d.astype(np.float32, copy=False)
    s32 = np.float32(s)
    if d.size and d.min() >= 0 and d.max() < IGNORE_INDEX:  # (NaN fails both) only 0 is invalid: 0/s = 0
        np.divide(d, s32, out=d)
    else:
        np.divide(d, s32, out=d, where=(d > 0) & (d != IGNORE_INDEX))
    return d


class RandomHorizontalFlip:
    """Flip left-right with probability ``p``; the x component of normals changes sign.

    The image and normals are flipped into new contiguous arrays (``cv2.flip``, which moves values
    bit for bit, as same-size uint/float items); the other maps become reversed views, copied once
    where they are copied anyway (:class:`NormalizePadToTensor`).
    """

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None, tasks=None):
        self.p = p
        self.rng = rng
        self.rules = LabelRules(tasks)

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or TorchDraws()
        if rng.random() >= self.p:
            return sample
        out = dict(sample)
        negate = self.rules.keys_where("flip_negates_x", sample)
        for k in _dense_keys(sample):
            out[k] = _flip_lr(sample[k]) if k == "image" or k in negate else sample[k][:, ::-1]
        for k in negate:
            n = out[k]
            if np.may_share_memory(n, sample[k]):  # (a view)
                n = n.copy()
            n[..., 0] *= -1
            out[k] = n
        return out


def _flip_lr(arr: np.ndarray) -> np.ndarray:
    src = _cv2_view(arr)
    return arr[:, ::-1] if src is None else cv2.flip(src, 1).reshape(arr.shape).view(arr.dtype)


def _affine_table(a: float, b: float) -> np.ndarray:
    """The uint8 look-up table of one brightness / contrast step, ``x ↦ uint8(clip(x·a + b, 0, 255))``
    over the 256 grey levels: float32 arithmetic (``a``, ``b`` rounded to float32), clipped, then
    truncated to uint8 — the original's ``convert``."""
    return np.clip(_GREY.astype(np.float32) * np.float32(a) + np.float32(b), 0, 255).astype(np.uint8)


class PhotometricDistortion:
    """Random brightness, contrast, saturation and hue on a uint8 image (MMSegmentation's
    ``PhotoMetricDistortion``, as the original uses it). Image only.

    The image is cast to uint8 first (a float image is truncated, as the original's
    ``astype(np.uint8)``). Then, each with probability 0.5 and each ending in a uint8 image:

    * brightness: ``x + b``, ``b ~ U(−32, 32)``;
    * contrast (first, or last: probability 0.5 each): ``x · a``, ``a ~ U(0.5, 1.5)``;
    * saturation: OpenCV RGB→HSV, the S channel ``· a``, ``a ~ U(0.5, 1.5)``, HSV→RGB;
    * hue: OpenCV RGB→HSV, ``H ← (H + k) mod 180`` (H in 0…179), ``k`` an integer in [−18, 17],
      HSV→RGB;

    every affine step computed in float32, clipped to [0, 255] and truncated to uint8 (a pixel
    250, brightness +20 → 255, then contrast ×0.6 → 153). The output image is always uint8.

    Speed: consecutive brightness / contrast steps are one composed 256-entry table applied with
    ``cv2.LUT``; the S and H changes are tables on the HSV image (one conversion round trip per
    step, as the original) — the same values as computing each step on the whole image.
    """

    #: Brightness offset range, contrast / saturation factor range, hue shift: ``k`` in
    #: ``[-HUE_DELTA, HUE_DELTA - 1]`` (numpy's ``randint(-18, 18)`` of the original).
    BRIGHTNESS_DELTA = 32
    CONTRAST_RANGE = (0.5, 1.5)
    SATURATION_RANGE = (0.5, 1.5)
    HUE_DELTA = 18

    def __init__(self, rng: np.random.Generator | None = None):
        self.rng = rng

    def _draw(self, rng: np.random.Generator) -> dict:
        """The random parameters, drawn in the original's order (brightness, the contrast mode,
        contrast if first, saturation, hue, contrast if last); ``None`` for a step that is skipped."""
        p: dict = dict.fromkeys(("brightness", "contrast_first", "saturation", "hue", "contrast_last"))
        if rng.random() < 0.5:
            p["brightness"] = float(rng.uniform(-self.BRIGHTNESS_DELTA, self.BRIGHTNESS_DELTA))
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            p["contrast_first"] = float(rng.uniform(*self.CONTRAST_RANGE))
        if rng.random() < 0.5:
            p["saturation"] = float(rng.uniform(*self.SATURATION_RANGE))
        if rng.random() < 0.5:
            p["hue"] = int(rng.integers(-self.HUE_DELTA, self.HUE_DELTA))
        if not contrast_first and rng.random() < 0.5:
            p["contrast_last"] = float(rng.uniform(*self.CONTRAST_RANGE))
        return p

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng or TorchDraws()
        p = self._draw(rng)
        img = sample["image"]
        if img.dtype != np.uint8:
            img = img.astype(np.uint8)  # the original's cast: truncation
        out = dict(sample)
        out["image"] = self._apply(img, p)
        return out

    @staticmethod
    def _apply(img: np.ndarray, p: dict) -> np.ndarray:
        """``p``'s steps on the uint8 image ``img`` (never changed in place); uint8 result."""
        lut = None  # the composed table of the brightness / contrast steps not applied yet
        for key, v in p.items():  # (in the order of the steps)
            if v is None:
                continue
            channel = {"saturation": 1, "hue": 0}.get(key)  # the HSV channel it changes
            if key == "hue":
                table = ((_GREY.astype(np.int64) + v) % 180).astype(np.uint8)
            else:
                table = _affine_table(1.0, v) if key == "brightness" else _affine_table(v, 0.0)
            if channel is None:
                lut = table if lut is None else table[lut]
                continue
            if lut is not None:
                img, lut = cv2.LUT(img, lut), None
            hsv_table = np.stack([_GREY, _GREY, _GREY], -1)
            hsv_table[:, channel] = table
            hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), hsv_table.reshape(256, 1, 3))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return img if lut is None else cv2.LUT(img, lut)


def build_train_transform(
    crop_size: Sequence[int],
    scale_range=(0.5, 2.0),
    flip=True,
    photometric=True,
    cat_max_ratio: float = 0.75,
    ratio_task: str | None = None,
    tasks=None,
):
    """The training pipeline: scale + crop (the class-ratio rule on ``ratio_task``; fused,
    :class:`RandomScaleCrop`), flip, photometric (uint8), then normalise, pad (image in the centre)
    and ignore regions (fused, :class:`NormalizePadToTensor`). ``tasks``: the samples' tasks (their
    kinds say what each step does to a label; ``None``: the paper's named tasks)."""
    steps: list = [RandomScaleCrop(scale_range, crop_size, cat_max_ratio, ratio_task=ratio_task, tasks=tasks)]
    if flip:
        steps.append(RandomHorizontalFlip(0.5, tasks=tasks))
    if photometric:
        steps.append(PhotometricDistortion())
    steps.append(NormalizePadToTensor(crop_size, tasks=tasks))
    return Compose(steps)


def build_val_transform(crop_size: Sequence[int], tasks=None):
    """The validation pipeline: normalise, pad to ``crop_size`` (image in the centre), ignore
    regions (fused)."""
    return Compose([NormalizePadToTensor(crop_size, tasks=tasks)])


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation (:class:`NormalizePadToTensor`) for a C×H×W or B×C×H×W
    tensor → float in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(-1, 1, 1)
    return (image.float() * std + mean).clamp(0, 255)
