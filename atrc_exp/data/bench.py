"""The train-transform benchmark of ``atrc-data bench`` / ``make bench-data``: the pipeline of
:func:`~atrc_exp.data.transforms.build_train_transform` against the pre-change reference pipeline
(:func:`reference_train_steps`), interleaved in one run, on NYUD- and PASCAL-sized in-memory
samples (:func:`_fake_sample`)."""

from __future__ import annotations

import numpy as np

#: Samples/s of the original train pipeline on one core (issue 3), the benchmark's reference.
ORIGINAL_SAMPLES_PER_S = 57.0


def _fake_sample(h: int, w: int, tasks: list[str], num_classes: int, rng: np.random.Generator) -> dict:
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
    """The train pipeline as it was before the fast transforms (2026-11-24), kept as plain code for
    ``atrc-data bench`` to measure the speed-up in the same run: a float32 image (what the readers
    returned then), scale + crop fused with ``np.take`` / ``cv2.warpAffine`` and the ``np.unique``
    class-ratio check, flip, float photometric distortion, normalise, ``np.pad``, ignore regions,
    to-tensor. ``[(step name, fn(sample) -> sample)]``; same draws' distribution as the pipeline.
    Without ``rng``, each random step seeds a numpy generator from torch's RNG on every call, as the
    pre-change transforms did; with one, all steps draw from it in the pipeline's order."""
    import cv2
    import torch

    from ..data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PAD_VALUES, torch_seeded_rng

    given = rng
    lo, hi = float(scale_range[0]), float(scale_range[1])
    size = (int(crop_size[0]), int(crop_size[1]))

    def nearest(n_src: int, n_dst: int, start: int, length: int) -> np.ndarray:
        idx = np.floor(np.arange(start, start + length) * (1.0 / (n_dst / n_src))).astype(np.intp)
        return np.minimum(idx, n_src - 1)

    def ratio_ok(seg: np.ndarray) -> bool:
        labels, cnt = np.unique(seg, return_counts=True)
        cnt = cnt[labels != IGNORE_INDEX]
        return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio

    def scale_crop(sample: dict) -> dict:
        rng = given or torch_seeded_rng()
        s = float(rng.uniform(lo, hi))
        h, w = sample["image"].shape[:2]
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        ch, cw = min(size[0], sh), min(size[1], sw)

        def draw() -> tuple[int, int]:
            return int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))

        y0, x0 = draw()
        if cat_max_ratio < 1.0 and "semseg" in sample:
            for _ in range(10):
                rows, cols = nearest(h, sh, y0, ch), nearest(w, sw, x0, cw)
                if ratio_ok(np.take(np.take(sample["semseg"], rows, 0), cols, 1)):
                    break
                y0, x0 = draw()
        rows, cols = nearest(h, sh, y0, ch), nearest(w, sw, x0, cw)
        out = dict(sample)
        for k, arr in sample.items():
            if k == "image":
                fx, fy = w / sw, h / sh
                m = np.array([[fx, 0.0, (x0 + 0.5) * fx - 0.5], [0.0, fy, (y0 + 0.5) * fy - 0.5]])
                out[k] = cv2.warpAffine(
                    arr,
                    m,
                    (cw, ch),
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_REPLICATE,
                )
            elif k != "meta":
                out[k] = np.take(np.take(arr, rows, 0), cols, 1)
        if "depth" in out:
            d = out["depth"]
            out["depth"] = np.where((d > 0) & (d != IGNORE_INDEX), d / np.float32(s), d).astype(np.float32)
        return out

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
        img = np.array(sample["image"], dtype=np.float32)
        if rng.random() < 0.5:
            img += np.float32(rng.uniform(-32, 32))
        contrast_first = rng.random() < 0.5
        if contrast_first and rng.random() < 0.5:
            img *= np.float32(rng.uniform(0.5, 1.5))
        np.clip(img, 0, 255, out=img)
        sat = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
        hue = rng.uniform(-9, 9) if rng.random() < 0.5 else None
        if sat is not None or hue is not None:
            hsv = cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2HSV)
            if sat is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(sat), 0, 255)
            if hue is not None:
                hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(hue), 180)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
        if not contrast_first and rng.random() < 0.5:
            img *= np.float32(rng.uniform(0.5, 1.5))
            np.clip(img, 0, 255, out=img)
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
        if ph == 0 and pw == 0:
            return sample
        out = dict(sample)
        for k, arr in sample.items():
            if k != "meta":
                p = ((0, ph), (0, pw)) + ((0, 0),) * (arr.ndim - 2)
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


#: The benchmark cases: (label, input H×W, crop H×W, tasks, semseg classes).
BENCH_CASES = [
    ("NYUD 480x640 -> 425x560, 4 tasks", (480, 640), (425, 560), ["semseg", "depth", "normals", "edge"], 40),
    ("PASCAL 375x500 -> 512x512, 5 tasks", (375, 500), (512, 512),
     ["semseg", "human_parts", "sal", "normals", "edge"], 21),
]  # fmt: skip


