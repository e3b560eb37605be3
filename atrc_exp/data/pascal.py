"""PASCAL-Context reader for the published ``PASCAL_MT`` layout (as ASTMT / MTI-Net / ATRC use it).

``<data_dir>/PASCAL_MT/``::

    JPEGImages/<id>.jpg                       RGB image (at most 500×500)
    semseg/VOC12/<id>.png                     21-class labels (0 background, 255 ignore); looked up
    semseg/pascal-context/<id>.png            first in VOC12/, then in pascal-context/
    human_parts/<id>.mat                      Pascal-Part ``anno`` struct (see below)
    pascal-context/trainval/<id>.mat          ``LabelMap``: the 459-class PASCAL-Context labels
    normals_distill/<id>.png                  RGB, n = 2·v/255 − 1 (distilled from an NYUD model)
    sal_distill/<id>.png                      grey, salient where v/255 > 0.5
    ImageSets/Context/{train,val}.txt         one id per line (4998 / 5105)

Targets (the original loader's rules):

* **semseg**: the PNG's values as they are (0..20, 255 ignore).
* **human_parts**: ``anno[0][0][1][0]`` is the object list; object fields by position are
  ``class`` (0), ``class_ind`` (1), ``mask`` (2), ``parts`` (3) and a part is
  ``(part_name, mask)``. Every person object (class_ind 15) that has parts paints its parts with
  :data:`HUMAN_PART_MAP` (Pascal-Part names → head 1, torso 2, upper arm 3, lower arm 4, upper leg
  5, lower leg 6), the rest is background 0. An image without a person, or whose people have no
  parts, has no labels: the whole map is 255 (the original returns zeros and its
  ``AddIgnoreRegions`` turns an all-zero map into 255 —
  :class:`~atrc_exp.data.to_tensor.NormalizePadToTensor` applies the same rule after cropping).
  Which images contain a person is computed once per split and cached in the user's cache (the
  data folder may be read-only).
* **edge**: ``thin(|Laplacian(LabelMap)| > 0)`` (float 0/1).
* **normals**: kept only on pixels whose ``LabelMap`` class is one of the original's 170
  (:data:`NORMALS_VALID_CONTEXT_CLASSES`, shipped as ``atrc_exp/resources/``
  ``pascal_context_normals_valid_classes.json``), zero elsewhere (→ 255 in ``NormalizePadToTensor``).
* **sal**: ``v / 255 > 0.5`` (int 0/1).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import cv2
import numpy as np
import scipy.io as sio
from scipy import ndimage as ndi

from ..files import write_atomic
from ..tasks import IGNORE_INDEX
from .nyud import DataError, LayoutReader, read_image, read_label_png

#: ``class_ind`` of a person in Pascal-Part (VOC order, 1-based).
HUMAN_PARTS_CATEGORY = 15

#: Pascal-Part person part names → the 6 parts of ASTMT's ``HUMAN_PART[6]`` (1 head, 2 torso,
#: 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg).
HUMAN_PART_MAP: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6),
}


def load_normals_valid_classes() -> dict[int, str]:
    """``{LabelMap id: class name}`` of the 170 PASCAL-Context classes whose distilled normals the
    original keeps (the classes whose name is also an NYUD class, except ``unknown``, plus
    ``tvmonitor``), read from the package resource ``pascal_context_normals_valid_classes.json``."""
    res = files("atrc_exp") / "resources" / "pascal_context_normals_valid_classes.json"
    return {int(k): str(v) for k, v in json.loads(res.read_text(encoding="utf-8"))["classes"].items()}


#: ``{LabelMap id: class name}``: where the distilled normals are kept (see
#: :func:`load_normals_valid_classes`); ``dataset.normals_valid_classes`` overrides the ids.
NORMALS_VALID_CONTEXT_CLASSES: dict[int, str] = load_normals_valid_classes()

_CACHE_VERSION = 1


# Thinning (skimage.morphology.thin, Guo & Hall 1989), so that we need no scikit-image


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    def bits(n: int) -> list[bool]:
        return [bool(n >> i & 1) for i in range(8)]

    def g1(b):
        return sum(1 for i in (0, 2, 4, 6) if not b[i] and (b[i + 1] or b[(i + 2) % 8])) == 1

    def g2(b):
        n1 = sum(1 for k in (1, 3, 5, 7) if b[k] or b[k - 1])
        n2 = sum(1 for k in (1, 3, 5, 7) if b[k] or b[(k + 1) % 8])
        return min(n1, n2) in (2, 3)

    def g3(b):
        return not ((b[1] or b[2] or not b[7]) and b[0])

    def g3p(b):
        return not ((b[5] or b[6] or not b[3]) and b[4])

    lut1 = np.array([g1(bits(n)) and g2(bits(n)) and g3(bits(n)) for n in range(256)])
    lut2 = np.array([g1(bits(n)) and g2(bits(n)) and g3p(bits(n)) for n in range(256)])
    return lut1, lut2


_THIN_LUTS = _thin_luts()
_THIN_MASK = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(image: np.ndarray, max_num_iter: int | None = None) -> np.ndarray:
    """Morphological thinning of a binary image to 1-pixel lines (same algorithm and result as
    ``skimage.morphology.thin``, which the original loader uses)."""
    skel = np.asarray(image, dtype=bool).astype(np.uint8)
    n_old, n_new, it = -1, int(skel.sum()), 0
    while n_old != n_new and (max_num_iter is None or it < max_num_iter):
        n_old = n_new
        for lut in _THIN_LUTS:
            nb = ndi.correlate(skel, _THIN_MASK, mode="constant")
            skel[np.take(lut, nb) & (skel > 0)] = 0
        n_new = int(skel.sum())
        it += 1
    return skel.astype(bool)


def edges_from_labelmap(label_map: np.ndarray) -> np.ndarray:
    """The original's edge target: thinned ``|Laplacian(LabelMap)| > 0`` as float32 0/1."""
    lap = cv2.Laplacian(np.ascontiguousarray(label_map).astype(np.float64), cv2.CV_64F)
    return thin(np.abs(lap) > 0).astype(np.float32)


