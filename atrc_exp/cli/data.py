"""``atrc-data``: generate, check and fetch datasets.

    atrc-data synth [--layout NYUD_MT|PASCAL_MT|folder] [--out DIR] [--n-train N] [--n-val N] ...
    atrc-data check DIR [--max-problems N]
    atrc-data fetch --dataset nyud|pascal_context --dest DIR [--url URL] [--sha256 HEX]

``DIR`` / ``--dest`` is the folder that holds ``NYUD_MT/`` and ``PASCAL_MT/`` (``paths.data_dir``);
the layouts, their archives and what ``check`` expects of them are the rows of
:data:`atrc_exp.data.layouts.LAYOUTS`. Problems with the data are one line each, exit code 1 (no
traceback); a folder dataset (``DIR/atrc_dataset.yaml``, :mod:`atrc_exp.data.folder`) is checked
against its YAML (exit code 2 on problems). ``check`` also reports the valid normals pixels per
split: on PASCAL_MT the distilled normals are kept only on the original's 170 ``LabelMap``
classes, so this shows at once whether that mask is sane.
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
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..data.layouts import LAYOUTS, layout_for_name
from ..data.nyud import DataError
from ..errors import ConfigError
from ..label_io import DataError as LabelDataError
from ..task_kinds import paper_tasks

#: ``--layout`` of a folder dataset (``atrc_dataset.yaml``; not a published layout).
FOLDER = "folder"
#: The published layouts (the folders ``check`` and ``fetch`` know).
PUBLISHED = [name for name in LAYOUTS if name != FOLDER]

#: ``fetch --dataset`` name -> the original archive (ASTMT / MTI-Net / ATRC use these layouts) as a
#: dict (url, file, folder, size, sha256), from the layout table. A ``None`` size or checksum is not
#: known for sure: `fetch` then prints the sha256 it computed instead of checking it.
ARCHIVES: dict[str, dict] = {
    spec.archive.dataset: {**asdict(spec.archive), "file": spec.archive.file, "folder": name}
    for name, spec in LAYOUTS.items()
    if spec.archive is not None
}


#: The kind of each task of the published layouts (the paper's named tasks).
PAPER_KINDS: dict[str, str] = {t.name: t.kind.name for t in paper_tasks()}


class CLIError(Exception):
    """A problem reported as one line with exit code 1."""


def _layout_arg(s: str) -> str:
    try:
        return layout_for_name(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_synth(a: argparse.Namespace) -> int:
    """``synth``: the synthetic dataset in ``--out/<layout>``, or with ``--layout folder`` a folder
    dataset in ``--out`` itself."""
    from ..config import cache_dir
    from ..data.layouts import ensure_synthetic_dataset
    from ..data.synthetic_folder import ensure_folder_dataset

    folder = a.layout == FOLDER
    # default: the folder dataset=synthetic uses for these settings (config.synthetic_data_dir)
    tag = f"{'folder_' if folder else ''}v1_n{a.n_train}-{a.n_val}_{a.height}x{a.width}_s{a.seed}"
    out = Path(a.out) if a.out is not None else cache_dir() / "synthetic" / tag
    sizes = dict(n_train=a.n_train, n_val=a.n_val, height=a.height, width=a.width, seed=a.seed)
    try:
        if folder:
            root = ensure_folder_dataset(out, **sizes, progress=not a.quiet)
        else:
            root = ensure_synthetic_dataset(out, **sizes, progress=not a.quiet, layout=a.layout)
    except ValueError as e:
        raise CLIError(str(e)) from e
    size = f"{a.n_train} train / {a.n_val} val, {a.height}x{a.width}"
    if folder:
        print(f"folder dataset ({size} and others) in {root}")
        print(f"use it with: atrc-train dataset=folder dataset.root={root}")
    else:
        print(f"{a.layout} ({size}) in {Path(root) / a.layout}")
        print(f"use it with: atrc-train paths.data_dir={root} dataset={LAYOUTS[a.layout].synthetic_dataset}")
    return 0


def _find_layouts(path: Path) -> tuple[Path, list[str]]:
    """(data_dir, layouts present) for a data dir or a layout folder itself."""
    if path.name in PUBLISHED and path.is_dir():
        return path.parent, [path.name]
    return path, [lay for lay in PUBLISHED if (path / lay).is_dir()]


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "synthetic.json").read_text())
    except (OSError, ValueError):
        return None


def _check_values(name: str, sample: dict, problems: list[str], where: str) -> None:
    """Label ranges beyond what the readers enforce, by each label's kind (the published layouts'
    tasks are the paper's named tasks)."""
    for key, kind in [(k, kind) for k, kind in PAPER_KINDS.items() if k in sample]:
        v = sample[key]
        if kind == "edge" and not np.isin(v, (0.0, 1.0)).all():
            problems.append(f"{where}: {key} values other than 0/1 ({np.unique(v)[:5]}...) in {name}")
        if kind == "depth" and ((v < 0).any() or (v > 100).any()):
            problems.append(
                f"{where}: {key} outside 0..100 m in {name} (min {v.min():.3g}, max {v.max():.3g})"
            )
        if kind == "normals":
            n = np.linalg.norm(v, axis=-1)
            nz = n > 0
            if nz.any() and (np.abs(n[nz] - 1) > 0.1).mean() > 0.01:
                problems.append(
                    f"{where}: {key} of {name} are not unit vectors (mean norm {n[nz].mean():.3f})"
                )


