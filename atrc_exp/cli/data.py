"""``atrc-data``: generate, check, fetch and benchmark datasets.

    atrc-data synth [--layout NYUD_MT|PASCAL_MT] [--out DIR] [--n-train N] [--n-val N] ...
    atrc-data check DIR [--max-problems N]
    atrc-data fetch --dataset nyud|pascal_context --dest DIR [--url URL] [--sha256 HEX]
    atrc-data bench [--n N]

``DIR`` / ``--dest`` is the folder that holds ``NYUD_MT/`` and ``PASCAL_MT/`` (``paths.data_dir``).
Problems with the data are reported in one line each and give exit code 1 (no traceback).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..data.nyud import NYUD_SPLIT_SIZES, DataError

#: The original archives (ASTMT / MTI-Net / ATRC use these layouts). Sizes and checksums that we do
#: not know for sure are ``None``: `fetch` then prints the sha256 it computed instead of checking it.
ARCHIVES: dict[str, dict] = {
    "nyud": {
        "url": "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/NYUD_MT.tgz",
        "file": "NYUD_MT.tgz",
        "folder": "NYUD_MT",
        "size": None,  # unknown (not published)
        "sha256": None,  # unknown (not published)
    },
    "pascal_context": {
        "url": "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz",
        "file": "PASCAL_MT.tgz",
        "folder": "PASCAL_MT",
        "size": None,  # unknown (not published)
        "sha256": None,  # unknown (not published)
    },
}
PASCAL_SPLIT_SIZES = {"train": 4998, "val": 5105}
#: Samples/s of the original train pipeline on one core (issue 3), the benchmark's reference.
ORIGINAL_SAMPLES_PER_S = 57.0


class CLIError(Exception):
    """A problem reported as one line with exit code 1."""


# ----------------------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------------------


def _layout_arg(s: str) -> str:
    m = {"nyud": "NYUD_MT", "nyud_mt": "NYUD_MT", "pascal": "PASCAL_MT", "pascal_mt": "PASCAL_MT",
         "pascal_context": "PASCAL_MT"}  # fmt: skip
    v = m.get(s.lower(), s)
    if v not in ("NYUD_MT", "PASCAL_MT"):
        raise argparse.ArgumentTypeError(f"unknown layout {s!r}: use NYUD_MT or PASCAL_MT")
    return v


def cmd_synth(a: argparse.Namespace) -> int:
    from ..config import cache_dir
    from ..data.synthetic import ensure_synthetic_dataset

    out = a.out
    if out is None:  # the folder dataset=synthetic uses for these settings (config.synthetic_data_dir)
        out = cache_dir() / "synthetic" / f"v1_n{a.n_train}-{a.n_val}_{a.height}x{a.width}_s{a.seed}"
    try:
        root = ensure_synthetic_dataset(
            Path(out), n_train=a.n_train, n_val=a.n_val, height=a.height, width=a.width, seed=a.seed,
            progress=not a.quiet, layout=a.layout,
        )  # fmt: skip
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(f"{a.layout} ({a.n_train} train / {a.n_val} val, {a.height}x{a.width}) in {Path(root) / a.layout}")
    print(
        f"use it with: atrc-train paths.data_dir={root}"
        + (" dataset=synthetic_pascal" if a.layout == "PASCAL_MT" else "")
    )
    return 0


# ----------------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------------


def _find_layouts(path: Path) -> tuple[Path, list[str]]:
    """(data_dir, layouts present) for a data dir or a layout folder itself."""
    if path.name in ("NYUD_MT", "PASCAL_MT") and path.is_dir():
        return path.parent, [path.name]
    found = [lay for lay in ("NYUD_MT", "PASCAL_MT") if (path / lay).is_dir()]
    return path, found


def _manifest(folder: Path) -> dict | None:
    mf = folder / "synthetic.json"
    if mf.is_file():
        try:
            return json.loads(mf.read_text())
        except (OSError, ValueError):
            return None
    return None


def _check_values(name: str, sample: dict, problems: list[str], where: str) -> None:
    """Label ranges beyond what the readers enforce."""
    if "edge" in sample:
        e = sample["edge"]
        if not np.isin(e, (0.0, 1.0)).all():
            problems.append(f"{where}: edge values other than 0/1 ({np.unique(e)[:5]}...) in {name}")
    if "depth" in sample:
        d = sample["depth"]
        if (d < 0).any() or (d > 100).any():
            problems.append(
                f"{where}: depth outside 0..100 m in {name} (min {d.min():.3g}, max {d.max():.3g})"
            )
    if "normals" in sample:
        n = np.linalg.norm(sample["normals"], axis=-1)
        nz = n > 0
        if nz.any() and (np.abs(n[nz] - 1) > 0.1).mean() > 0.01:
            problems.append(f"{where}: normals of {name} are not unit vectors (mean norm {n[nz].mean():.3f})")


def check_layout(data_dir: Path, layout: str, max_list: int = 20) -> tuple[list[str], list[str]]:
    """Validate ``data_dir/<layout>``: (report lines, problems)."""
    from tqdm import tqdm

    from ..data.nyud import NYUD_TASK_FILES, NYUDMT
    from ..data.pascal import PASCALMT, _loadmat, person_parts

    folder = data_dir / layout
    mf = _manifest(folder)
    lines, problems = [], []
    if layout == "NYUD_MT":
        split_dir, tasks, classes, expected = (
            folder / "gt_sets",
            list(NYUD_TASK_FILES),
            40,
            dict(NYUD_SPLIT_SIZES),
        )
    else:
        split_dir = folder / "ImageSets" / "Context"
        tasks, classes, expected = ["semseg", "sal", "normals", "edge"], 21, dict(PASCAL_SPLIT_SIZES)
    if mf is not None:
        classes = len(mf.get("semseg_classes", [])) or classes
        expected = {"train": mf.get("n_train"), "val": mf.get("n_val")}
    kind = "synthetic" if mf is not None else "published"
    lines.append(f"{layout} at {folder} ({kind}, {classes} semseg classes)")
    splits = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
    splits = [s for s in splits if s in ("train", "val")] or splits
    for s in ("train", "val"):
        if s not in splits:
            problems.append(f"{layout}: split list {split_dir / (s + '.txt')} is missing")
    for split in splits:
        try:
            if layout == "NYUD_MT":
                ds = NYUDMT(data_dir, split, tasks, num_classes=classes)
            else:
                ds = PASCALMT(data_dir, split, tasks, num_classes=classes)
        except DataError as e:
            problems.append(str(e))
            continue
        n_bad = 0
        sizes: dict[tuple, int] = {}
        for i in tqdm(range(len(ds)), desc=f"{layout}/{split}", unit="img", leave=False, disable=None):
            try:
                sample = ds.load_raw(i)
                if layout == "PASCAL_MT":
                    p = ds.root / "human_parts" / f"{ds.names[i]}.mat"
                    person_parts(_loadmat(p, ds.split_file), p, sample["image"].shape[:2])
                _check_values(ds.names[i], sample, problems, f"{layout}/{split}")
                hw = sample["image"].shape[:2]
                sizes[hw] = sizes.get(hw, 0) + 1
            except DataError as e:
                n_bad += 1
                problems.append(str(e))
        want = expected.get(split)
        count = f"{len(ds)} images" + (f" (expected {want})" if want is not None else "")
        if want is not None and len(ds) != want:
            problems.append(f"{layout}/{split}: {len(ds)} images listed in {ds.split_file}, expected {want}")
        common = ", ".join(f"{h}x{w}: {c}" for (h, w), c in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"  {split}: {count}, {n_bad} unreadable or damaged; sizes {common or '-'}")
    return lines, problems


def cmd_check(a: argparse.Namespace) -> int:
    path = Path(a.dir).expanduser()
    if not path.is_dir():
        raise CLIError(
            f"{path} does not exist: pass the folder that holds NYUD_MT/ and/or PASCAL_MT/ "
            f"(get them with `atrc-data fetch --dataset nyud|pascal_context --dest {path}`)"
        )
    data_dir, layouts = _find_layouts(path)
    if not layouts:
        raise CLIError(
            f"{path} holds neither NYUD_MT/ nor PASCAL_MT/: expected the published layouts there "
            f"(get them with `atrc-data fetch --dataset nyud|pascal_context --dest {path}`, or generate "
            f"one with `atrc-data synth --out {path}`)"
        )
    all_problems = []
    for layout in layouts:
        lines, problems = check_layout(data_dir, layout)
        print("\n".join(lines))
        all_problems += problems
    if all_problems:
        print(f"{len(all_problems)} problem(s):")
        for p in all_problems[: a.max_problems]:
            print(f"  - {p}")
        if len(all_problems) > a.max_problems:
            print(f"  ... and {len(all_problems) - a.max_problems} more")
        return 1
    print("ok")
    return 0


# ----------------------------------------------------------------------------------------------
# fetch
# ----------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, expected_size: int | None) -> str:
    """Stream ``url`` into ``dest`` with a progress bar; return the sha256 hex digest."""
    from tqdm import tqdm

    h = hashlib.sha256()
    try:
        resp = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - user-chosen URL (file:// for tests)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CLIError(
            f"could not open {url}: {e}. Without a network, download the archive elsewhere and pass "
            f"--url file:///path/to/archive"
        ) from e
    total = resp.headers.get("Content-Length")
    total = int(total) if total and total.isdigit() else expected_size
    with (
        resp,
        open(dest, "wb") as f,
        tqdm(total=total, unit="B", unit_scale=True, desc=dest.name.lstrip(".")) as bar,
    ):
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _extract(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            if sys.version_info >= (3, 12):
                tf.extractall(into, filter="data")
            else:  # refuse absolute paths and parent references ourselves
                for m in tf.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk():
                        raise CLIError(f"{archive}: unsafe member {m.name!r}")
                tf.extractall(into)  # noqa: S202
    except (tarfile.TarError, OSError) as e:
        raise CLIError(f"could not extract {archive}: {e}") from e


def cmd_fetch(a: argparse.Namespace) -> int:
    info = ARCHIVES[a.dataset]
    dest = Path(a.dest).expanduser()
    target = dest / info["folder"]
    if target.exists() and any(target.iterdir()) and not a.force:
        raise CLIError(f"{target} already exists; pass --force to replace it")
    url = a.url or info["url"]
    expected = a.sha256 or info["sha256"]
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{info['file']}.part-{os.getpid()}"
    tmp_dir = dest / f".{info['folder']}.extract-{os.getpid()}"
    try:
        print(f"downloading {url}")
        digest = _download(url, part, info["size"])
        if expected:
            if digest != expected.lower():
                raise CLIError(
                    f"sha256 mismatch for {url}: got {digest}, expected {expected}; nothing was kept"
                )
            print(f"sha256 ok ({digest})")
        else:
            print(
                f"sha256 {digest} (no reference checksum is known for {a.dataset}; compare it with a trusted copy)"
            )
        tmp_dir.mkdir()
        _extract(part, tmp_dir)
        got = tmp_dir / info["folder"]
        if not got.is_dir():
            top = sorted(p.name for p in tmp_dir.iterdir())
            raise CLIError(f"{url}: the archive has no {info['folder']}/ folder at its top (it has {top})")
        if target.exists():
            shutil.rmtree(target)
        os.replace(got, target)
        if a.keep_archive:
            os.replace(part, dest / info["file"])
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"{info['folder']} is in {target}; use paths.data_dir={dest}")
    return 0


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------


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


def cmd_bench(a: argparse.Namespace) -> int:
    print(format_bench(bench_table(a.n), a.n))
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atrc-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="generate the synthetic dataset in a published layout")
    s.add_argument("--layout", type=_layout_arg, default="NYUD_MT", help="NYUD_MT (default) or PASCAL_MT")
    s.add_argument("--out", type=Path, default=None, help="data dir (default: the synthetic cache folder)")
    s.add_argument("--n-train", type=int, default=240)
    s.add_argument("--n-val", type=int, default=48)
    s.add_argument("--height", type=int, default=120)
    s.add_argument("--width", type=int, default=160)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_synth)

    c = sub.add_parser("check", help="validate a data dir against its layout")
    c.add_argument("dir", help="the folder holding NYUD_MT/ and/or PASCAL_MT/ (or one of them)")
    c.add_argument("--max-problems", type=int, default=50, help="problems listed (all are counted)")
    c.set_defaults(fn=cmd_check)

    f = sub.add_parser("fetch", help="download and unpack an original archive")
    f.add_argument("--dataset", choices=sorted(ARCHIVES), default="nyud")
    f.add_argument("--dest", default=".", help="the data dir (NYUD_MT/ or PASCAL_MT/ goes inside)")
    f.add_argument("--url", default=None, help="another source (a mirror, or file:///path/archive.tgz)")
    f.add_argument("--sha256", default=None, help="expected sha256 of the archive")
    f.add_argument("--keep-archive", action="store_true")
    f.add_argument("--force", action="store_true", help="replace an existing folder")
    f.set_defaults(fn=cmd_fetch)

    b = sub.add_parser("bench", help="train-transform samples/s per worker (NYUD- and PASCAL-sized)")
    b.add_argument("--n", type=int, default=100, help="samples per case (and pipeline)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (CLIError, DataError) as e:
        print(f"atrc-data {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