def _loadmat(path: Path, split_file: Path) -> dict:
    if not path.is_file():
        raise DataError(f"missing file {path} (listed in {split_file})")
    try:
        return sio.loadmat(str(path))
    except Exception as e:  # scipy raises ValueError/TypeError/MatReadError on damaged files
        raise DataError(f"unreadable file {path} (listed in {split_file}): {e}") from e


def _anno_objects(mat: dict, path: Path) -> list:
    """The object records of a Pascal-Part ``anno`` struct (``anno[0][0][1][0]``)."""
    try:
        objs = mat["anno"][0][0][1]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a Pascal-Part annotation (no anno.objects): {e}") from e
    if objs.size == 0:
        return []
    return list(objs[0])


def _obj_class(obj) -> int:
    return int(np.asarray(obj[1]).ravel()[0])


def person_parts(mat: dict, path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Paint the 6-part map of every person that has parts; None when there is none."""
    target = None
    for obj in _anno_objects(mat, path):
        if _obj_class(obj) != HUMAN_PARTS_CATEGORY:
            continue
        parts = obj[3]
        if len(parts) == 0 or parts.size == 0:
            continue
        if target is None:
            target = np.zeros(shape, np.int64)
        for part in parts[0]:
            name = str(np.asarray(part[0]).ravel()[0])
            if name not in HUMAN_PART_MAP:
                raise DataError(f"{path}: unknown human part name {name!r}")
            mask = np.asarray(part[1]).astype(bool)
            if mask.shape != shape:
                raise DataError(f"{path}: part mask size {mask.shape} differs from its image {shape}")
            target[mask] = HUMAN_PART_MAP[name]
    return target


@dataclass
class _ImageContext:
    """One image being read: its name, size and ``LabelMap`` (loaded once, for edges and normals)."""

    reader: PASCALMT
    index: int
    name: str
    img_path: Path
    hw: tuple[int, int]

    @functools.cached_property
    def label_map(self) -> np.ndarray:
        r = self.reader
        p = r.root / "pascal-context" / "trainval" / f"{self.name}.mat"
        mat = _loadmat(p, r.split_file)
        if "LabelMap" not in mat:
            raise DataError(f"{p}: no LabelMap variable (listed in {r.split_file})")
        r._check_size(mat["LabelMap"], p, self.img_path, self.hw)
        return np.asarray(mat["LabelMap"])


class PASCALMT(LayoutReader):
    """One split of PASCAL_MT (``split``: ``train`` or ``val``).

    Args:
        num_classes: semseg classes (21); other labels than 0..K-1 and 255 are an error.
        normals_valid_classes: ``LabelMap`` ids whose normals are kept (default: the original's
            170, :data:`NORMALS_VALID_CONTEXT_CLASSES`).
        cache_dir: where the per-image person lookup is cached (default: the user's cache).
        area_thres: objects of at most this many pixels do not count (the original's 0).
    """

    NAME, LAYOUT, DATASET, SPLIT_DIR = "PASCAL-Context", "PASCAL_MT", "pascal_context", "ImageSets/Context"
    FOLDERS = "JPEGImages/, semseg/, human_parts/, pascal-context/trainval/, normals_distill/, sal_distill/"
    UNPACK = " and unpack it"
    TASKS = ("semseg", "human_parts", "sal", "normals", "edge")

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        tasks: Sequence,
        transform=None,
        num_classes: int = 21,
        normals_valid_classes: Sequence[int] | None = None,
        cache_dir: str | Path | None = None,
        area_thres: int = 0,
    ):
        super().__init__(data_dir, split, tasks, transform)
        self.num_classes = int(num_classes)
        valid = NORMALS_VALID_CONTEXT_CLASSES if normals_valid_classes is None else normals_valid_classes
        self.normals_valid_classes = np.array(sorted(int(c) for c in valid), dtype=np.int64)
        self.area_thres = int(area_thres)
        if cache_dir is None:
            from ..config import cache_dir as _user_cache

            cache_dir = _user_cache()
        self.cache_dir = Path(cache_dir)
        self.has_person: list[bool] | None = None
        if "human_parts" in self.tasks:
            objs = self.object_classes()
            self.has_person = [HUMAN_PARTS_CATEGORY in objs[n] for n in self.names]

    def _lookup_path(self) -> tuple[Path, str]:
        h = hashlib.sha256()
        h.update(f"{_CACHE_VERSION}|{self.root.resolve()}|{self.split}|{self.area_thres}".encode())
        for p in (self.root / "human_parts" / f"{n}.mat" for n in self.names):
            try:
                st = p.stat()
                h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"|{p.name}:missing".encode())
        digest = h.hexdigest()
        return self.cache_dir / "pascal_parts" / f"{self.split}_{digest[:24]}.json", digest

    def object_classes(self) -> dict[str, list[int]]:
        """``{image id: [class_ind of each object larger than area_thres, else -1]}``, computed
        once (it reads every ``human_parts/*.mat``) and cached outside the data folder."""
        path, digest = self._lookup_path()
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("digest") == digest and set(data["objects"]) >= set(self.names):
                    return data["objects"]
            except (OSError, ValueError, KeyError):
                pass  # damaged cache: recompute
        objects: dict[str, list[int]] = {}
        for n in self.names:
            p = self.root / "human_parts" / f"{n}.mat"
            mat = _loadmat(p, self.split_file)
            objects[n] = [
                _obj_class(o) if int(np.asarray(o[2]).sum()) > self.area_thres else -1
                for o in _anno_objects(mat, p)
            ]
        try:
            write_atomic(
                path, json.dumps({"digest": digest, "root": str(self.root), "objects": objects}).encode()
            )
        except OSError:
            pass  # a read-only cache only costs the recomputation next time
        return objects

    def semseg_path(self, name: str) -> Path:
        for sub in ("VOC12", "pascal-context"):
            p = self.root / "semseg" / sub / f"{name}.png"
            if p.is_file():
                return p
        raise DataError(
            f"missing file semseg/VOC12/{name}.png or semseg/pascal-context/{name}.png under {self.root} "
            f"(listed in {self.split_file})"
        )

    def _semseg(self, c: _ImageContext) -> np.ndarray:
        p = self.semseg_path(c.name)
        raw = read_label_png(p, self.split_file)
        bad = (raw >= self.num_classes) & (raw != IGNORE_INDEX)
        if bad.any():
            raise DataError(
                f"{p}: label {int(raw[bad].max())} outside 0..{self.num_classes - 1} and 255 "
                f"(listed in {self.split_file})"
            )
        self._check_size(raw, p, c.img_path, c.hw)
        return raw.astype(np.int64)

    def _human_parts(self, c: _ImageContext) -> np.ndarray:
        arr = None
        if self.has_person is not None and self.has_person[c.index]:
            p = self.root / "human_parts" / f"{c.name}.mat"
            arr = person_parts(_loadmat(p, self.split_file), p, c.hw)
        if arr is None or not (arr > 0).any():
            arr = np.full(c.hw, IGNORE_INDEX, np.int64)
        return arr

    def _edge(self, c: _ImageContext) -> np.ndarray:
        return edges_from_labelmap(c.label_map)

    def _normals(self, c: _ImageContext) -> np.ndarray:
        p = self._path("normals_distill", c.name, ".png")
        raw = read_image(p, self.split_file)  # RGB, as PIL reads it in the original
        self._check_size(raw, p, c.img_path, c.hw)
        arr = (2.0 * raw.astype(np.float32) / 255.0 - 1.0).astype(np.float32)
        arr[~np.isin(c.label_map, self.normals_valid_classes)] = 0.0
        return arr

    def _sal(self, c: _ImageContext) -> np.ndarray:
        p = self._path("sal_distill", c.name, ".png")
        raw = read_label_png(p, self.split_file)
        self._check_size(raw, p, c.img_path, c.hw)
        return (raw.astype(np.float32) / 255.0 > 0.5).astype(np.int64)

    def load_raw(self, index: int) -> dict:
        """The untransformed sample: numpy arrays in HWC layout plus ``meta``."""
        name = self.names[index]
        img_path = self._path("JPEGImages", name, ".jpg")
        image = read_image(img_path, self.split_file)
        ctx = _ImageContext(self, index, name, img_path, image.shape[:2])
        sample = {"image": image, **{task: getattr(self, f"_{task}")(ctx) for task in self.tasks}}
        sample["meta"] = {"name": name, "size": tuple(ctx.hw)}
        return sample