def normals_valid_pixels(normals: np.ndarray) -> tuple[int, int]:
    """``(valid, total)`` pixels of an H×W×3 normals map as a reader returns it: valid = not the
    zero vector (PASCAL-Context: on the kept ``LabelMap`` classes; NYUD-v2: where there are normals)."""
    n = np.asarray(normals)
    return int(np.any(n != 0, axis=-1).sum()), int(n.shape[0] * n.shape[1])


def normals_report(stats: list[tuple[str, int, int]], worst: int = 3) -> str:
    """One line on the valid normals pixels of a split, from ``(image id, valid, total)`` per image:
    the share over the split, the per-image min / mean / max, how many images have none, and the
    ``worst`` images with the smallest share."""
    frac = np.array([v / t if t else 0.0 for _, v, t in stats])
    share = sum(v for _, v, _ in stats) / max(1, sum(t for _, _, t in stats))
    order = np.argsort(frac, kind="stable")[:worst]
    low = ", ".join(f"{stats[i][0]} {100 * frac[i]:.1f}%" for i in order)
    return (
        f"normals valid on {100 * share:.1f}% of the pixels; per image min {100 * frac.min():.1f}%, "
        f"mean {100 * frac.mean():.1f}%, max {100 * frac.max():.1f}%; {int((frac == 0).sum())} of "
        f"{len(stats)} images without any; lowest: {low}"
    )


def check_layout(data_dir: Path, layout: str) -> tuple[list[str], list[str]]:
    """Validate ``data_dir/<layout>``: (report lines, problems)."""
    from tqdm import tqdm

    spec = LAYOUTS[layout]
    folder = data_dir / layout
    mf = _manifest(folder)
    lines, problems = [], []
    split_dir = folder / spec.split_dir
    tasks, classes, expected = list(spec.check_tasks), spec.semseg_classes, dict(spec.split_sizes)
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
            ds = spec.reader(data_dir, split, tasks, num_classes=classes)  # (tasks: the layout's names)
        except DataError as e:
            problems.append(str(e))
            continue
        n_bad = 0
        sizes: Counter = Counter()
        normals: list[tuple[str, int, int]] = []  # (image id, valid pixels, pixels)
        for i in tqdm(range(len(ds)), desc=f"{layout}/{split}", unit="img", leave=False, disable=None):
            try:
                sample = ds.load_raw(i)
                if spec.check_image is not None:
                    spec.check_image(ds, i, sample)
                _check_values(ds.names[i], sample, problems, f"{layout}/{split}")
                for key in [k for k, kind in PAPER_KINDS.items() if k in sample and kind == "normals"]:
                    normals.append((ds.names[i], *normals_valid_pixels(sample[key])))
                sizes[sample["image"].shape[:2]] += 1
            except DataError as e:
                n_bad += 1
                problems.append(str(e))
        want = expected.get(split)
        count = f"{len(ds)} images" + (f" (expected {want})" if want is not None else "")
        if want is not None and len(ds) != want:
            problems.append(f"{layout}/{split}: {len(ds)} images listed in {ds.split_file}, expected {want}")
        common = ", ".join(f"{h}x{w}: {c}" for (h, w), c in sizes.most_common(3))
        lines.append(f"  {split}: {count}, {n_bad} unreadable or damaged; sizes {common or '-'}")
        if normals:
            lines.append(f"    {normals_report(normals)}")
            if not any(v for _, v, _ in normals):
                note = f" ({spec.normals_note})" if spec.normals_note else ""
                problems.append(f"{layout}/{split}: no valid normals pixel in any image{note}")
    return lines, problems


