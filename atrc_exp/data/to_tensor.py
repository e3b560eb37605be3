"""The last steps of a pipeline — normalise, pad, ignore regions, to tensor — in one pass:
:class:`NormalizePadToTensor` (what :func:`~atrc_exp.data.transforms.build_train_transform` and
``build_val_transform`` end with; ``tests/reference_pipeline.py`` states the four steps one by one).
Samples follow the conventions of :mod:`atrc_exp.data.transforms`.

Padding puts the image in the **centre** of the padded maps, as the original does:
⌊ΔH/2⌋ rows above, ⌊ΔW/2⌋ columns to the left, the rest below and to the right
(:func:`atrc_exp.tasks.pad_offsets`; :func:`atrc_exp.tasks.crop_center` undoes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import cv2
import numpy as np
import torch

from ..task_kinds import Task, tasks_by_name
from ..tasks import IGNORE_INDEX, pad_offsets

Sample = dict
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

_GREY = np.arange(256, dtype=np.uint8)  # the 256 grey levels, input of the look-up tables


def _dense_keys(sample: Sample) -> list[str]:
    return [k for k in sample if k != "meta"]


class LabelRules:
    """What the transforms do with each key of a sample, from its task's kind
    (:data:`~atrc_exp.task_kinds.TASK_KINDS`): ``tasks`` are the tasks of the samples (``None``: the
    paper's named tasks). Keys that are not tasks (the image) are float maps padded with 0."""

    def __init__(self, tasks: Mapping[str, Task] | Iterable[Task] | None = None):
        self.tasks = tasks_by_name(tasks)

    def kind_attr(self, key: str, name: str, default=False):
        """The attribute ``name`` of the kind of ``key``'s task (``default`` for a key that is no task)."""
        t = self.tasks.get(key)
        return default if t is None else getattr(t.kind, name)

    def needs_foreground(self, key: str) -> bool:
        """A map without any class > 0 is all ignore (``ignore_without_foreground``: human parts)."""
        t = self.tasks.get(key)
        return t is not None and bool(t.options.get("ignore_without_foreground", False))

    def keys_where(self, flag: str, sample: Sample) -> list[str]:
        """The keys of ``sample`` whose task's kind has ``flag`` set (e.g. ``flip_negates_x``)."""
        return [k for k in sample if self.kind_attr(k, flag)]


def _has_parts(hp: np.ndarray) -> bool:
    """Whether a human-parts map shows a part: a value > 0 other than 255."""
    if hp.size == 0:
        return False
    hi = hp.max()
    if 0 < hi < IGNORE_INDEX or hi <= 0:  # (one pass for the usual maps)
        return bool(hi > 0)
    if hp.min() == hi:  # constant: all 255, or all some value > 255
        return bool(hi != IGNORE_INDEX)
    return bool(((hp > 0) & (hp != IGNORE_INDEX)).any())


def _zero_vectors(planes: np.ndarray) -> np.ndarray | None:
    """Mask of the pixels where every plane of ``planes`` (C×H×W) is 0, or ``None`` if there is
    none (the first plane alone when it has no 0)."""
    zero = planes[0] == 0
    if not zero.any():
        return None
    for c in range(1, planes.shape[0]):
        zero &= planes[c] == 0
    return zero if zero.any() else None


def _adoptable(a: np.ndarray) -> bool:
    """Whether ``torch.from_numpy`` can take ``a`` as it is (C-contiguous, writeable, native order)."""
    return a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative


def _fill_border(a: np.ndarray, top: int, left: int, h: int, w: int, value: float) -> None:
    """Set everything of ``a`` (…×H×W) outside its ``h×w`` block at ``(top, left)`` to ``value``."""
    a[..., :top, :] = value
    a[..., top + h :, :] = value
    a[..., top : top + h, :left] = value
    a[..., top : top + h, left + w :] = value


class NormalizePadToTensor:
    """Normalise, pad, ignore regions (``ignore_regions=True``), to tensor, in one pass: every target
    is written at most once, straight into a preallocated tensor of the padded size (CHW float32;
    int64 class maps), with the values of the four steps in that order —

    1. the image ``(image - mean) / std`` in float32 (ImageNet statistics in the 0..255 range by
       default; computed as ``(x - mean) · float32(1 / std)``);
    2. padding up to ``size`` (H, W) with each kind's pad value, the input in the centre (⌊ΔH/2⌋ rows
       above, ⌊ΔW/2⌋ columns to the left; nothing is cut along a dimension where it is larger);
    3. zero-norm normals and zero depth (padding included) → 255, a human-parts map without a part
       (``ignore_without_foreground``) → all 255;
    4. CHW tensors (int64 class maps).

    The image may be uint8 (per-channel look-up table of the same float32 values) or float; any map
    may be a (flipped) view. A map that needs neither padding nor a change (contiguous, already of
    the output dtype, no ignore region) becomes a tensor sharing its memory.
    """

    def __init__(
        self,
        size: Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_regions: bool = True,
        tasks=None,
    ):
        self.size = (int(size[0]), int(size[1]))
        self.mean = np.asarray(mean, np.float32)
        self.inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
        #: per channel, the normalised float32 value of each of the 256 grey levels
        self.channel_luts = [
            np.ascontiguousarray((_GREY.astype(np.float32) - m) * s) for m, s in zip(self.mean, self.inv_std)
        ]
        self.ignore_regions = ignore_regions
        self.rules = LabelRules(tasks)

    def __call__(self, sample: Sample) -> dict:
        h, w = sample["image"].shape[:2]
        H, W = max(self.size[0], h), max(self.size[1], w)
        top, left = pad_offsets((h, w), (H, W))
        win = (slice(top, top + h), slice(left, left + w))  # where the input goes
        out: dict = {}
        for k, v in sample.items():
            if k == "meta":
                out[k] = v
            elif k == "image":
                out[k] = self._image(v, H, W, win)
            elif self.rules.kind_attr(k, "integer_labels"):
                if self.ignore_regions and self.rules.needs_foreground(k) and not _has_parts(v):
                    out[k] = torch.full((H, W), IGNORE_INDEX, dtype=torch.int64)
                elif (h, w) == (H, W) and v.dtype == np.int64 and _adoptable(v):
                    out[k] = torch.from_numpy(v)
                else:
                    t = torch.empty((H, W), dtype=torch.int64)
                    a = t.numpy()
                    _fill_border(a, top, left, h, w, self.rules.kind_attr(k, "pad_value", 0.0))
                    np.copyto(a[win], v, casting="unsafe")
                    out[k] = t
            else:
                out[k] = self._float_map(k, v, H, W, win)
        return out

    def _image(self, img: np.ndarray, H: int, W: int, win: tuple[slice, slice]) -> torch.Tensor:
        h, w = img.shape[:2]
        c = img.shape[2] if img.ndim == 3 else 0
        if c != len(self.mean) or c > 4 or img.dtype not in (np.uint8, np.float32):
            img = np.array(img, dtype=np.float32)  # a copy
            img -= self.mean
            img *= self.inv_std
            return self._float_map("image", img, H, W, win)
        t = torch.empty((c, H, W), dtype=torch.float32)
        a = t.numpy()
        _fill_border(a, win[0].start, win[1].start, h, w, 0.0)
        body = [a[i][win] for i in range(c)]
        if img.dtype == np.uint8:  # uint8 planes through the per-channel tables, into the tensor
            for i, p in enumerate(cv2.split(img)):
                r = cv2.LUT(p, self.channel_luts[i], dst=body[i])
                if not np.may_share_memory(r, body[i]):  # (cv2 wrote elsewhere: copy it in)
                    body[i][...] = r
        else:  # float32 planes into the tensor, then (x - mean) * (1 / std) in place
            _split_into(img, body)
            for i, b in enumerate(body):
                np.subtract(b, self.mean[i], out=b)
                b *= self.inv_std[i]
        return t

    def _float_map(self, k: str, v: np.ndarray, H: int, W: int, win: tuple[slice, slice]) -> torch.Tensor:
        h, w = v.shape[:2]
        ignore = self.ignore_regions and self.rules.kind_attr(k, "zero_is_ignore")
        if v.ndim == 2 and (h, w) == (H, W) and v.dtype == np.float32 and _adoptable(v):
            zero = _zero_vectors(v[None]) if ignore else None
            if zero is not None:
                v = np.where(zero, np.float32(IGNORE_INDEX), v)
            return torch.from_numpy(v[None])
        chw = v[None] if v.ndim == 2 else v.transpose(2, 0, 1)
        t = torch.empty((chw.shape[0], H, W), dtype=torch.float32)
        a = t.numpy()
        pad = IGNORE_INDEX if ignore else self.rules.kind_attr(k, "pad_value", 0.0)
        _fill_border(a, win[0].start, win[1].start, h, w, pad)
        body = a[(slice(None), *win)]
        if v.ndim == 3 and 1 < v.shape[2] <= 4 and v.dtype == np.float32 and v.strides[1] > 0:
            _split_into(v, list(body))  # (cv2's deinterleave: twice as fast as a transposing copy)
        else:
            np.copyto(body, chw, casting="unsafe")
        zero = _zero_vectors(body) if ignore else None  # normals: all channels zero
        if zero is not None:
            for c in range(body.shape[0]):
                body[c][zero] = IGNORE_INDEX
        return t


def _split_into(src: np.ndarray, planes: list[np.ndarray]) -> None:
    """The channels of an H×W×C array into C preallocated H×W planes (views are fine)."""
    got = cv2.split(src, planes)
    for g, p in zip(got, planes):
        if not np.may_share_memory(g, p):  # (cv2 allocated new planes: copy them in)
            np.copyto(p, g, casting="unsafe")
