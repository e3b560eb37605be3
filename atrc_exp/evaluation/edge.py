"""Edge F-measure (odsF / oisF) the BSDS / SEISM way, with pyEdgeEval's compiled kernels.

Per image (:func:`evaluate_edge_image`), the steps of the BSDS500 ``boundaryBench`` / SEISM
pipeline that ATRC's MATLAB evaluation ran on the PNGs it wrote: the map quantised to 8 bits,
``uint8(255·p)`` *truncated* (0.5 → 127); cropped to the image (from the centre of the padded
map, :func:`atrc_exp.tasks.crop_center`, or to the valid target pixels' bounding box), so the
tolerance is relative to the *original* image diagonal; NMS (pyEdgeEval's ``fast_nms``, Dollár's
``edgesNms``, r=1, s=5, m=1.01); ignore pixels set to 0; then for every threshold t (99: 0.01 …
0.99, BSDS' ``nthresh=99``) ``p >= t`` thinned and matched to the ground truth by BSDS'
``correspondPixels`` at ``max_dist × diagonal``, giving ``cntR, sumR, cntP, sumP`` (pyEdgeEval's
``evaluate_boundaries_threshold``). Over a split (:func:`summarize`) the counts are summed (so
they reduce across processes by addition); ``odsF`` = the best F over the thresholds, ``oisF`` =
the F of the counts at each image's own best threshold (×100). ``docs/evaluation.md`` compares it
with MATLAB SEISM's numbers.

**Determinism.** BSDS' ``correspondPixels`` draws the sparse outlier connections of its
assignment problem from a random generator seeded from the clock, so the same maps can give
counts that differ by a few pixels from call to call (MATLAB's version too). We reseed that
generator with a constant before every call (via the symbols the compiled extension exports), so
results are reproducible and independent of which process evaluated which image. If the symbols
can not be found (another pyEdgeEval build), a warning is logged and results may jitter slightly.

pyEdgeEval is imported on first use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tasks import IGNORE_INDEX, crop_center
from ..visualize import to_uint8_prob

log = logging.getLogger(__name__)

DEFAULT_NUM_THRESHOLDS = 99
#: Seed of BSDS' random outlier graph (any non-zero constant; 0 would mean "from the clock").
MATCH_SEED = 0x5EED
PYEDGEEVAL_PIN = "pyEdgeEval==0.2.8"
#: Images (after cropping the padding) thinner than this are matched without NMS.
MIN_NMS_SIDE = 3


def edge_thresholds(thresholds: int | Sequence[float] = DEFAULT_NUM_THRESHOLDS) -> np.ndarray:
    """``n`` → BSDS' ``linspace(1/(n+1), 1-1/(n+1), n)`` (0.01 … 0.99 for 99); a sequence → itself."""
    if isinstance(thresholds, (int, np.integer)):
        n = int(thresholds)
        if n < 1:
            raise ValueError(f"need at least one edge threshold, got {n}")
        return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)
    t = np.asarray(list(thresholds), dtype=np.float64).reshape(-1)
    if t.size == 0 or np.any(np.diff(t) <= 0) or t[0] <= 0 or t[-1] > 1:
        raise ValueError(f"edge thresholds must be increasing values in (0, 1], got {t.tolist()}")
    return t


_PEE: dict = {}


def require_pyedgeeval() -> dict:
    """Import pyEdgeEval's pieces once per process (its import prints a line: silenced)."""
    if _PEE:
        return _PEE
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from pyEdgeEval._lib import correspond_pixels
            from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
            from pyEdgeEval.preprocess import fast_nms
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"edge odsF needs pyEdgeEval ({e}); install it with `pip install {PYEDGEEVAL_PIN}` "
            "(a source package: it needs a C++ compiler, Cython and numpy at build time)"
        ) from e
    _PEE.update(
        correspond_pixels=_seeded(correspond_pixels),
        evaluate_boundaries_threshold=evaluate_boundaries_threshold,
        fast_nms=fast_nms,
    )
    return _PEE


