"""The folder dataset: a user's own data, described by ``atrc_dataset.yaml`` (no code needed).

``<root>/``::

    atrc_dataset.yaml                  tasks: {<name>: {kind: <kind>, ...}, ...}
    images/<id>.jpg | <id>.png         RGB, any size (sizes may differ between images)
    labels/<task>/<id>.png | <id>.npy  one folder per task; no file = no label of that task
    splits/train.txt, splits/val.txt   ids, one per line

Each task's kind (:data:`atrc_exp.task_kinds.TASK_KINDS`) decodes its label files
(``TaskKind.read_label``) and says what "no label" is (``TaskKind.missing_label``).
:func:`load_task_specs` reads and validates the YAML, :class:`FolderDataset` reads one split and
:func:`check_folder` validates a whole folder (``atrc-data check <root>``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..label_io import DataError
from ..task_kinds import TASK_KINDS, Task, make_task, make_tasks, spec_problems

SPEC_FILE = "atrc_dataset.yaml"
#: Image file extensions, in lookup order.
IMAGE_EXTS = (".jpg", ".png", ".jpeg")
#: Label file extensions.
LABEL_EXTS = (".png", ".npy")
#: The splits every folder dataset has.
REQUIRED_SPLITS = ("train", "val")
#: What a folder dataset holds (for error messages).
LAYOUT_HINT = (
    f"a folder dataset holds {SPEC_FILE} (tasks: {{<name>: {{kind: <kind>, ...}}}}), images/<id>.jpg|.png, "
    f"labels/<task>/<id>.png|.npy and splits/train.txt, splits/val.txt (ids, one per line)"
)
#: Normals labels must have length 1 within this tolerance where labelled (``.npy``) ...
UNIT_TOLERANCE = 1e-2
#: ... and within this one in an 8-bit PNG (plus its quantisation: 2/255 per channel if truncated).
UNIT_TOLERANCE_PNG = UNIT_TOLERANCE + float(np.sqrt(3)) * 2 / 255


def _read_specs(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``({task name: spec as written}, problems)``; specs is None when the file gives no tasks.
    Every problem is one line starting with the YAML's path."""
    import yaml

    f = root / SPEC_FILE
    if not f.is_file():
        return None, [f"{f}: missing; {LAYOUT_HINT}"]
    try:
        doc = yaml.safe_load(f.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        msg = " ".join(str(e).split())
        return None, [f"{f}: unreadable YAML ({msg})"]
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), dict) or not doc["tasks"]:
        got = type(doc).__name__ if not isinstance(doc, dict) else f"keys {sorted(map(str, doc))}"
        return None, [f"{f}: expected a top-level `tasks:` mapping with at least one task, got {got}"]
    problems = [f"{f}: unknown top-level key {k!r} (only `tasks` is read)" for k in doc if k != "tasks"]
    specs = {str(k): v for k, v in doc["tasks"].items()}
    for name, spec in specs.items():
        problems += [f"{f}: {p}" for p in spec_problems(name, spec)]
    return specs, problems


def load_task_specs(root: str | Path | None) -> dict[str, dict]:
    """The task specs (``{name: spec}``, as written) of ``root/atrc_dataset.yaml``, validated with
    :func:`~atrc_exp.task_kinds.spec_problems`; a :class:`~atrc_exp.config.ConfigError` with one
    line per problem (joined by ``"; "``, each naming the file) otherwise (also for no ``root``:
    ``dataset.root`` not given)."""
    if root in (None, "", "???"):
        raise ConfigError("dataset=folder needs the dataset folder: pass dataset.root=<dir>")
    root = Path(str(root)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"folder dataset {root} does not exist; {LAYOUT_HINT}")
    specs, problems = _read_specs(root)
    if problems or specs is None:
        raise ConfigError("; ".join(problems))
    return {n: dict(s) for n, s in specs.items()}


def folder_tasks(root: str | Path, names: Sequence[str] | None = None) -> list[Task]:
    """The :class:`~atrc_exp.task_kinds.Task` s ``names`` (default: all, in the YAML's order) of
    ``root/atrc_dataset.yaml``; :class:`~atrc_exp.config.ConfigError` for a bad YAML or an unknown name."""
    specs = load_task_specs(root)
    try:
        return make_tasks(specs, names)
    except ValueError as e:
        raise ConfigError(f"{Path(root) / SPEC_FILE}: {e}") from None


