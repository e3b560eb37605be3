"""The last steps of a pipeline: normalise, pad, ignore regions, to tensor — one by one, or fused.

:class:`Normalize`, :class:`PadToSize`, :class:`IgnoreRegions` and :class:`ToTensor` are the
straightforward steps; :class:`NormalizePadToTensor` does all four in one pass with the same values
(what :func:`~atrc_exp.data.transforms.build_train_transform` and ``build_val_transform`` use).
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

    def pad_value(self, key: str) -> float:
        t = self.tasks.get(key)
        return 0.0 if t is None else t.kind.pad_value

    def is_int(self, key: str) -> bool:
        t = self.tasks.get(key)
        return t is not None and t.kind.integer_labels

    def zero_is_ignore(self, key: str) -> bool:
        t = self.tasks.get(key)
        return t is not None and t.kind.zero_is_ignore

    def needs_foreground(self, key: str) -> bool:
        """A map without any class > 0 is all ignore (``ignore_without_foreground``: human parts)."""
        t = self.tasks.get(key)
        return t is not None and bool(t.options.get("ignore_without_foreground", False))

    def keys_where(self, flag: str, sample: Sample) -> list[str]:
        """The keys of ``sample`` whose task's kind has ``flag`` set (e.g. ``flip_negates_x``)."""
        return [k for k in sample if k in self.tasks and getattr(self.tasks[k].kind, flag)]


