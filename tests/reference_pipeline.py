"""The train pipeline of the spec written out step by step as plain code (no look-up tables, no
fused steps), and reader-like random samples to feed it.

:func:`reference_train_steps` is the test oracle of
:func:`atrc_exp.data.transforms.build_train_transform` (``test_transforms_full.py`` checks that both
give the same samples for the same draws, and that its steps give what the fused ones give:
``scale+crop`` = ``RandomScaleCrop``; ``normalise``, ``pad``, ``ignore regions``, ``to tensor`` =
``NormalizePadToTensor``) and the baseline of ``benchmarks/bench_data.py``. It lives
with the tests, not in the package: nothing at run time needs it, and its job is to state the spec.
``benchmarks/bench_data.py`` imports it from here (it puts this folder on ``sys.path``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from atrc_exp.data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

#: padding of each key (SPEC: image 0, labels 255, depth 0; normals 0 = no label)
PAD_VALUES = {
    "image": 0.0,
    "semseg": 255,
    "human_parts": 255,
    "sal": 255,
    "edge": 255,
    "normals": 0.0,
    "depth": 0.0,
}


def torch_seeded_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG (what a step without ``rng`` draws from: it follows
    ``torch.manual_seed`` and DataLoader workers' per-worker seeds)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


def fake_sample(h: int, w: int, tasks: list[str], num_classes: int, rng: np.random.Generator) -> dict:
    """A reader-like sample (uint8 image, int64 class maps, float32 maps) of random content."""
    s: dict = {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
    blocks = rng.integers(0, num_classes, (h // 40 + 1, w // 40 + 1))
    seg = np.kron(blocks, np.ones((40, 40), np.int64))[:h, :w]
    for t in tasks:
        if t == "semseg":
            s[t] = seg
        elif t == "human_parts":
            s[t] = (seg % 7).astype(np.int64)
        elif t == "sal":
            s[t] = (seg % 2).astype(np.int64)
        elif t == "depth":
            s[t] = rng.uniform(0.5, 10, (h, w)).astype(np.float32)
        elif t == "normals":
            n = rng.normal(size=(h, w, 3)).astype(np.float32)
            s[t] = n / np.linalg.norm(n, axis=-1, keepdims=True)
        elif t == "edge":
            s[t] = (rng.random((h, w)) > 0.95).astype(np.float32)
    s["meta"] = {"name": "bench"}
    return s


def reference_train_steps(
    crop_size, scale_range=(0.5, 2.0), cat_max_ratio: float = 0.75, rng: np.random.Generator | None = None
) -> list[tuple[str, object]]:
    """The train pipeline of the spec, step by step as plain code (no look-up tables, no fused
    steps): the statement that :func:`~atrc_exp.data.transforms.build_train_transform` must equal
    for the same draws (``tests/test_transforms_full.py`` checks it, sample for sample), and the
    baseline ``benchmarks/bench_data.py`` measures the fast pipeline against.
    ``[(step name, fn(sample) -> sample)]``:

    1. scale + crop: ``s ~ U(scale_range)``; the whole sample resized to ``round(h·s)×round(w·s)``
       (``cv2.resize``: the image linear, in float32 as the original reads it; every label
       nearest), depth divided by ``s``; a crop position
       drawn uniformly and re-drawn up to 10 times until no semseg class covers ``cat_max_ratio``
       or more of the crop's labelled pixels, else an 11th one taken as it is;
    2. flip (p 0.5; normals' x negated);
    3. photometric distortion on the image cast to uint8, each step ``uint8(clip(x·a + b))``
       (MMSegmentation's ``PhotoMetricDistortion``, one HSV round trip per colour step);
    4. ImageNet normalisation; 5. padding to the crop size with the image in the centre
       (``PAD_VALUES``); 6. ignore regions; 7. to tensors.

    Without ``rng``, each random step seeds a numpy generator from torch's RNG on every call; with
    one, all steps draw from it in the pipeline's order."""
    given = rng
    lo, hi = float(scale_range[0]), float(scale_range[1])
    size = (int(crop_size[0]), int(crop_size[1]))

    def ratio_ok(seg: np.ndarray) -> bool:
        labels, cnt = np.unique(seg, return_counts=True)
        cnt = cnt[labels != IGNORE_INDEX]
        return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio

    def scale_crop(sample: dict) -> dict:
        rng = given or torch_seeded_rng()
        s = float(rng.uniform(lo, hi))
        h, w = sample["image"].shape[:2]
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        scaled = {}
        for k, arr in sample.items():
            if k == "meta":
                continue
            interp = cv2.INTER_LINEAR if k == "image" else cv2.INTER_NEAREST
            if k == "image":  # the original's images are float32 arrays
                scaled[k] = cv2.resize(arr.astype(np.float32), (sw, sh), interpolation=interp)
                continue
            res = cv2.resize(arr, (sw, sh), interpolation=interp).reshape(sh, sw, *arr.shape[2:])
            scaled[k] = res.astype(arr.dtype)  # (cv2 gives int32 for int64 maps)
        if "depth" in scaled:
            d = scaled["depth"]
            scaled["depth"] = np.where((d > 0) & (d != IGNORE_INDEX), d / np.float32(s), d).astype(np.float32)
        ch, cw = min(size[0], sh), min(size[1], sw)

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))

        y0, x0 = draw()
        if cat_max_ratio < 1.0 and "semseg" in scaled:
            for _ in range(10):
                if ratio_ok(scaled["semseg"][y0 : y0 + ch, x0 : x0 + cw]):
                    break
                y0, x0 = draw()
        out = {k: v[y0 : y0 + ch, x0 : x0 + cw] for k, v in scaled.items()}
        return {**sample, **out}

    def flip(sample: dict) -> dict:
        rng = given or torch_seeded_rng()
        if rng.random() >= 0.5:
            return sample
        out = {k: (v if k == "meta" else v[:, ::-1]) for k, v in sample.items()}
        if "normals" in out:
            n = out["normals"].copy()
            n[..., 0] *= -1
            out["normals"] = n
        return out

    def photometric(sample: dict) -> dict:
        rng = given or torch_seeded_rng()

        def convert(x: np.ndarray, a: float = 1.0, b: float = 0.0) -> np.ndarray:
            return np.clip(x.astype(np.float32) * np.float32(a) + np.float32(b), 0, 255).astype(np.uint8)

        def hsv_step(img: np.ndarray, channel: int, fn) -> np.ndarray:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., channel] = fn(hsv[..., channel])
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

        def contrast(img: np.ndarray) -> np.ndarray:
            return convert(img, a=rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else img

        img = np.ascontiguousarray(sample["image"].astype(np.uint8))  # cast to uint8 (a float: truncated)
        if rng.random() < 0.5:  # brightness
            img = convert(img, b=rng.uniform(-32, 32))
        contrast_first = rng.random() < 0.5
        if contrast_first:
            img = contrast(img)
        if rng.random() < 0.5:  # saturation
            a = rng.uniform(0.5, 1.5)
            img = hsv_step(img, 1, lambda s: convert(s, a=a))
        if rng.random() < 0.5:  # hue
            k = int(rng.integers(-18, 18))
            img = hsv_step(img, 0, lambda h: (h.astype(np.int64) + k) % 180)
        if not contrast_first:
            img = contrast(img)
        return {**sample, "image": img}

    mean = np.asarray(IMAGENET_MEAN, np.float32)
    inv_std = (1.0 / np.asarray(IMAGENET_STD, np.float64)).astype(np.float32)

    def normalize(sample: dict) -> dict:
        img = np.array(sample["image"], dtype=np.float32)
        img -= mean
        img *= inv_std
        return {**sample, "image": img}

    def pad(sample: dict) -> dict:
        h, w = sample["image"].shape[:2]
        ph, pw = max(0, size[0] - h), max(0, size[1] - w)
        top, left = ph // 2, pw // 2  # the image in the centre
        out = dict(sample)
        for k, arr in sample.items():
            if k != "meta":
                p = ((top, ph - top), (left, pw - left)) + ((0, 0),) * (arr.ndim - 2)
                out[k] = np.pad(arr, p, constant_values=PAD_VALUES.get(k, 0))
        return out

    def ignore_regions(sample: dict) -> dict:
        out = dict(sample)
        if "human_parts" in sample:
            hp = sample["human_parts"]
            if not ((hp > 0) & (hp != IGNORE_INDEX)).any():
                out["human_parts"] = np.full(hp.shape, IGNORE_INDEX, hp.dtype)
        if "normals" in sample:
            n = sample["normals"].astype(np.float32, copy=False)
            zero = (n[..., 0] == 0) & (n[..., 1] == 0) & (n[..., 2] == 0)
            if zero.any():
                n = n.copy()
                n[zero] = IGNORE_INDEX
            out["normals"] = n
        if "depth" in sample:
            d = sample["depth"].astype(np.float32, copy=False)
            zero = d == 0
            if zero.any():
                d = np.where(zero, np.float32(IGNORE_INDEX), d)
            out["depth"] = d
        return out

    def to_tensor(sample: dict) -> dict:
        out: dict = {}
        for k, v in sample.items():
            if k == "meta":
                out[k] = v
            elif k in ("semseg", "human_parts", "sal"):
                out[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))
            else:
                arr = v if v.ndim == 3 else v[..., None]
                out[k] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))
        return out

    return [
        ("scale+crop", scale_crop),
        ("flip", flip),
        ("photometric", photometric),
        ("normalise", normalize),
        ("pad", pad),
        ("ignore regions", ignore_regions),
        ("to tensor", to_tensor),
    ]
