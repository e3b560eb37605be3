"""Auxiliary classification targets of the regression tasks.

* **Normals**: 40 centroids; the aux target of a pixel is the index of the nearest one
  (:func:`atrc_exp.losses.normals_to_centroid_index`). NYUD-v2 and PASCAL-Context use the original
  implementation's published centroids, shipped in ``atrc_exp/resources/`` (class k = row k,
  :func:`published_normal_centroids`), so an imported checkpoint's aux normals head predicts the
  classes it was trained on. Other datasets (and ``dataset.normal_centroids=kmeans``) use k-means
  (:func:`scipy.cluster.vq.kmeans2`, k-means++ init, fixed seed) over unit normals sampled from the
  training split, normalised to unit length, computed once per dataset and cached in the user's
  cache (:func:`cached_normal_centroids`).
* **Depth**: 40 log bins between 0.7 m and 10 m (:func:`atrc_exp.losses.depth_to_bins`, re-exported
  here; :func:`depth_bin_edges` gives the bin edges in metres).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..files import write_atomic
from ..losses import depth_to_bins
from ..tasks import IGNORE_INDEX, NUM_DEPTH_BINS, NUM_NORMAL_CENTROIDS, PUBLISHED_NORMAL_CENTROIDS

__all__ = [
    "cached_normal_centroids",
    "compute_normal_centroids",
    "depth_bin_edges",
    "depth_to_bins",
    "published_normal_centroids",
    "PUBLISHED_NORMAL_CENTROIDS",
    "sample_normals",
]


def published_normal_centroids(name: str) -> np.ndarray:
    """The original's published normal centroids of set ``name`` (``nyud``, ``pascal_context``):
    a K×3 float32 array (K = 40), row k = class k of the aux normals target."""
    from importlib.resources import files

    if name not in PUBLISHED_NORMAL_CENTROIDS:
        raise ValueError(
            f"no published normal centroids named {name!r}: choose one of "
            f"{', '.join(PUBLISHED_NORMAL_CENTROIDS)}, or 'kmeans' to compute them from the training split"
        )
    text = (files("atrc_exp") / "resources" / PUBLISHED_NORMAL_CENTROIDS[name]).read_text()
    return np.asarray(json.loads(text)["centroids"], dtype=np.float32)


_VERSION = 1


def depth_bin_edges(num_bins: int = NUM_DEPTH_BINS, d_min: float = 0.7, d_max: float = 10.0) -> np.ndarray:
    """The ``num_bins + 1`` edges (metres) of the log depth bins of :func:`depth_to_bins`:
    bin ``b`` holds ``edges[b] <= d < edges[b + 1]`` (the first and last bins are open-ended)."""
    return d_min * (d_max / d_min) ** (np.arange(num_bins + 1) / num_bins)


def sample_normals(maps: Iterable[np.ndarray], per_image: int = 2000, seed: int = 0) -> np.ndarray:
    """Up to ``per_image`` valid unit normals (N×3 float32) from each H×W×3 map; pixels of zero
    norm or marked 255 are skipped."""
    rng = np.random.default_rng(seed)
    chunks = []
    for n in maps:
        v = np.asarray(n, np.float32).reshape(-1, 3)
        norm = np.linalg.norm(v, axis=1)
        ok = (norm > 1e-6) & ~(v == IGNORE_INDEX).any(1) & np.isfinite(norm)
        v = v[ok] / norm[ok, None]
        if len(v) > per_image:
            v = v[rng.choice(len(v), per_image, replace=False)]
        chunks.append(v)
    return np.concatenate(chunks) if chunks else np.zeros((0, 3), np.float32)


def compute_normal_centroids(normals: np.ndarray, k: int = NUM_NORMAL_CENTROIDS, seed: int = 0) -> np.ndarray:
    """k-means (k-means++ init, 50 iterations, ``seed``) of unit normals (N×3) → k×3 unit centroids.

    With fewer than ``k`` distinct samples the centroids are padded with unit vectors spread over
    the sphere (a Fibonacci lattice) so that the result always has ``k`` rows.
    """
    from scipy.cluster.vq import kmeans2

    x = np.asarray(normals, np.float64).reshape(-1, 3)
    distinct = np.unique(np.round(x, 6), axis=0)
    if len(distinct) >= k:
        cent, _ = kmeans2(x, k, iter=50, minit="++", seed=np.random.default_rng(seed), missing="warn")
    else:
        i = np.arange(k) + 0.5
        phi, theta = np.arccos(1 - 2 * i / k), np.pi * (1 + 5**0.5) * i
        fib = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)
        cent = np.concatenate([distinct, fib[: k - len(distinct)]])
    norm = np.linalg.norm(cent, axis=1, keepdims=True)
    cent = np.where(norm > 1e-8, cent / np.maximum(norm, 1e-12), np.array([0.0, 0.0, -1.0]))
    return cent.astype(np.float32)


def cached_array(
    cache_root: str | Path, folder: str, key_params: dict, shape: tuple, compute: Callable
) -> np.ndarray:
    """A float32 array of ``shape`` derived from a dataset, from
    ``cache_root/<folder>/<name>_<key>.npy`` (key: a hash of ``key_params``, the dataset identity
    and parameters), computed by ``compute()`` and written atomically on the first call; a damaged
    or non-finite file is recomputed, a read-only cache only costs the recomputation."""
    blob = json.dumps({"version": _VERSION, **key_params}, sort_keys=True, default=str)
    tag = str(key_params.get("name", "dataset")).replace("/", "_")
    path = Path(cache_root) / folder / f"{tag}_{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == tuple(shape) and np.isfinite(arr).all():
                return arr.astype(np.float32)
        except (OSError, ValueError):
            pass  # damaged: recompute
    arr = np.asarray(compute(), np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    try:
        write_atomic(path, buf.getvalue())
    except OSError:
        pass  # read-only cache: recompute next time
    return arr


def cached_normal_centroids(
    cache_root: str | Path, key_params: dict, load_maps: Callable[[], Iterable[np.ndarray]]
) -> np.ndarray:
    """The k-means centroids (40, 2000 normals per image, seed 0) of the maps ``load_maps()`` yields,
    cached in ``cache_root/normal_centroids/`` (:func:`cached_array`)."""
    k, per_image, seed = NUM_NORMAL_CENTROIDS, 2000, 0
    return cached_array(
        cache_root,
        "normal_centroids",
        {"k": k, "per_image": per_image, "seed": seed, **key_params},
        (k, 3),
        lambda: compute_normal_centroids(sample_normals(load_maps(), per_image, seed), k, seed),
    )


def depth_label_range(maps: Iterable[np.ndarray]) -> np.ndarray:
    """``[min, max]`` (metres, float32) of the aux depth bins from depth labels: the 1st and 99th
    percentile of their labelled values (> 0, finite); an empty array when none is labelled."""
    values = [d[(d > 0) & np.isfinite(d)] for d in (np.asarray(m, np.float32) for m in maps)]
    v = np.concatenate(values) if values else np.zeros(0, np.float32)
    if v.size == 0:
        return np.zeros(0, np.float32)
    lo, hi = (float(x) for x in np.percentile(v, [1, 99]))
    if not hi > lo:
        hi = lo * 1.5 + 1e-3
    return np.asarray([lo, hi], np.float32)
