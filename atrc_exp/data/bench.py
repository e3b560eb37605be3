"""The train-transform benchmark of ``atrc-data bench`` / ``make bench-data``: the pipeline of
:func:`~atrc_exp.data.transforms.build_train_transform` against the reference pipeline
(:func:`reference_train_steps`: the spec step by step as plain code, which the fast pipeline
equals sample for sample), interleaved in one run, on NYUD- and PASCAL-sized in-memory samples
(:func:`_fake_sample`)."""

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
    """The train pipeline of the spec, step by step as plain code (no look-up tables, no fused
    steps): the statement that :func:`~atrc_exp.data.transforms.build_train_transform` must equal
    for the same draws (a test checks it, sample for sample), and the baseline ``atrc-data bench``
    measures the fast pipeline against. ``[(step name, fn(sample) -> sample)]``:

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
    import cv2
    import torch

    from ..data.transforms import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, PAD_VALUES, torch_seeded_rng

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
    # the reference's own copies (no cache shared between the two)
    ref_samples = [{k: (v if k == "meta" else v.copy()) for k, v in s.items()} for s in samples]
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
             "'reference' = the spec step by step as plain code, timed in the same run, interleaved;",
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