def bench_table(n: int = 100) -> list[dict]:
    """Train-transform cost on one core for NYUD- and PASCAL-sized in-memory inputs: per case a dict
    with ``label``, ``steps``/``ref_steps`` (``[(name, mean ms per sample)]`` of the pipeline and of
    :func:`reference_train_steps`; wall clock), ``rate``/``ref_rate`` (samples/s, wall clock),
    ``cpu_rate``/``ref_cpu_rate`` (samples/s of thread CPU time: what a core of its own would give
    on a shared machine) and ``speedup`` (of the rates). Samples alternate between the two
    pipelines, so that both see the same machine load."""
    import cv2
    import torch

    prev = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    try:
        return [_bench_case(case, n, rng) for case in BENCH_CASES]
    finally:
        cv2.setNumThreads(prev[0])
        torch.set_num_threads(prev[1])


def _bench_case(case: tuple, n: int, rng: np.random.Generator) -> dict:
    import time as _time

    from ..data.transforms import build_train_transform

    label, (h, w), crop, tasks, k = case
    samples = [_fake_sample(h, w, tasks, k, rng) for _ in range(4)]
    # the reference's own copies (no cache shared between the two), image float32 as read before
    ref_samples = [
        {k: (v if k == "meta" else v.astype(np.float32) if k == "image" else v.copy()) for k, v in s.items()}
        for s in samples
    ]
    fast = [(type(t).__name__, t) for t in build_train_transform(crop).transforms]
    ref = reference_train_steps(crop)
    totals = {"fast": np.zeros(len(fast)), "ref": np.zeros(len(ref))}
    cpu = {"fast": 0.0, "ref": 0.0}

    def run(steps: list, sample: dict, key: str | None) -> None:
        c0 = _time.thread_time()
        for j, (_, fn) in enumerate(steps):
            t0 = _time.perf_counter()
            sample = fn(sample)
            if key is not None:
                totals[key][j] += _time.perf_counter() - t0
        if key is not None:
            cpu[key] += _time.thread_time() - c0

    for i in range(len(samples)):  # warm-up
        run(fast, samples[i], None)
        run(ref, ref_samples[i], None)
    for i in range(n):
        run(fast, samples[i % len(samples)], "fast")
        run(ref, ref_samples[i % len(samples)], "ref")
    ms = {key: v * 1e3 / n for key, v in totals.items()}
    rate, ref_rate = 1e3 / ms["fast"].sum(), 1e3 / ms["ref"].sum()
    return {
        "label": label,
        "steps": [(name, float(m)) for (name, _), m in zip(fast, ms["fast"])],
        "ref_steps": [(name, float(m)) for (name, _), m in zip(ref, ms["ref"])],
        "rate": rate,
        "ref_rate": ref_rate,
        "cpu_rate": n / cpu["fast"],
        "ref_cpu_rate": n / cpu["ref"],
        "speedup": rate / ref_rate,
    }


def bench_transforms(n: int = 100) -> list[tuple[str, float]]:
    """Train-transform samples/s on one core for NYUD- and PASCAL-sized in-memory inputs."""
    return [(r["label"], r["rate"]) for r in bench_table(n)]


def format_bench(results: list[dict], n: int) -> str:
    """The table that ``atrc-data bench`` prints."""
    orig = ORIGINAL_SAMPLES_PER_S
    lines = [f"Train transforms, one core (1 cv2/torch thread), in-memory inputs, {n} samples per case;",
             "'reference' = the pre-change pipeline (float32 image), timed in the same run, interleaved;",
             "ms per step and samples/s: wall clock; 'of CPU time': thread CPU time (shared machines)."]  # fmt: skip
    for r in results:
        fast, ref = r["steps"], r["ref_steps"]
        lines += ["", r["label"], f"  {'pipeline step':<24}{'ms':>8}    {'reference step':<18}{'ms':>8}"]
        for j in range(max(len(fast), len(ref))):
            a = f"  {fast[j][0]:<24}{fast[j][1]:>8.2f}" if j < len(fast) else " " * 34
            b = f"    {ref[j][0]:<18}{ref[j][1]:>8.2f}" if j < len(ref) else ""
            lines.append(a + b)
        tf, tr = sum(m for _, m in fast), sum(m for _, m in ref)
        lines += [
            f"  {'total':<24}{tf:>8.2f}    {'total':<18}{tr:>8.2f}",
            f"  {'samples/s':<24}{r['rate']:>8.1f}    {'samples/s':<18}{r['ref_rate']:>8.1f}",
            f"  {'samples/s of CPU time':<24}{r['cpu_rate']:>8.1f}    {'of CPU time':<18}{r['ref_cpu_rate']:>8.1f}",
            f"  {f'vs the original {orig:.0f}/s':<24}{r['rate'] / orig:>7.2f}x    "
            f"{'vs the original':<18}{r['ref_rate'] / orig:>7.2f}x",
            f"  speed-up vs the reference: {r['speedup']:.2f}x "
            f"({r['cpu_rate'] / r['ref_cpu_rate']:.2f}x in CPU time)",
        ]
    return "\n".join(lines)