def check_folder_dataset(path: Path, max_problems: int) -> int:
    """``check`` of a folder dataset: the report on stdout, ``problem: ...`` lines on stderr; 2 if any."""
    from ..data.folder import check_folder

    lines, problems = check_folder(path)
    print("\n".join(lines))
    if not problems:
        print("ok")
        return 0
    print(f"{len(problems)} problem(s)")
    for p in problems[:max_problems]:
        print(f"problem: {p}", file=sys.stderr)
    if len(problems) > max_problems:
        print(f"problem: ... and {len(problems) - max_problems} more (--max-problems)", file=sys.stderr)
    return 2


def _is_folder_dataset(path: Path) -> bool:
    """A folder dataset, or something meant to be one (no published layout, a folder dataset's folders)."""
    from ..data.folder import SPEC_FILE

    if (path / SPEC_FILE).is_file():
        return True
    return not _find_layouts(path)[1] and any((path / d).is_dir() for d in ("images", "labels", "splits"))


def cmd_check(a: argparse.Namespace) -> int:
    path = Path(a.dir).expanduser()
    if path.is_dir() and _is_folder_dataset(path):
        return check_folder_dataset(path, a.max_problems)
    folders = " and/or ".join(f"{lay}/" for lay in PUBLISHED)
    fetch = f"`atrc-data fetch --dataset {'|'.join(ARCHIVES)} --dest {path}`"
    if not path.is_dir():
        raise CLIError(f"{path} does not exist: pass the folder that holds {folders} (get them with {fetch})")
    data_dir, layouts = _find_layouts(path)
    if not layouts:
        raise CLIError(
            f"{path} holds none of {', '.join(f'{lay}/' for lay in PUBLISHED)}: expected the "
            f"published layouts there (get them with {fetch}, or generate one with `atrc-data synth --out "
            f"{path}`), or a folder dataset (atrc_dataset.yaml, images/, labels/, splits/)"
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
        for chunk in iter(lambda: resp.read(1 << 20), b""):
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
        if not expected:
            note = f"no reference checksum is known for {a.dataset}; compare it with a trusted copy"
            print(f"sha256 {digest} ({note})")
        elif digest != expected.lower():
            raise CLIError(f"sha256 mismatch for {url}: got {digest}, expected {expected}; nothing was kept")
        else:
            print(f"sha256 ok ({digest})")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atrc-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="generate the synthetic dataset in a published layout")
    s.add_argument(
        "--layout",
        type=_layout_arg,
        default="NYUD_MT",
        help=f"one of {', '.join(PUBLISHED)} (default NYUD_MT), or the dataset name "
        f"of one ({', '.join(ARCHIVES)}), or {FOLDER} (a folder dataset, written into --out itself)",
    )
    s.add_argument("--out", type=Path, help="data dir (default: the synthetic cache folder)")
    s.add_argument("--n-train", type=int, default=240)
    s.add_argument("--n-val", type=int, default=48)
    s.add_argument("--height", type=int, default=120)
    s.add_argument("--width", type=int, default=160)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_synth)

    c = sub.add_parser("check", help="validate a data dir against its layout (and report the valid normals)")
    c.add_argument(
        "dir",
        help=f"the folder holding {' and/or '.join(f'{k}/' for k in PUBLISHED)} (or one of "
        "them), or a folder dataset (holding atrc_dataset.yaml)",
    )
    c.add_argument("--max-problems", type=int, default=50, help="problems listed (all are counted)")
    c.set_defaults(fn=cmd_check)

    f = sub.add_parser("fetch", help="download and unpack an original archive")
    f.add_argument("--dataset", choices=sorted(ARCHIVES), default="nyud")
    f.add_argument("--dest", default=".", help="the data dir (the layout folder goes inside)")
    f.add_argument("--url", help="another source (a mirror, or file:///path/archive.tgz)")
    f.add_argument("--sha256", help="expected sha256 of the archive")
    f.add_argument("--keep-archive", action="store_true")
    f.add_argument("--force", action="store_true", help="replace an existing folder")
    f.set_defaults(fn=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (CLIError, DataError, LabelDataError) as e:
        print(f"atrc-data {args.cmd}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