def _read_split(split_file: Path) -> list[str]:
    """The ids of a split file (blank lines skipped); DataError if it is missing or empty."""
    if not split_file.is_file():
        raise DataError(
            f"{split_file}: missing; it lists the split's image ids, one per line ({LAYOUT_HINT})"
        )
    try:
        names = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{split_file}: unreadable split file ({e})") from e
    if not names:
        raise DataError(f"{split_file}: empty; list the split's image ids, one per line")
    return names


def _find(folder: Path, name: str, exts: Sequence[str]) -> list[Path]:
    return [p for p in (folder / f"{name}{e}" for e in exts) if p.is_file()]


def _image_size(path: Path) -> tuple[int, int]:
    """(h, w) from the image header (PIL, no decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"unreadable image {path}: {e}") from e
    return h, w


def read_rgb(path: Path) -> np.ndarray:
    """An image as uint8 H×W×3 RGB (PIL; grey, palette and RGBA images are converted); its shape is
    the header's size (no EXIF rotation)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"unreadable image {path}: {e}") from e
    return np.ascontiguousarray(arr, dtype=np.uint8)


class SplitDataset(Dataset):
    """Base of the readers: one split, ``names`` its ids; items are ``transform(load_raw(i))``, the
    raw sample without a transform."""

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        sample = self.load_raw(index)
        return self.transform(sample) if self.transform is not None else sample


