"""The embedded synthetic dataset written as a folder dataset (:mod:`atrc_exp.data.folder`).

Tasks (``atrc_dataset.yaml``): ``semseg`` (segmentation, the 7 synthetic classes, PNG),
``depth`` (``.npy`` metres), ``normals`` (``.npy`` unit vectors), ``edge`` (PNG 0/255) and
``person`` (saliency: the person class, PNG 0/255). Image ``i`` (train first, then val; id
``f"{i:05d}"``) is scene :func:`~atrc_exp.data.synthetic.scene_seed` ``(seed, i)``; it is written
as ``.jpg`` for even ``i``, ``.png`` for odd ``i``; every 3rd (``i % 3 == 2``) at another size
(:func:`image_size`); some images have no label of some tasks (:data:`MISSING`, no file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .folder import SPEC_FILE
from .synthetic import (
    MANIFEST,
    SEMSEG_CLASSES,
    _check_size,
    _finish,
    _manifest,
    _mkdirs,
    _rendered,
    write_atomically,
)

#: The tasks of the synthetic folder dataset (the YAML's ``tasks``).
SPECS: dict[str, dict] = {
    "semseg": {"kind": "segmentation", "classes": list(SEMSEG_CLASSES)},
    "depth": {"kind": "depth"},
    "normals": {"kind": "normals"},
    "edge": {"kind": "edge"},
    "person": {"kind": "saliency"},
}
#: Task -> (m, r): image ``i`` has no label of the task when ``i % m == r``.
MISSING: dict[str, tuple[int, int]] = {"depth": (4, 1), "person": (4, 3)}
LAYOUT = "folder"


def image_size(index: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of image ``index``: every 3rd (``index % 3 == 2``) is ``(height + 8, width - 16)``
    (``width + 16`` when ``width < 32``), the others ``(height, width)``."""
    if index % 3 != 2:
        return height, width
    return height + 8, width - 16 if width >= 32 else width + 16


def has_label(task: str, index: int) -> bool:
    """Whether image ``index`` has a label file of ``task``."""
    m, r = MISSING.get(task, (0, 0))
    return not m or index % m != r


def write_folder_files(
    dest: Path, n_train: int, n_val: int, height: int, width: int, seed: int, progress: bool
) -> None:
    """Write the synthetic folder dataset into ``dest`` itself (the module doc says what); the
    manifest (``synthetic.json``) goes last. Deterministic for a seed."""
    import yaml
    from PIL import Image

    dest = Path(dest)
    _mkdirs(dest, ("images", "splits", *(f"labels/{t}" for t in SPECS)))
    person = SEMSEG_CLASSES.index("person")
    names = [f"{i:05d}" for i in range(n_train + n_val)]
    for i, name, s in _rendered(
        names, seed, lambda i: image_size(i, height, width), "synthetic folder", progress
    ):
        Image.fromarray(s["image"]).save(dest / "images" / f"{name}{'.png' if i % 2 else '.jpg'}", quality=95)
        labels = {
            "semseg": s["semseg"].astype(np.uint8),
            "depth": s["depth"].astype(np.float32),
            "normals": s["normals"].astype(np.float32),
            "edge": (s["edge"] > 0).astype(np.uint8) * np.uint8(255),
            "person": (s["semseg"] == person).astype(np.uint8) * np.uint8(255),
        }
        for task, lab in labels.items():
            if not has_label(task, i):
                continue
            if lab.dtype == np.uint8:
                Image.fromarray(lab).save(dest / "labels" / task / f"{name}.png")
            else:
                np.save(dest / "labels" / task / f"{name}.npy", lab)
    head = "# the embedded synthetic dataset (atrc-data synth --layout folder)\n"
    spec = yaml.safe_dump({"tasks": SPECS}, sort_keys=False, default_flow_style=None)
    (dest / SPEC_FILE).write_text(head + spec)
    _finish(dest, "splits", names, n_train, _manifest(n_train, n_val, height, width, seed, LAYOUT))


def ensure_folder_dataset(
    dest: str | Path, *, n_train: int, n_val: int, height: int, width: int, seed: int, progress: bool = True
) -> Path:
    """Make sure ``dest`` holds the synthetic folder dataset with these parameters; return ``dest``.

    Does nothing when its manifest matches; ``ValueError`` when ``dest`` holds anything else.
    Writes into a temporary sibling folder and renames it into place (under a file lock), so
    readers never see a partial dataset.
    """
    if n_train < 1 or n_val < 1:
        raise ValueError(f"a folder dataset needs n_train, n_val >= 1, got {n_train}, {n_val}")
    _check_size(height, width)
    dest = Path(dest).expanduser()
    wanted = _manifest(n_train, n_val, height, width, seed, LAYOUT)

    def done() -> bool:
        if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
            return False
        try:
            have = json.loads((dest / MANIFEST).read_text())
        except (OSError, ValueError):
            have = None
        if have == wanted:
            return True
        what = "another synthetic dataset" if have else "other files"
        raise ValueError(
            f"{dest} already holds {what}: choose another --out, or delete {dest} to write it there"
        )

    def write(tmp: Path) -> None:
        write_folder_files(tmp, n_train, n_val, height, width, seed, progress)

    write_atomically(dest, dest.parent / f".{dest.name}.lock", done, write)
    return dest