def _seeded(correspond):
    """``correspond`` with BSDS' ``Random::rand`` inside the compiled matcher reseeded with
    :data:`MATCH_SEED` before every call; ``correspond`` itself (and a warning) if it can not be
    reached."""
    import ctypes
    import sys

    try:
        lib = ctypes.CDLL(sys.modules["pyEdgeEval._lib.correspond_pixels"].__file__)
        addr = ctypes.addressof(ctypes.c_char.in_dll(lib, "_ZN6Random4randE"))
        reseed = lib._ZN6Random6reseedEm
        reseed.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
        reseed.restype = None
    except (KeyError, AttributeError, OSError, ValueError, TypeError) as e:
        log.warning(
            "could not reach the random generator of pyEdgeEval's correspondPixels (%s): "
            "edge counts may differ by a few pixels between runs",
            e,
        )
        return correspond

    def seeded(img0, img1, max_dist=0.0075, outlier_cost=100.0):
        reseed(addr, MATCH_SEED)
        return correspond(img0, img1, max_dist=max_dist, outlier_cost=outlier_cost)

    return seeded


def _prf(count_r, sum_r, count_p, sum_p) -> tuple:
    """Precision, recall and F as pyEdgeEval/BSDS define them (a 0/0 ratio counts as 0)."""
    rec = count_r / (sum_r + (sum_r == 0))
    prec = count_p / (sum_p + (sum_p == 0))
    return prec, rec, 2 * prec * rec / (prec + rec + ((prec + rec) == 0))


@dataclass
class EdgeCounts:
    """Per-threshold BSDS counts of one image (float64 arrays of length T) and the time it took."""

    count_r: np.ndarray
    sum_r: np.ndarray
    count_p: np.ndarray
    sum_p: np.ndarray
    seconds: float = 0.0
    evaluated: bool = True

    def stack(self) -> np.ndarray:
        return np.stack([self.count_r, self.sum_r, self.count_p, self.sum_p])

    def best(self) -> np.ndarray:
        """The four counts at this image's best-F threshold (for oisF; first maximum, as BSDS)."""
        i = int(np.argmax(_prf(*self.stack())[2]))
        return np.array([self.count_r[i], self.sum_r[i], self.count_p[i], self.sum_p[i]])


def _crop_to_image(pred: np.ndarray, target: np.ndarray, image_size=None):
    """``(pred, target, valid)`` cropped to the image: the centred ``image_size`` window (validation
    pads with the image in the centre), or without a size the bounding box of the valid target
    pixels (the same window when the target has ground truth along the image border); ``None``
    when no pixel is valid."""
    if image_size is not None:
        pred, target = crop_center(pred, image_size), crop_center(target, image_size)
        valid = target != IGNORE_INDEX
        return (pred, target, valid) if valid.any() else None
    valid = target != IGNORE_INDEX
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return None
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return pred[sl], target[sl], valid[sl]


def evaluate_edge_image(
    pred: np.ndarray,
    target: np.ndarray,
    max_dist: float,
    thresholds: int | Sequence[float] = DEFAULT_NUM_THRESHOLDS,
    nms: bool = True,
    image_size: tuple[int, int] | None = None,
) -> EdgeCounts:
    """BSDS counts per threshold of one image.

    ``pred``: H×W edge probability — uint8 (0..255, as a PNG) or float in [0, 1] (quantised to
    8 bits first, :func:`to_uint8_prob`). ``target``: H×W ground truth, 1 = edge, 0 = no edge,
    255 = ignore (padding). ``max_dist``: tolerance as a fraction of the image diagonal (0.011
    NYUD, 0.0075 PASCAL). ``image_size``: ``(h, w)`` of the image inside the padded maps (cropped
    from their centre); ``None``: the bounding box of the valid target pixels.
    An image without any valid pixel contributes nothing (``evaluated=False``, all zeros).
    """
    t0 = time.perf_counter()
    pee = require_pyedgeeval()
    th = edge_thresholds(thresholds)
    pred, target = (np.asarray(a) for a in (pred, target))
    pred, target = (a.reshape(a.shape[-2:]) if a.ndim == 3 else a for a in (pred, target))
    if pred.shape != target.shape:
        raise ValueError(f"edge prediction {pred.shape} and target {target.shape} differ in size")
    if pred.dtype != np.uint8:
        pred = to_uint8_prob(pred)
    cropped = _crop_to_image(pred, target, image_size)
    if cropped is None:
        return EdgeCounts(*np.zeros((4, len(th))), time.perf_counter() - t0, evaluated=False)
    pred, target, valid = cropped
    prob = pred.astype(np.float64) / 255.0
    if nms and min(prob.shape) >= MIN_NMS_SIDE:  # NMS needs image gradients: skip on slivers
        prob = pee["fast_nms"](prob, r=1, s=5, m=1.01)
    prob = np.where(valid, prob, 0.0)
    gt = valid & (target >= 0.5)
    counts = _count_thresholds(pee, th, prob, gt, float(max_dist))
    return EdgeCounts(*counts, seconds=time.perf_counter() - t0)


