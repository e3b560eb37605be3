"""Synthetic multi-task dataset: procedurally rendered rooms written in the NYUD_MT layout.

:func:`render_scene` ray-casts one scene (see :mod:`atrc_exp.data.synthetic_scene` for the
geometry and the frame conventions) and returns mutually consistent labels for every task:

=============== ================ ===============================================================
key             dtype / shape    meaning
=============== ================ ===============================================================
``image``       uint8  H×W×3     RGB, Lambertian shading + textures + gaussian sensor noise
``depth``       float32 H×W      z-depth in metres (along the optical axis), about 1..10
``normals``     float32 H×W×3    unit normals, camera frame, OpenCV axes (x right, y down,
                                 z forward), oriented toward the camera (n · ray < 0)
``semseg``      uint8  H×W       index into :data:`SEMSEG_CLASSES` (K = 7)
``instance``    int32  H×W       1..6 the room faces, 7.. one id per object (a figure is one)
``edge``        uint8  H×W       1-pixel boundaries of instances, occlusions and creases
``sal``         uint8  H×W       1 on objects (sphere, box, cylinder, person), 0 on the room
``human_parts`` uint8  H×W       index into :data:`HUMAN_PART_NAMES`, > 0 only on the figure
=============== ================ ===============================================================

:func:`atrc_exp.data.layouts.ensure_synthetic_dataset` writes ``<root>/NYUD_MT/`` (default) or
``<root>/PASCAL_MT/`` (``layout="PASCAL_MT"``) once (atomically, safe under concurrency) so that
:class:`atrc_exp.data.nyud.NYUDMT` / :class:`atrc_exp.data.pascal.PASCALMT` read it like the real
dataset.

The PASCAL_MT files have the real ones' formats: ``semseg/{VOC12,pascal-context}/*.png`` (the 7
synthetic classes, 0..6, VOC12 for even image indices), Pascal-Part ``human_parts/*.mat``
(``anno`` struct with ``imname`` and ``objects``: ``class``, ``class_ind``, ``mask``, ``parts``
with ``part_name``/``mask``; the person of every 5th image (index 3, 8, ...) is written without
parts, as happens in Pascal-Part), ``pascal-context/trainval/*.mat`` (``LabelMap`` in 459-class ids, see
:data:`PASCAL_CONTEXT_IDS`: every synthetic class is one of the 170 whose normals are kept), RGB
``normals_distill/*.png`` and grey ``sal_distill/*.png`` (20 background, 220 salient).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from filelock import FileLock
from tqdm import tqdm

from .synthetic_scene import (
    FIRST_OBJECT_CLASS,
    HUMAN_PART_NAMES,
    SEMSEG_CLASSES,
    Scene,
    _dot,
    cast,
    intrinsics,
    sample_scene,
)

__all__ = [
    "HUMAN_PART_NAMES",
    "PASCAL_CONTEXT_IDS",
    "SEMSEG_CLASSES",
    "intrinsics",
    "render_scene",
    "scene_seed",
    "write_nyud_files",
    "write_nyud_layout",
    "write_pascal_files",
    "write_pascal_layout",
]

GENERATOR = "atrc_exp.synthetic"
#: Bump when the renderer's output changes, so stale datasets are detected.
VERSION = 1
MANIFEST = "synthetic.json"
_PARAMS = ("n_train", "n_val", "height", "width", "seed")

#: Synthetic class -> (PASCAL-Context 459-class LabelMap id, Pascal-Part object class, class_ind).
PASCAL_CONTEXT_IDS: dict[str, tuple[int, str, int]] = {
    "wall": (440, "", 0),
    "floor": (158, "", 0),
    "ceiling": (68, "", 0),
    "sphere": (10, "pottedplant", 16),  # a "ball" (an NYUD class too: normals kept)
    "box": (37, "diningtable", 11),
    "cylinder": (34, "bottle", 5),
    "person": (284, "person", 15),
}
#: Synthetic part index -> Pascal-Part names (left, right); one connected piece each.
_PART_NAMES = {1: ("head", "hair"), 2: ("torso", "neck"), 3: ("luarm", "ruarm"), 4: ("llarm", "rlarm"),
               5: ("luleg", "ruleg"), 6: ("llleg", "rlleg")}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Rendering: labels, shading, edges
# ----------------------------------------------------------------------------------------------

#: An edge separates two neighbouring pixels of different surfaces whose depths differ by more than
#: this fraction of the nearer one (an occlusion boundary) ...
EDGE_DEPTH_REL = 0.05
#: ... or whose normals differ by more than this angle (a crease); any instance change is an edge.
EDGE_CREASE_DEG = 30.0


def _edges(inst: np.ndarray, surf: np.ndarray, depth: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """1-pixel edges: a pixel is marked when it and its right or bottom neighbour differ (H×W uint8)."""
    edge = np.zeros(inst.shape, bool)
    cos_thr = np.cos(np.radians(EDGE_CREASE_DEG))
    for a, b in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
    ):
        other_surface = surf[a] != surf[b]
        jump = np.abs(depth[a] - depth[b]) > EDGE_DEPTH_REL * np.minimum(depth[a], depth[b])
        crease = _dot(normals[a], normals[b]) < cos_thr
        edge[a] |= (inst[a] != inst[b]) | (other_surface & (jump | crease))
    return edge.astype(np.uint8)


def render(scene: Scene, height: int, width: int, noise_rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Ray-cast ``scene`` at ``height``×``width``: the arrays of the module doc, shaded with a
    Lambertian point or directional light (shadows cast by the objects) plus sensor noise."""
    fx, fy, cx, cy = intrinsics(height, width)
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    d_cam = np.stack([(jj - cx) / fx, (ii - cy) / fy, np.ones_like(jj)], -1).reshape(-1, 3)
    d = d_cam @ scene.R_wc.T  # world directions with unit optical-axis component: t == z-depth
    o = scene.cam_pos
    t_room, face = scene.room.intersect(o, d)
    t, owner = cast(scene.prims, o, d, t_room)
    p = o + t[:, None] * d

    n_px = len(t)
    normal = np.empty((n_px, 3))
    albedo = np.empty((n_px, 3))
    semseg = np.empty(n_px, np.uint8)
    inst = np.empty(n_px, np.int32)
    part = np.zeros(n_px, np.uint8)
    surf = np.empty(n_px, np.int64)  # one id per smooth surface patch (face of a primitive)
    room = scene.room
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(-1, len(scene.prims) + 1))
    room_idx = order[bounds[0] : bounds[1]]
    for f in range(6):
        idx = room_idx[face[room_idx] == f]
        normal[idx] = room.NORMALS[f]
        semseg[idx], inst[idx], surf[idx] = room.CLASSES[f], room.instances[f], f
        albedo[idx] = room.textures[f].albedo(p[idx])
    for k, prim in enumerate(scene.prims):
        idx = order[bounds[k + 1] : bounds[k + 2]]
        if idx.size == 0:
            continue
        nk, fk, local = prim.surface(p[idx])
        normal[idx], surf[idx] = nk, 8 * (k + 1) + fk
        semseg[idx], inst[idx], part[idx] = prim.semseg, prim.instance, prim.part
        albedo[idx] = prim.texture.albedo(local)
    normal[_dot(normal, d) > 0] *= -1  # face the camera
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)

    # Lambertian shading, point or directional light, cast shadows from the objects
    if scene.light_pos is not None:
        lvec = scene.light_pos - p
        dist = np.linalg.norm(lvec, axis=1)
        ldir = lvec / dist[:, None]
        power = 1.6 / (1.0 + (dist / 4.0) ** 2)
        t_max = 1.0
    else:
        lvec = ldir = np.broadcast_to(scene.light_dir, p.shape)
        power = np.full(n_px, 0.9)
        t_max = np.inf
    ndl = np.clip(_dot(normal, ldir), 0.0, None)
    lit = np.flatnonzero(ndl > 0)
    if lit.size and scene.prims:
        _, occ = cast(
            scene.prims,
            p[lit] + 1e-4 * normal[lit],
            np.ascontiguousarray(lvec[lit]),
            np.full(lit.size, t_max),
        )
        ndl[lit[occ >= 0]] = 0.0
    shade = scene.ambient + (ndl * power)[:, None] * scene.light_color
    srgb = np.clip(albedo * shade, 0.0, 1.0) ** (1 / 2.2) * 255.0
    srgb += noise_rng.normal(0.0, scene.noise_sigma, srgb.shape)
    image = np.clip(np.rint(srgb), 0, 255).astype(np.uint8).reshape(height, width, 3)

    normal_cam = (normal @ scene.R_wc).reshape(height, width, 3)
    depth = t.reshape(height, width)
    inst_hw = inst.reshape(height, width)
    edge = _edges(inst_hw, surf.reshape(height, width), depth, normal_cam)
    semseg_hw = semseg.reshape(height, width)
    return {
        "image": image,
        "depth": depth.astype(np.float32),
        "normals": normal_cam.astype(np.float32),
        "semseg": semseg_hw,
        "instance": inst_hw,
        "edge": edge,
        "sal": (semseg_hw >= FIRST_OBJECT_CLASS).astype(np.uint8),
        "human_parts": part.reshape(height, width),
    }


