"""Evaluation metrics of every dense task, accumulated over a whole split.

Every meter keeps its state as **sums in one float64 1-D tensor** of fixed length, so the state of
a split evaluated by several processes is one ``all_reduce(SUM)`` of :meth:`MultiTaskMetrics.state`
followed by :meth:`MultiTaskMetrics.load_state`; :meth:`MultiTaskMetrics.compute` derives the
values from the sums (identical on every rank). Definitions follow the original ATRC evaluation
code; one meter per task kind (:data:`atrc_exp.task_kinds.TASK_KINDS`), keys ``<task>/<metric>``.
Only labelled pixels count (255 = no label): an image without a task's label adds nothing to it.
Inputs are the raw ``final`` network outputs at target resolution and the batch targets
(:mod:`atrc_exp.tasks`).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, wait

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _as_index_target, _check_spatial, edge_bce_per_pixel
from .tasks import IGNORE_INDEX

log = logging.getLogger(__name__)


def _div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


class SumMeter:
    """Base class: the state is ``self.sums``, a float64 1-D tensor of length ``self.size``.

    Subclasses implement :meth:`update` (adds to the sums) and :meth:`compute` (sums → values).
    The sums live on the device of the last update (so a NCCL all-reduce works on them).
    """

    size: int = 0
    #: The prefix of the metric keys (``<task>/<metric>``), the class's own unless given.
    task: str = ""

    def __init__(self, task: str | None = None) -> None:
        self.task = task or self.task
        self.sums = torch.zeros(self.size, dtype=torch.float64)

    def reset(self) -> None:
        self.sums = torch.zeros(self.size, dtype=torch.float64, device=self.sums.device)

    def _add(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64).reshape(-1)
        if self.sums.device != values.device:
            self.sums = self.sums.to(values.device)
        self.sums += values

    def flush(self) -> None:
        """Fold work still in flight into :attr:`sums` (meters with asynchronous work override it)."""


class SegmentationMeter(SumMeter):
    """Mean IoU of a segmentation task (``semseg`` or ``human_parts``).

    ``update(logits B×K×H×W, target B×H×W)``: argmax over channels, then the K×K confusion matrix
    (rows = target, columns = prediction) of the pixels with target != 255 is added to the sums.
    ``compute() -> {"<task>/mIoU": 100 · mean_c TP_c/(TP_c+FP_c+FN_c)}``; a class with an empty
    denominator (absent from target and prediction over the whole split) counts as IoU 0 and is
    still part of the mean (as in ATRC; torchmetrics instead drops such classes).
    """

    def __init__(self, task: str, num_classes: int, class_names: Sequence[str] | None = None):
        self.num_classes = int(num_classes)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.size = self.num_classes**2
        super().__init__(task)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        target = _as_index_target(target)
        _check_spatial(pred, target, self.task)
        if pred.shape[1] != self.num_classes:
            raise ValueError(f"{self.task}: expected {self.num_classes} channels, got {pred.shape[1]}")
        k = self.num_classes
        label = pred.argmax(dim=1)
        valid = target != IGNORE_INDEX
        idx = target[valid] * k + label[valid]
        cm = torch.bincount(idx, minlength=k * k)
        if cm.numel() > k * k:
            raise ValueError(f"{self.task}: target labels outside [0, {k}) other than {IGNORE_INDEX}")
        self._add(cm)

    def compute(self) -> dict[str, float]:
        if self.sums.sum() == 0:  # no labelled pixel in the split
            return {f"{self.task}/mIoU": math.nan}
        cm = self.sums.detach().cpu().reshape(self.num_classes, self.num_classes)
        tp = cm.diag()
        den = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(den > 0, tp / den.clamp_min(1), torch.zeros_like(tp))
        out = {f"{self.task}/mIoU": 100.0 * iou.mean().item()}
        if self.class_names is not None:  # named classes: their IoU too
            out.update({f"{self.task}/IoU_{n}": 100.0 * v for n, v in zip(self.class_names, iou.tolist())})
        return out


class DepthMeter(SumMeter):
    """Depth RMSE (metres) and mean absolute relative error over all valid pixels of the split.

    Prediction clamped at min 0; valid = target != 255 and target > 0 (and finite).
    Sums: ``[Σ squared error, #valid, Σ |error| / target]``; ``compute() -> {"<task>/rmse":
    sqrt(Σ/n), "<task>/abs_rel": Σ/n}`` (NaN if n=0).
    """

    size = 3
    task = "depth"

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_spatial(pred, target, "depth")
        pred = pred.float().clamp_min(0)
        target = target.float()
        valid = (target != IGNORE_INDEX) & (target > 0) & torch.isfinite(target)
        gt = target[valid].double()
        err = pred.expand_as(target)[valid].double() - gt
        self._add(torch.stack([err.square().sum(), valid.sum().double(), (err.abs() / gt).sum()]))

    def compute(self) -> dict[str, float]:
        se, n, rel = self.sums.tolist()
        return {f"{self.task}/rmse": math.sqrt(_div(se, n)), f"{self.task}/abs_rel": _div(rel, n)}


class NormalsMeter(SumMeter):
    """Surface-normal angular error (degrees) over all valid pixels of the split.

    Prediction and target are L2-normalised; per pixel ``θ = rad2deg(2·atan2(‖p−g‖, ‖p+g‖))``
    (a numerically stable arccos(p·g)); valid = no target channel equals 255.
    Sums: ``[Σθ, Σθ², #θ<11.25, #θ<22.5, #θ<30, #valid]`` and a histogram of θ in
    :attr:`BIN_DEGREES` bins (for the median). ``compute()`` gives ``<task>/mean_angle``,
    ``<task>/median_angle`` (to within half a bin: the histogram's median, linearly interpolated),
    ``<task>/rmse_angle`` and ``<task>/within_{11.25,22.5,30}`` (% of pixels).
    """

    THRESHOLDS = (11.25, 22.5, 30.0)
    BIN_DEGREES = 0.05
    BINS = int(round(180 / BIN_DEGREES))
    size = 6 + BINS
    task = "normals"

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_spatial(pred, target, "normals")
        valid = (target != IGNORE_INDEX).all(dim=1)  # B×H×W
        p = pred.permute(0, 2, 3, 1)[valid].double()  # N×3
        g = target.permute(0, 2, 3, 1)[valid].double()
        p = F.normalize(p, p=2, dim=1, eps=1e-12)
        g = F.normalize(g, p=2, dim=1, eps=1e-12)
        ang = torch.rad2deg(2 * torch.atan2((p - g).norm(dim=1), (p + g).norm(dim=1)))
        within = [(ang < t).sum().double() for t in self.THRESHOLDS]
        n = torch.tensor(float(ang.numel()), dtype=torch.float64, device=ang.device)
        bins = (ang / self.BIN_DEGREES).long().clamp(0, self.BINS - 1)
        hist = torch.bincount(bins, minlength=self.BINS).double()
        self._add(torch.cat([torch.stack([ang.sum(), ang.square().sum(), *within, n]), hist]))

    def median(self) -> float:
        """The median angle from the histogram (linear within the bin that holds it)."""
        hist = self.sums[6:].detach().cpu().double()
        n = float(hist.sum())
        if n == 0:
            return math.nan
        cum = hist.cumsum(0)
        i = int(torch.searchsorted(cum, torch.tensor(n / 2, dtype=torch.float64)))
        before = float(cum[i - 1]) if i > 0 else 0.0
        frac = (n / 2 - before) / max(float(hist[i]), 1.0)
        return (i + frac) * self.BIN_DEGREES

    def compute(self) -> dict[str, float]:
        s, s2, w1, w2, w3, n = self.sums[:6].tolist()
        t = self.task
        return {
            f"{t}/mean_angle": _div(s, n),
            f"{t}/median_angle": self.median(),
            f"{t}/rmse_angle": math.sqrt(_div(s2, n)),
            f"{t}/within_11.25": 100.0 * _div(w1, n),
            f"{t}/within_22.5": 100.0 * _div(w2, n),
            f"{t}/within_30": 100.0 * _div(w3, n),
        }


class SaliencyMeter(SumMeter):
    """Saliency max F-measure.

    ``prob = softmax(logits)[:, 1]``; for each threshold t in 0.05, 0.10, …, 0.95 a pixel is a
    predicted positive when ``prob >= t`` (as ATRC's ``SaliencyMeter``). Over the valid pixels
    (target != 255) the sums ``[TP_t ×19, PP_t ×19, AP]`` are accumulated;
    ``P = TP/(PP+1e-8)``, ``R = TP/(AP+1e-8)``, ``F = (1+β²)PR/(β²P+R+1e-8)`` with β² = 0.3;
    ``compute() -> {"<task>/maxF": 100 · max_t F_t, "<task>/mIoU": ...}``, the mIoU (mean of the
    salient and the background IoU) at threshold 0.5; one more sum, ``#valid``, gives the latter.
    """

    THRESHOLDS = tuple(i / 20 for i in range(1, 20))
    BETA_SQUARED = 0.3
    EPS = 1e-8
    size = 2 * len(THRESHOLDS) + 2
    task = "sal"

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        target = _as_index_target(target)
        _check_spatial(pred, target, "sal")
        if pred.shape[1] != 2:
            raise ValueError(f"sal: expected 2 channels, got {pred.shape[1]}")
        prob = torch.softmax(pred.float(), dim=1)[:, 1]
        valid = target != IGNORE_INDEX
        p = prob[valid].double()
        pos = target[valid] == 1
        thr = torch.tensor(self.THRESHOLDS, dtype=torch.float64, device=p.device)
        nt = len(self.THRESHOLDS)
        # bucket i = number of thresholds <= p; #(p >= thr_j) = #(bucket >= j + 1)
        bucket = torch.bucketize(p, thr, right=True)
        cnt_all = torch.bincount(bucket, minlength=nt + 1).double()
        cnt_pos = torch.bincount(bucket[pos], minlength=nt + 1).double()
        pp = cnt_all.flip(0).cumsum(0).flip(0)[1:]
        tp = cnt_pos.flip(0).cumsum(0).flip(0)[1:]
        ap = pos.sum().double().reshape(1)
        self._add(torch.cat([tp, pp, ap, valid.sum().double().reshape(1)]))

    def compute(self) -> dict[str, float]:
        nt = len(self.THRESHOLDS)
        s = self.sums.detach().cpu()
        tp, pp, ap, n = s[:nt], s[nt : 2 * nt], s[2 * nt], s[2 * nt + 1].item()
        if n == 0:
            return {f"{self.task}/maxF": math.nan, f"{self.task}/mIoU": math.nan}
        precision = tp / (pp + self.EPS)
        recall = tp / (ap + self.EPS)
        b2 = self.BETA_SQUARED
        f = (1 + b2) * precision * recall / (b2 * precision + recall + self.EPS)
        i = self.THRESHOLDS.index(0.5)
        tp, pp, ap = tp[i].item(), pp[i].item(), ap.item()
        miou = 100.0 * (_div(tp, pp + ap - tp) + _div(n - pp - ap + tp, n - tp)) / 2
        return {f"{self.task}/maxF": 100.0 * f.max().item(), f"{self.task}/mIoU": miou}


class EdgeLossMeter(SumMeter):
    """Validation edge loss: the final edge loss (weighted BCE, ``w = edge_pos_weight``) as a
    pixel-weighted mean over the split, ``Σ per-pixel loss / #valid``.

    Sums: ``[Σ loss, #valid]``; ``compute() -> {"edge/loss": ...}`` (NaN if no valid pixel).
    The edge loss alone (``MultiTaskMetrics(..., edge_odsf=False)``); :class:`EdgeMeter` adds odsF.
    """

    size = 2

    def __init__(self, edge_pos_weight: float, task: str = "edge"):
        self.edge_pos_weight = float(edge_pos_weight)
        super().__init__(task)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        loss, valid = edge_bce_per_pixel(pred, target, self.edge_pos_weight)
        self._add(torch.stack([loss.double().sum(), valid.sum().double()]))

    def compute(self) -> dict[str, float]:
        s, n = self.sums.tolist()
        return {f"{self.task}/loss": _div(s, n)}


class EdgeMeter(SumMeter):
    """Edge ``odsF`` / ``oisF`` (percent) and the validation edge loss, reducible by summation.

    ``update(logits B×1×H×W, target B×1×H×W, image_sizes=None)``: the edge loss sums are added at
    once (as :class:`EdgeLossMeter`); each image's ``sigmoid`` map, quantised as the original's
    PNGs (``uint8(255·p)``, truncated), and its target go to
    :func:`atrc_exp.evaluation.edge.evaluate_edge_image` (cropped to its ``image_sizes`` entry),
    here until images take ≥ :attr:`INLINE_SECONDS_PER_IMAGE` each, then in a pool of ``workers``
    processes kept for later validations (none with ``workers=0`` or in a daemonic process). Workers
    are *spawned* (``start_method`` overrides; a fork can deadlock CUDA, OpenMP and OpenCV thread
    pools), so a script calling :func:`atrc_exp.engine.fit` needs an ``if __name__ == "__main__":``
    guard. At most ``max_pending`` images are in flight (then ``update`` waits for the oldest).

    Sums (``size = 2 + 4T + 5`` for T thresholds): ``[Σ loss, #valid]``, the per-threshold
    ``count_r ×T, sum_r ×T, count_p ×T, sum_p ×T``, the four counts at each image's best threshold
    (oisF), and the number of evaluated images. ``compute() -> {"edge/loss", "edge/odsF",
    "edge/oisF"}`` logs the evaluation time, which :meth:`timing` returns (of this process, not a
    metric: the metrics of a split stay reproducible).
    """

    #: While images take less than this (s/image) in this process, no worker pool is started.
    INLINE_SECONDS_PER_IMAGE = 0.25

    def __init__(
        self,
        edge_pos_weight: float,
        max_dist: float = 0.011,
        thresholds: int | Sequence[float] = 99,
        workers: int = 0,
        nms: bool = True,
        max_pending: int | None = None,
        start_method: str | None = None,
        task: str = "edge",
    ):
        from .evaluation.edge import edge_thresholds, require_pyedgeeval

        require_pyedgeeval()  # a clear error now rather than in a worker later
        self.edge_pos_weight = float(edge_pos_weight)
        self.max_dist = float(max_dist)
        if not 0 < self.max_dist < 1:
            raise ValueError(f"edge max_dist is a fraction of the image diagonal, got {max_dist}")
        self.thresholds = edge_thresholds(thresholds)
        self.workers = max(0, int(workers))
        self.nms = bool(nms)
        self.start_method = start_method
        self.max_pending = int(max_pending) if max_pending else max(8, 4 * self.workers)
        self.size = 2 + 4 * len(self.thresholds) + 5
        super().__init__(task)
        self._pool = None
        self._finalizer = None
        self._pending: deque = deque()
        self.reset()

    def _get_pool(self):
        """The worker pool, started once evaluation here is found slow (a tiny or untrained model's
        edge maps are matched in milliseconds: not worth starting processes for); None: no pool."""
        if self._pool is None:
            n = self._timing["images"]
            slow = n > 0 and self._timing["inline_seconds"] / n >= self.INLINE_SECONDS_PER_IMAGE
            if self.workers == 0 or not slow:
                return None
            if multiprocessing.current_process().daemon:
                log.info("edge evaluation runs in this (daemonic) process: it can not start workers")
                self.workers = 0
                return None
            from .evaluation.edge import _worker_init

            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context(self.start_method or "spawn"),
                initializer=_worker_init,
            )
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=True, cancel_futures=True)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (they are also stopped when the meter is garbage-collected)."""
        self._discard_pending()
        if self._finalizer is not None:
            self._finalizer()
        self._pool = self._finalizer = None

    def _fold(self, results) -> None:
        t = len(self.thresholds)
        add = torch.zeros(self.size - 2, dtype=torch.float64)
        for c in results:
            self._timing["work_seconds"] += c.seconds
            if not c.evaluated:
                continue
            self._timing["images"] += 1
            add[: 4 * t] += torch.from_numpy(c.stack().reshape(-1))
            add[4 * t : 4 * t + 4] += torch.from_numpy(c.best())
            add[4 * t + 4] += 1
        self.sums = self.sums.cpu()
        self.sums[2:] += add

    def _wait_oldest(self) -> None:
        fut = self._pending.popleft()
        t0 = time.perf_counter()
        res = fut.result()
        self._timing["wait_seconds"] += time.perf_counter() - t0
        self._fold(res)

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _discard_pending(self) -> None:
        for fut in self._pending:
            fut.cancel()
        wait(self._pending)
        self._pending.clear()

    def reset(self) -> None:
        self._discard_pending()
        self.sums = torch.zeros(self.size, dtype=torch.float64)
        self._timing = {"images": 0, "work_seconds": 0.0, "wait_seconds": 0.0, "inline_seconds": 0.0}

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor, image_sizes: Sequence | None = None) -> None:
        from .evaluation.edge import evaluate_edge_batch

        loss, valid = edge_bce_per_pixel(pred, target, self.edge_pos_weight)
        self.sums = self.sums.cpu()
        self.sums[:2] += torch.stack([loss.double().sum(), valid.sum().double()]).cpu()
        # uint8(255·sigmoid), truncated as the original's PNGs (float -> uint8 casts truncate)
        prob = (torch.sigmoid(pred.float()) * 255.0).to(torch.uint8).cpu().numpy()
        tgt = target.float().cpu().numpy()
        tgt = np.where(tgt == IGNORE_INDEX, IGNORE_INDEX, tgt >= 0.5).astype(np.uint8)
        items = [
            (prob[i].reshape(prob.shape[-2:]), tgt[i].reshape(tgt.shape[-2:]))
            + (() if image_sizes is None else (image_sizes[i],))
            for i in range(len(prob))
        ]
        args = (self.max_dist, self.thresholds, self.nms)
        pool = self._get_pool()
        if pool is None:
            t0 = time.perf_counter()
            self._fold(evaluate_edge_batch(items, *args))
            self._timing["inline_seconds"] += time.perf_counter() - t0
            return
        for item in items:
            self._pending.append(pool.submit(evaluate_edge_batch, [item], *args))
        while self._pending and self._pending[0].done():
            self._wait_oldest()
        while len(self._pending) > self.max_pending:
            self._wait_oldest()

    def compute(self) -> dict[str, float]:
        from .evaluation.edge import summarize

        self.flush()
        t = len(self.thresholds)
        s = self.sums.detach().cpu().numpy()
        k = self.task
        out = {f"{k}/loss": _div(s[0], s[1]), f"{k}/odsF": math.nan, f"{k}/oisF": math.nan}
        if s[2 + 4 * t + 4] > 0:  # evaluated images
            res = summarize(s[2 : 2 + 4 * t].reshape(4, t), s[2 + 4 * t : 2 + 4 * t + 4], self.thresholds)
            out[f"{k}/odsF"], out[f"{k}/oisF"] = res["odsF"], res["oisF"]
        tm = self.timing()
        if tm["images"]:
            log.info(
                "%s odsF evaluation: %d images here, %.3f s/image (%s), %.1f s waited for results",
                k,
                tm["images"],
                tm["work_seconds"] / tm["images"],
                f"{tm['workers']} worker processes" if tm["workers"] else "in this process",
                tm["wait_seconds"] + tm["inline_seconds"],
            )
        return out

    def timing(self) -> dict[str, float]:
        """This process's edge-evaluation time since :meth:`reset`: images evaluated here,
        ``work_seconds`` (Σ per-image time in the workers), ``wait_seconds`` (time ``update`` /
        ``flush`` blocked on results), ``inline_seconds`` (time spent evaluating in this process)."""
        return dict(self._timing, workers=self.workers)


def batch_image_sizes(batch: Mapping, shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """``(h, w)`` of each image of a collated batch of maps of ``shape`` (B×…×H×W), from
    ``batch["meta"]["size"]`` (what the readers record; collated as ``[heights, widths]``), or
    ``None`` when the batch does not say, or not for B images, or a size does not fit in H×W (then
    the edge evaluation crops to the valid target pixels)."""
    meta = batch.get("meta") if isinstance(batch, Mapping) else None
    size = meta.get("size") if isinstance(meta, Mapping) else None
    if size is None:
        return None
    try:
        hs, ws = (torch.as_tensor(v).reshape(-1).tolist() for v in size)
    except (TypeError, ValueError, RuntimeError):
        return None
    H, W = int(shape[-2]), int(shape[-1])
    sizes = [(int(h), int(w)) for h, w in zip(hs, ws)]
    if not len(hs) == len(ws) == int(shape[0]) or not all(0 < h <= H and 0 < w <= W for h, w in sizes):
        return None
    return sizes


class MultiTaskMetrics:
    """The metrics of ``tasks`` over a split, reducible across processes. Each task's kind
    (:class:`~atrc_exp.task_kinds.Task`) makes its meter; ``settings``:
    :class:`~atrc_exp.task_kinds.MeterSettings`.

    * ``update(final_outputs, batch)``: raw ``final`` outputs (``{task: B×C×H×W}`` at target
      resolution; the meters post-process them) and the batch targets; ``batch["meta"]["size"]``
      (as the readers record it), when present, says where the edge evaluation crops each map.
    * ``state() -> Tensor``: the float64 1-D concatenation of every meter's sums, in the order of
      ``tasks``, then the number of images with a label of each task (:meth:`labelled_images`),
      fixed length :attr:`state_size`, on the device of the updates (CPU if none).
    * ``load_state(t)``: replace the sums, e.g. with ``all_reduce(state(), SUM)``.
    * ``compute() -> dict[str, float]``: ``<task>/<metric>`` of every task (its kind's metrics).
    * ``reset()``: zero all sums; ``close()``: stop the edge-evaluation workers.
    """

    def __init__(self, tasks: Sequence, settings):
        self.task_objects = tuple(tasks)
        self.tasks = tuple(t.name for t in tasks)
        self.meters: dict[str, SumMeter] = {t.name: t.kind.meter(t, settings) for t in tasks}
        self.labelled = torch.zeros(len(self.tasks), dtype=torch.float64)
        self._device = torch.device("cpu")

    @property
    def state_size(self) -> int:
        return sum(m.size for m in self.meters.values()) + len(self.tasks)

    @torch.no_grad()
    def update(self, final_outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        counts = []
        for t, meter in self.meters.items():
            if t not in final_outputs:
                raise KeyError(f"outputs have no final prediction for task {t!r}")
            if t not in batch:
                raise KeyError(f"batch has no target for task {t!r}")
            pred = final_outputs[t].detach()
            self._device = pred.device
            target = batch[t].to(pred.device)
            if isinstance(meter, EdgeMeter):
                meter.update(pred, target, batch_image_sizes(batch, pred.shape))
            else:
                meter.update(pred, target)
            counts.append((target != IGNORE_INDEX).reshape(target.shape[0], -1).any(1).sum())
        if counts:
            self.labelled = self.labelled.to(self._device) + torch.stack(counts).double()

    def labelled_images(self) -> dict[str, int]:
        """Images (of the updates, or of the loaded state) with a label of each task."""
        return {t: int(n) for t, n in zip(self.tasks, self.labelled.tolist())}

    def flush(self) -> None:
        """Wait for the edge evaluation still in flight (``state`` and ``compute`` call it)."""
        for m in self.meters.values():
            m.flush()

    def state(self) -> Tensor:
        self.flush()
        parts = [m.sums.to(self._device) for m in self.meters.values()]
        return torch.cat([*parts, self.labelled.to(self._device)])

    def load_state(self, t: Tensor) -> None:
        if t.dim() != 1 or t.numel() != self.state_size:
            raise ValueError(f"state must be a 1-D tensor of {self.state_size} values, got {tuple(t.shape)}")
        self.flush()
        t = t.detach().to(torch.float64)
        self._device = t.device
        offset = 0
        for m in self.meters.values():
            m.sums = t[offset : offset + m.size].clone()
            offset += m.size
        self.labelled = t[offset:].clone()

    def compute(self) -> dict[str, float]:
        self.flush()
        out: dict[str, float] = {}
        for m in self.meters.values():
            out.update(m.compute())
        return out

    def timings(self) -> dict[str, float]:
        """Edge-evaluation timing of this process (see :meth:`EdgeMeter.timing`), ``<task>/<key>``
        for each edge task; empty without one."""
        return {
            f"{name}/{k}": float(v)
            for name, m in self.meters.items()
            if isinstance(m, EdgeMeter)
            for k, v in m.timing().items()
        }

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()
        self.labelled = torch.zeros(len(self.tasks), dtype=torch.float64, device=self.labelled.device)

    def close(self) -> None:
        """Stop worker processes (idempotent; also done when the object is garbage-collected)."""
        for m in self.meters.values():
            if hasattr(m, "close"):
                m.close()


def format_metrics_table(metrics: Mapping[str, float], title: str = "final validation metrics") -> str:
    """A plain-text two-column table of ``metrics`` under ``title``."""
    width = max([len(k) for k in metrics] + [6])
    lines = [title, "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12.4f}" for k, v in metrics.items()]
    return "\n".join(lines)