class Normalize:
    """``(image - mean) / std`` (ImageNet statistics in the 0..255 range by default) → float32.

    A uint8 image goes through a per-channel look-up table holding the same float32 results."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self._inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
        grey = _GREY.astype(np.float32)[:, None]
        #: 256×C float32: the normalised value of each grey level per channel.
        self.lut = np.ascontiguousarray((grey - self.mean) * self._inv_std)
        self.channel_luts = [np.ascontiguousarray(self.lut[:, c]) for c in range(self.lut.shape[1])]

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        img = sample["image"]
        c = img.shape[2] if img.ndim == 3 else 1
        if img.dtype == np.uint8 and c == len(self.mean) and c <= 4:
            out["image"] = cv2.LUT(img, self.lut.reshape(256, 1, c)).reshape(img.shape)
            return out
        img = np.array(img, dtype=np.float32)  # a copy
        img -= self.mean
        img *= self._inv_std
        out["image"] = img
        return out


class PadToSize:
    """Pad up to ``size`` (H, W) with each kind's pad value, the input in the centre (⌊ΔH/2⌋ rows above,
    ⌊ΔW/2⌋ columns to the left, the rest below / to the right); nothing is cut along a dimension
    where the input is larger."""

    def __init__(self, size: Sequence[int], tasks=None):
        self.size = (int(size[0]), int(size[1]))
        self.rules = LabelRules(tasks)

    def __call__(self, sample: Sample) -> Sample:
        h, w = sample["image"].shape[:2]
        ph, pw = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if ph == 0 and pw == 0:
            return sample
        top, left = pad_offsets((h, w), (h + ph, w + pw))
        out = dict(sample)
        for k in _dense_keys(sample):
            arr = sample[k]
            pad = ((top, ph - top), (left, pw - left)) + ((0, 0),) * (arr.ndim - 2)
            out[k] = np.pad(arr, pad, constant_values=self.rules.pad_value(k))
        return out


class IgnoreRegions:
    """Mark invalid targets with 255: maps of kinds where 0 means no label (normals of zero norm,
    all channels; depth 0), and the whole map of a task with ``ignore_without_foreground`` when it
    shows no class > 0 (human parts: no person in the image or in the crop, or a person without
    part annotations — the original's ``AddIgnoreRegions``; padding, already 255, does not count)."""

    def __init__(self, tasks=None):
        self.rules = LabelRules(tasks)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for k in _dense_keys(sample):
            if self.rules.needs_foreground(k) and not _has_parts(sample[k]):
                out[k] = np.full(sample[k].shape, IGNORE_INDEX, sample[k].dtype)
            elif self.rules.zero_is_ignore(k):
                v = sample[k].astype(np.float32, copy=False)
                zero = (v == 0).all(axis=-1) if v.ndim == 3 else v == 0
                if zero.any():
                    v = v.copy()
                    v[zero] = IGNORE_INDEX
                out[k] = v
        return out


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


class ToTensor:
    """HWC numpy → the batch tensors of :mod:`atrc_exp.tasks` (CHW, int64 class maps)."""

    def __init__(self, tasks=None):
        self.rules = LabelRules(tasks)

    def __call__(self, sample: Sample) -> dict:
        out: dict = {}
        for k, v in sample.items():
            if k == "meta":
                out[k] = v
            elif self.rules.is_int(k):
                out[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))
            else:
                arr = v if v.ndim == 3 else v[..., None]
                out[k] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))
        return out


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
    """:class:`Normalize`, :class:`PadToSize`, :class:`IgnoreRegions` (``ignore_regions=True``) and
    :class:`ToTensor` in one pass: every target is written at most once, straight into a
    preallocated tensor of the padded size (CHW float32; int64 class maps), with the same values as
    the four steps in that order — padding with each kind's pad value (the input in the centre, as
    :class:`PadToSize`), then zero-norm normals and zero depth (padding included) → 255, a
    human-parts map without a part → all 255.

    The image may be uint8 (per-channel look-up table) or float; any map may be a (flipped) view.
    A map that needs neither padding nor a change (contiguous, already of the output dtype, no
    ignore region) becomes a tensor sharing its memory, as :class:`ToTensor` does.
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
        self.normalize = Normalize(mean, std)
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
            elif self.rules.is_int(k):
                if self.ignore_regions and self.rules.needs_foreground(k) and not _has_parts(v):
                    out[k] = torch.full((H, W), IGNORE_INDEX, dtype=torch.int64)
                elif (h, w) == (H, W) and v.dtype == np.int64 and _adoptable(v):
                    out[k] = torch.from_numpy(v)
                else:
                    t = torch.empty((H, W), dtype=torch.int64)
                    a = t.numpy()
                    _fill_border(a, top, left, h, w, self.rules.pad_value(k))
                    np.copyto(a[win], v, casting="unsafe")
                    out[k] = t
            else:
                out[k] = self._float_map(k, v, H, W, win)
        return out

    def _image(self, img: np.ndarray, H: int, W: int, win: tuple[slice, slice]) -> torch.Tensor:
        h, w = img.shape[:2]
        nz = self.normalize
        c = img.shape[2] if img.ndim == 3 else 0
        if c != len(nz.mean) or c > 4 or img.dtype not in (np.uint8, np.float32):
            return self._float_map("image", nz({"image": img})["image"], H, W, win)
        t = torch.empty((c, H, W), dtype=torch.float32)
        a = t.numpy()
        _fill_border(a, win[0].start, win[1].start, h, w, 0.0)
        body = [a[i][win] for i in range(c)]
        if img.dtype == np.uint8:  # uint8 planes through the per-channel tables, into the tensor
            for i, p in enumerate(cv2.split(img)):
                r = cv2.LUT(p, nz.channel_luts[i], dst=body[i])
                if not np.may_share_memory(r, body[i]):  # (cv2 wrote elsewhere: copy it in)
                    body[i][...] = r
        else:  # float32 planes into the tensor, then (x - mean) * (1 / std) in place, as Normalize
            _split_into(img, body)
            for i, b in enumerate(body):
                np.subtract(b, nz.mean[i], out=b)
                b *= nz._inv_std[i]
        return t

    def _float_map(self, k: str, v: np.ndarray, H: int, W: int, win: tuple[slice, slice]) -> torch.Tensor:
        h, w = v.shape[:2]
        ignore = self.ignore_regions and self.rules.zero_is_ignore(k)
        if v.ndim == 2 and (h, w) == (H, W) and v.dtype == np.float32 and _adoptable(v):
            zero = _zero_vectors(v[None]) if ignore else None
            if zero is not None:
                v = np.where(zero, np.float32(IGNORE_INDEX), v)
            return torch.from_numpy(v[None])
        chw = v[None] if v.ndim == 2 else v.transpose(2, 0, 1)
        t = torch.empty((chw.shape[0], H, W), dtype=torch.float32)
        a = t.numpy()
        _fill_border(a, win[0].start, win[1].start, h, w, IGNORE_INDEX if ignore else self.rules.pad_value(k))
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