class FolderDataset(SplitDataset):
    """One split of a folder dataset.

    Args:
        data_dir: the dataset folder itself (it holds ``atrc_dataset.yaml``).
        split: a split name: the file ``splits/<split>.txt``.
        tasks: the tasks to load (:class:`~atrc_exp.task_kinds.Task`; a name is looked up in the
            folder's YAML).
        transform: applied to the raw sample dict.
    """

    def __init__(
        self, data_dir: str | Path, split: str, tasks: Sequence[Task | str], transform: Callable | None = None
    ):
        self.root = Path(data_dir).expanduser()
        if not self.root.is_dir():
            raise DataError(f"folder dataset {self.root} does not exist; {LAYOUT_HINT}")
        names = [t for t in tasks if isinstance(t, str)]
        by_name = {t.name: t for t in folder_tasks(self.root, names)} if names else {}
        self.tasks: list[Task] = [by_name[t] if isinstance(t, str) else t for t in tasks]
        self.split = split
        self.transform = transform
        self.split_file = self.root / "splits" / f"{split}.txt"
        self.names = _read_split(self.split_file)
        self._sizes: list[tuple[int, int]] | None = None

    def image_path(self, index: int) -> Path:
        """``images/<id>.jpg|.png``; DataError naming the id, the split file and the folder otherwise."""
        name = self.names[index]
        found = _find(self.root / "images", name, IMAGE_EXTS)
        if not found:
            raise DataError(
                f"no image for id {name!r} (listed in {self.split_file}): expected {self.root / 'images'}/"
                f"{name}.jpg or .png"
            )
        if len(found) > 1:
            raise DataError(f"id {name!r} has {len(found)} images ({', '.join(map(str, found))}): keep one")
        return found[0]

    def label_path(self, index: int, task_name: str) -> Path | None:
        """``labels/<task>/<id>.png|.npy``, None without one; DataError when both exist."""
        name = self.names[index]
        found = _find(self.root / "labels" / task_name, name, LABEL_EXTS)
        if len(found) > 1:
            raise DataError(
                f"id {name!r} has both {found[0]} and {found[1]} for task {task_name!r}: keep one"
            )
        return found[0] if found else None

    def has_label(self, index: int, task_name: str) -> bool:
        """Whether image ``index`` has a label file of task ``task_name``."""
        return bool(_find(self.root / "labels" / task_name, self.names[index], LABEL_EXTS))

    def image_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every image of the split, from the headers (read once, then cached)."""
        if self._sizes is None:
            self._sizes = [_image_size(self.image_path(i)) for i in range(len(self))]
        return self._sizes

    def padded_size(self, multiple: int = 32) -> tuple[int, int]:
        """The largest image height and width of the split, each rounded up to a multiple of ``multiple``."""
        sizes = self.image_sizes()
        h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        return -(-h // multiple) * multiple, -(-w // multiple) * multiple

    def load_raw(self, index: int) -> dict:
        """``{"image": uint8 H×W×3 RGB, <task>: raw label (the kind's convention; all "no label"
        without a file), "meta": {"name": id, "size": (h, w)}}``; DataError for a missing or
        unreadable file or a label whose size differs from its image."""
        name = self.names[index]
        img_path = self.image_path(index)
        image = read_rgb(img_path)
        h, w = image.shape[:2]
        sample: dict[str, Any] = {"image": image}
        for task in self.tasks:
            p = self.label_path(index, task.name)
            if p is None:
                sample[task.name] = task.kind.missing_label(h, w)
                continue
            lab = task.kind.read_label(p, task)
            if lab.shape[:2] != (h, w):
                raise DataError(
                    f"{p}: size {lab.shape[0]}x{lab.shape[1]} differs from its image {img_path} ({h}x{w})"
                )
            sample[task.name] = lab
        sample["meta"] = {"name": name, "size": (h, w)}
        return sample


def _value_problems(task: Task, path: Path, lab: np.ndarray) -> list[str]:
    """Value ranges the readers do not enforce (the readers raise for the others)."""
    if task.kind is TASK_KINDS["normals"]:
        tol = UNIT_TOLERANCE_PNG if path.suffix == ".png" else UNIT_TOLERANCE
        norm = np.linalg.norm(lab.astype(np.float64), axis=-1)
        labelled = np.any(lab != 0, axis=-1)
        bad = labelled & (np.abs(norm - 1) > tol)
        if bad.any():
            none = "(0, 0, 0)" if path.suffix == ".png" else "NaN"
            return [
                f"{path}: {int(bad.sum())} of {int(labelled.sum())} labelled pixels are not unit vectors "
                f"(length {norm[bad].min():.3g}..{norm[bad].max():.3g}; want 1 ± {tol:.2g}, "
                f"{none} for no label)"
            ]
    if task.kind is TASK_KINDS["depth"] and path.suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return []  # read_label reported it
        with np.errstate(invalid="ignore"):
            bad = np.isinf(raw) | (raw < 0)
        if bad.any():
            return [
                f"{path}: {int(bad.sum())} depth values are negative or infinite (min {np.nanmin(raw):.3g}); "
                f"depth is finite metres >= 0, NaN for no label"
            ]
    return []


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def _capped(items: list[str], max_list: int, more: str) -> list[str]:
    if len(items) <= max_list:
        return items
    return [*items[:max_list], more.format(n=len(items) - max_list)]


def _check_ids(splits: dict[str, FolderDataset], max_list: int) -> list[str]:
    """An id listed twice in a split, or in two splits."""
    first: dict[str, FolderDataset] = {}
    out = []
    for ds in splits.values():
        seen: set[str] = set()
        for name in ds.names:
            if name in seen:
                out.append(f"{ds.split_file}: id {name!r} is listed twice")
            elif name in first:
                out.append(f"{ds.split_file}: id {name!r} is also in {first[name].split_file}")
            seen.add(name)
            first.setdefault(name, ds)
    where = next(iter(splits.values())).split_file.parent if splits else "splits"
    return _capped(out, max_list, f"{where}: and {{n}} more ids listed twice or in two splits")


def _check_split(ds: FolderDataset, counts: dict[str, int], max_list: int) -> tuple[str, list[str]]:
    """(report line, problems) of the images and labels of one split; ``counts[task]`` += the
    images with a label file of the task."""
    from tqdm import tqdm

    sizes: list[tuple[int, int]] = []
    missing, bad = [], []
    one_line = " ".join
    for i in tqdm(range(len(ds)), desc=f"check {ds.split}", unit="img", leave=False, disable=None):
        name, hw = ds.names[i], None
        found = _find(ds.root / "images", name, IMAGE_EXTS)
        if not found:
            missing.append(
                f"{ds.split_file}: id {name!r} has no image ({ds.root / 'images'}/{name}.jpg or .png)"
            )
        elif len(found) > 1:
            bad.append(f"{found[0]}: id {name!r} has {len(found)} images ({', '.join(map(str, found))})")
        else:
            try:
                hw = _image_size(found[0])
                read_rgb(found[0])  # decodes: a truncated file fails here
                sizes.append(hw)
            except DataError as e:
                bad.append(one_line(str(e).split()))
                hw = None
        for t in ds.tasks:
            try:
                p = ds.label_path(i, t.name)
                if p is None:
                    continue
                counts[t.name] += 1
                lab = t.kind.read_label(p, t)
            except DataError as e:
                bad.append(one_line(str(e).split()))
                continue
            if hw is not None and lab.shape[:2] != hw:
                size = f"{lab.shape[0]}x{lab.shape[1]}"
                bad.append(f"{p}: size {size} differs from its image {found[0]} ({hw[0]}x{hw[1]})")
            else:
                bad += _value_problems(t, p, lab)
    problems = _capped(missing, max_list, f"{ds.split_file}: and {{n}} more ids without an image")
    problems += _capped(bad, max_list, f"{ds.split_file}: and {{n}} more damaged or unreadable files")
    if sizes:
        hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
        rng = f"height {min(hs)}..{max(hs)}, width {min(ws)}..{max(ws)} ({len(set(sizes))} sizes)"
    else:
        rng = "no readable image"
    return f"  {ds.split}: {len(ds)} images, {rng}", problems


def _check_label_folders(
    root: Path, specs: dict, tasks: list[Task], splits: dict[str, FolderDataset] | None, max_list: int
) -> list[str]:
    """Label folders and files that no task or no split id uses (``splits`` None: not all split
    files could be read, so label ids are not compared with them)."""
    label_dir = root / "labels"
    out = [
        f"{label_dir / t.name}: missing, so no image has a label of task {t.name!r}"
        for t in tasks
        if not (label_dir / t.name).is_dir()
    ]
    if not label_dir.is_dir():
        return out
    listed = {n for ds in (splits or {}).values() for n in ds.names}
    split_files = ", ".join(str(ds.split_file) for ds in (splits or {}).values())
    for d in sorted(label_dir.iterdir()):
        if not d.is_dir():
            out.append(f"{d}: not in a task folder (labels/<task>/<id>.png|.npy)")
            continue
        if d.name not in specs:
            tasks_listed = ", ".join(specs) or "none"
            out.append(
                f"{d}: a label folder of task {d.name!r}, which {SPEC_FILE} does not list "
                f"(its tasks: {tasks_listed})"
            )
            continue
        stray, orphan = [], []
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            if f.suffix not in LABEL_EXTS:
                stray.append(f"{f}: not a label file (.png or .npy)")
            elif splits is not None and f.relative_to(d).with_suffix("").as_posix() not in listed:
                orphan.append(f"{f}: its id is in no split ({split_files})")
        out += _capped(stray, max_list, f"{d}: and {{n}} more files that are not .png or .npy")
        out += _capped(orphan, max_list, f"{d}: and {{n}} more label files whose id is in no split")
    return out


def check_folder(root: str | Path, max_list: int = 20) -> tuple[list[str], list[str]]:
    """Validate a folder dataset: ``(report lines, problems)``, each problem one line naming its file.

    Problems: the YAML (missing, unreadable, unknown kind or key, a segmentation task without
    classes, ...: :func:`~atrc_exp.task_kinds.spec_problems`); missing or empty
    ``splits/train.txt``/``val.txt``; an id listed twice or in two splits; a split id without an
    image (or with two); unreadable files; a label whose size differs from its image's; values out
    of range (class index >= classes and not 255, normals not of unit length where labelled: 1e-2,
    in a PNG plus its 8-bit rounding; depth negative or infinite); a label folder of a task the YAML
    does not list, a task without a label folder, a label file whose id is in no split or with
    another extension. Lists of one kind stop after ``max_list`` lines plus one "and N more".
    The report: per split the image count and size range, and per task how many images of each
    split carry a label.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        return [], [f"{root}: no such folder; {LAYOUT_HINT}"]
    lines = [f"folder dataset {root}"]
    specs, problems = _read_specs(root)
    specs = specs or {}
    tasks = [make_task(n, s) for n, s in specs.items() if not spec_problems(n, s)]  # the usable ones
    if tasks:
        desc = [
            f"{t.name} ({t.kind.name}"
            + (f", {t.num_classes} classes" if "classes" in t.kind.options else "")
            + ")"
            for t in tasks
        ]
        lines.append(f"  tasks: {', '.join(desc)}")

    split_names = [*REQUIRED_SPLITS]
    if (root / "splits").is_dir():
        split_names += sorted(
            p.stem for p in (root / "splits").glob("*.txt") if p.stem not in REQUIRED_SPLITS
        )
    splits: dict[str, FolderDataset] = {}
    for s in split_names:
        try:
            splits[s] = FolderDataset(root, s, tasks)
        except DataError as e:
            problems.append(str(e))
    problems += _check_ids(splits, max_list)
    counts = {s: dict.fromkeys((t.name for t in tasks), 0) for s in splits}
    for s, ds in splits.items():
        line, split_problems = _check_split(ds, counts[s], max_list)
        lines.append(line)
        problems += split_problems
    problems += _check_label_folders(
        root, specs, tasks, splits if len(splits) == len(split_names) else None, max_list
    )

    if tasks and splits:
        rows = [["task", "kind", *splits]]
        rows += [
            [t.name, t.kind.name, *(f"{counts[s][t.name]}/{len(ds)}" for s, ds in splits.items())]
            for t in tasks
        ]
        lines.append("  images with a label:")
        lines += _table(rows, indent="    ")
    return lines, problems