def _count_thresholds(pee, th, prob, gt, max_dist):
    """pyEdgeEval's ``evaluate_boundaries_threshold`` (its thinning and matching, seeded), with
    the thresholds above the maximum of the map skipped: their counts are known exactly
    (nothing predicted, nothing matched)."""
    import pyEdgeEval.common.binary_label.evaluate_boundaries as eb

    n = len(th)
    count_r, sum_r, count_p, sum_p = (np.zeros(n) for _ in range(4))
    active = th <= prob.max() if prob.size else np.zeros(n, bool)
    if gt.any():
        sum_r[~active] = gt.sum()
    if active.any():
        saved = eb.correspond_pixels
        eb.correspond_pixels = pee["correspond_pixels"]
        try:
            cr, sr, cp, sp = pee["evaluate_boundaries_threshold"](
                th[active], prob, gt, max_dist=max_dist, apply_thinning=True, apply_nms=False
            )
        finally:
            eb.correspond_pixels = saved
        count_r[active], sum_r[active], count_p[active], sum_p[active] = cr, sr, cp, sp
    return count_r, sum_r, count_p, sum_p


def evaluate_edge_batch(
    items: Sequence[tuple],
    max_dist: float,
    thresholds: int | Sequence[float] = DEFAULT_NUM_THRESHOLDS,
    nms: bool = True,
) -> list[EdgeCounts]:
    """:func:`evaluate_edge_image` over ``(pred, target)`` or ``(pred, target, image_size)``
    items (the unit of work of a worker)."""
    return [
        evaluate_edge_image(*it[:2], max_dist, thresholds, nms, image_size=it[2] if len(it) > 2 else None)
        for it in items
    ]


def _worker_init() -> None:
    """Worker processes: one thread each (they run in parallel already) and pyEdgeEval loaded."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import cv2

    cv2.setNumThreads(1)
    require_pyedgeeval()


def summarize(per_threshold: np.ndarray, ois: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
    """Split-level numbers from summed counts.

    ``per_threshold``: 4×T (``count_r, sum_r, count_p, sum_p`` summed over images);
    ``ois``: the 4 counts summed over images at each image's best threshold.
    Returns ``odsF``, ``oisF`` (percent), ``ods_threshold``, ``precision``/``recall``/``f`` per
    threshold (fractions) — precision, recall and F as pyEdgeEval/BSDS define them
    (a 0/0 ratio counts as 0).
    """
    prec, rec, f = _prf(*np.asarray(per_threshold, dtype=np.float64))
    i = int(np.argmax(f))
    of = _prf(*(float(x) for x in ois))[2]
    out = {
        "odsF": 100.0 * float(f[i]),
        "oisF": 100.0 * float(of),
        "precision": prec,
        "recall": rec,
        "f": f,
    }
    if thresholds is not None:
        out["ods_threshold"] = float(np.asarray(thresholds)[i])
    return out


def save_seism_pngs(
    probs: Sequence[np.ndarray], names: Sequence[str], out_dir: str | Path, targets=None, sizes=None
) -> list[Path]:
    """Write edge probabilities as 8-bit PNGs ``<out_dir>/<name>.png`` (``uint8(255·p)``,
    truncated: :func:`to_uint8_prob`), the files SEISM's ``read_one_png`` reads (image id = file
    stem). With ``sizes`` (``(h, w)`` per image), each map is cropped from the centre of the padded
    prediction to the image size, so every PNG has the original image size; without, but with
    ``targets``, to the bounding box of the valid target pixels (255 = padding)."""
    import cv2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prob, name) in enumerate(zip(probs, names)):
        prob = np.asarray(prob)
        prob = prob.reshape(prob.shape[-2:])
        u8 = prob if prob.dtype == np.uint8 else to_uint8_prob(prob)
        if sizes is not None:
            u8 = crop_center(u8, sizes[i])
        elif targets is not None:
            tgt = np.asarray(targets[i]).reshape(prob.shape[-2:])
            cropped = _crop_to_image(u8, tgt)
            if cropped is not None:
                u8 = cropped[0]
        path = out / f"{name}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(u8))
        paths.append(path)
    return paths