def render_scene(seed: int, height: int, width: int) -> dict[str, np.ndarray]:
    """Render scene ``seed`` (int ≥ 0) at ``height``×``width``; keys and dtypes in the module doc.

    The geometry depends only on ``seed``, so one seed gives the same scene at every size.
    """
    _check_size(height, width)
    return render(sample_scene(seed), height, width, np.random.default_rng([seed, 1]))


def scene_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` of a dataset with base ``seed`` (independent of the split sizes)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)


def _manifest(n_train: int, n_val: int, height: int, width: int, seed: int, layout: str) -> dict:
    params = {"n_train": n_train, "n_val": n_val, "height": height, "width": width, "seed": seed}
    head = {"layout": layout, "generator": GENERATOR, "version": VERSION}
    return {**head, **params, "semseg_classes": list(SEMSEG_CLASSES)}


def _rendered(
    names: list[str], seed: int, size: Callable[[int], tuple[int, int]], desc: str, progress: bool
) -> Iterator:
    """``(i, name, render_scene(scene_seed(seed, i), *size(i)))`` for every name, with a progress bar."""
    for i in tqdm(range(len(names)), desc=desc, unit="img", disable=not progress):
        yield i, names[i], render_scene(scene_seed(seed, i), *size(i))


def _finish(dest: Path, split_dir: str, names: list[str], n_train: int, manifest: dict) -> None:
    """The split lists, then the manifest (last: it marks the dataset complete)."""
    (dest / split_dir / "train.txt").write_text("".join(f"{n}\n" for n in names[:n_train]))
    (dest / split_dir / "val.txt").write_text("".join(f"{n}\n" for n in names[n_train:]))
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _mkdirs(dest: Path, subs) -> None:
    for sub in subs:
        (dest / sub).mkdir(parents=True, exist_ok=True)


def _imwrite(path: Path, arr: np.ndarray, *params: int) -> None:
    """``cv2.imwrite``; OSError when it fails."""
    if not cv2.imwrite(str(path), arr, list(params)):
        raise OSError(f"could not write {path}")


def write_nyud_files(
    dest: Path, n_train: int, n_val: int, height: int, width: int, seed: int, progress: bool
) -> None:
    """Write the NYUD_MT files into ``dest`` itself; the manifest goes last."""
    _mkdirs(dest, ("images", "segmentation", "depth", "normals", "edge", "gt_sets"))
    names = [f"{i:05d}" for i in range(n_train + n_val)]
    for _, name, s in _rendered(names, seed, lambda i: (height, width), "synthetic NYUD_MT", progress):
        bgr = cv2.cvtColor(s["image"], cv2.COLOR_RGB2BGR)
        _imwrite(dest / "images" / f"{name}.jpg", bgr, cv2.IMWRITE_JPEG_QUALITY, 95)
        _imwrite(dest / "segmentation" / f"{name}.png", s["semseg"] + np.uint8(1))
        np.save(dest / "depth" / f"{name}.npy", s["depth"])
        np.save(dest / "normals" / f"{name}.npy", s["normals"])
        np.save(dest / "edge" / f"{name}.npy", s["edge"].astype(np.float32))
    _finish(dest, "gt_sets", names, n_train, _manifest(n_train, n_val, height, width, seed, "NYUD_MT"))


def _struct_array(records: list[tuple], fields: tuple[str, ...]) -> np.ndarray:
    """A 1×N MATLAB struct array for ``scipy.io.savemat`` (empty → a 0×0 double, as MATLAB's [])."""
    if not records:
        return np.zeros((0, 0))
    arr = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        arr[0, i] = rec
    return arr


def _pascal_anno(name: str, s: dict, drop_parts: bool) -> dict:
    """The Pascal-Part ``anno`` struct of a rendered scene."""
    objects = []
    inst, sem, parts = s["instance"], s["semseg"], s["human_parts"]
    for iid in np.unique(inst[inst >= 7]):
        mask = inst == iid
        cls = SEMSEG_CLASSES[int(np.bincount(sem[mask]).argmax())]
        _, obj_name, class_ind = PASCAL_CONTEXT_IDS[cls]
        part_recs = []
        if cls == "person" and not drop_parts:
            for k, names in _PART_NAMES.items():
                pm = (mask & (parts == k)).astype(np.uint8)
                n_cc, cc = cv2.connectedComponents(pm, connectivity=8)
                for c in range(1, n_cc):
                    part_recs.append((names[min(c - 1, 1)], (cc == c).astype(np.uint8)))
        objects.append((obj_name, np.array([[class_ind]], np.uint8), mask.astype(np.uint8),
                        _struct_array(part_recs, ("part_name", "mask"))))  # fmt: skip
    return {"imname": name, "objects": _struct_array(objects, ("class", "class_ind", "mask", "parts"))}


def write_pascal_files(
    dest: Path, n_train: int, n_val: int, height: int, width: int, seed: int, progress: bool
) -> None:
    """Write the PASCAL_MT files into ``dest`` itself; the manifest goes last."""
    import scipy.io as sio

    labels = ("semseg/VOC12", "semseg/pascal-context", "human_parts", "pascal-context/trainval")
    _mkdirs(dest, ("JPEGImages", *labels, "normals_distill", "sal_distill", "ImageSets/Context"))
    ctx_ids = np.array([PASCAL_CONTEXT_IDS[c][0] for c in SEMSEG_CLASSES], np.uint16)
    names = [f"2008_{i:06d}" for i in range(n_train + n_val)]
    for i, name, s in _rendered(names, seed, lambda i: (height, width), "synthetic PASCAL_MT", progress):
        bgr = cv2.cvtColor(s["image"], cv2.COLOR_RGB2BGR)
        _imwrite(dest / "JPEGImages" / f"{name}.jpg", bgr, cv2.IMWRITE_JPEG_QUALITY, 95)
        _imwrite(dest / "semseg" / ("VOC12" if i % 2 == 0 else "pascal-context") / f"{name}.png", s["semseg"])
        sio.savemat(str(dest / "human_parts" / f"{name}.mat"), {"anno": _pascal_anno(name, s, i % 5 == 3)})
        sio.savemat(str(dest / "pascal-context/trainval" / f"{name}.mat"), {"LabelMap": ctx_ids[s["semseg"]]})
        nrm = np.clip(np.rint((s["normals"] + 1.0) * 127.5), 0, 255).astype(np.uint8)
        _imwrite(dest / "normals_distill" / f"{name}.png", cv2.cvtColor(nrm, cv2.COLOR_RGB2BGR))
        _imwrite(dest / "sal_distill" / f"{name}.png", np.where(s["sal"] > 0, 220, 20).astype(np.uint8))
    manifest = _manifest(n_train, n_val, height, width, seed, "PASCAL_MT")
    _finish(dest, "ImageSets/Context", names, n_train, manifest)


def _check_size(height: int, width: int) -> None:
    if height < 2 or width < 2:
        raise ValueError(f"image size must be at least 2×2, got {height}×{width}")


def _check_args(n_train: int, n_val: int, height: int, width: int) -> None:
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ValueError(f"need n_train, n_val >= 0 and at least one image, got {n_train}, {n_val}")
    _check_size(height, width)


def write_nyud_layout(root: str | Path, *, n_train, n_val, height, width, seed, progress=True) -> Path:
    """Render ``n_train + n_val`` scenes into ``root/NYUD_MT/`` and return that folder.

    Names are ``00000``, ``00001``… (train first, then val); image ``i`` has seed
    :func:`scene_seed` ``(seed, i)``. Files already there are overwritten, never removed; use
    :func:`atrc_exp.data.layouts.ensure_synthetic_dataset` for the atomic, idempotent version.
    """
    _check_args(n_train, n_val, height, width)
    write_nyud_files(Path(root) / "NYUD_MT", n_train, n_val, height, width, seed, progress)
    return Path(root) / "NYUD_MT"


def write_pascal_layout(root: str | Path, *, n_train, n_val, height, width, seed, progress=True) -> Path:
    """:func:`write_nyud_layout` in ``root/PASCAL_MT/``; names are ``2008_000000``… (train first)."""
    _check_args(n_train, n_val, height, width)
    write_pascal_files(Path(root) / "PASCAL_MT", n_train, n_val, height, width, seed, progress)
    return Path(root) / "PASCAL_MT"


def _existing_ok(root: Path, wanted: dict, layout: str) -> bool:
    """True if ``root/<layout>`` holds exactly the wanted dataset, False if absent; else ValueError."""
    ds = root / layout
    if not ds.exists():
        return False
    mf = ds / MANIFEST
    if not mf.is_file():
        raise ValueError(
            f"{ds} exists but has no {MANIFEST}: it is not a synthetic dataset (real {layout} data?). "
            f"Point paths.data_dir at another folder for dataset=synthetic, or move {ds} away"
        )
    try:
        have = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable manifest {mf} ({e}); delete {ds} to regenerate it") from e
    keys = ("generator", "version", *_PARAMS)
    diff = [f"{k}: on disk {have.get(k)!r}, wanted {wanted[k]!r}" for k in keys if have.get(k) != wanted[k]]
    if diff:
        raise ValueError(
            f"synthetic dataset {ds} was generated with other parameters ({'; '.join(diff)}). "
            f"Use another paths.data_dir for these settings, or delete {ds} to regenerate it"
        )
    return True


def write_atomically(dest: Path, lock: Path, done: Callable[[], bool], write: Callable[[Path], None]) -> None:
    """Unless ``done()``: under the file lock ``lock``, ask ``done()`` again (another process may
    have finished), then ``write`` into ``.<dest name>.tmp-<pid>`` beside ``dest`` and rename it to
    ``dest`` (an empty folder there is replaced), so that concurrent callers end up with one complete
    dataset and readers never see a partial one."""
    if done():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if done():
            return
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a crashed writer (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            if dest.is_dir():
                dest.rmdir()
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def ensure_layout_files(
    root: Path, layout: str, writer: Callable, *params: int, progress: bool = True
) -> None:
    """``writer(dest, *params, progress)`` (``params``: n_train, n_val, height, width, seed) into
    ``root/<layout>`` atomically, under ``root/.synthetic.lock``, unless that folder holds this
    dataset already (:func:`_existing_ok`)."""
    wanted = _manifest(*params, layout)

    def write(tmp: Path) -> None:
        writer(tmp, *params, progress)

    write_atomically(
        root / layout, root / ".synthetic.lock", lambda: _existing_ok(root, wanted, layout), write
    )
