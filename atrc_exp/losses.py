"""Training losses of ATRC (ICCV 2021) for every dense task, final and auxiliary; each task kind's
row (:data:`atrc_exp.task_kinds.TASK_KINDS`) names its two losses.

Conventions (see :mod:`atrc_exp.tasks`): targets carry the ignore value 255; network outputs
are logits/raw maps at the target resolution. Every loss

* keeps the dtype of its input: float32 and float64 stay (a whole training step can run in
  float64 to check equivalence), float16/bfloat16 are computed in float32; autocast is disabled
  inside, so it can be called from inside an autocast region;
* is reduced as the original: the sum over the valid pixels of the per-pixel loss (class-weighted
  where the term has class weights) divided by the **number of valid pixels** — not PyTorch's
  weighted mean, which divides by the sum of the weights — and returns ``0`` (still connected to
  the autograd graph, so ``backward`` works and gives zero gradients) when a batch holds no valid
  pixel, instead of the ``NaN`` of PyTorch's ``reduction="mean"``.

The total loss is ``Σ_task weight_task · (final_task + aux_task)`` (:class:`MultiTaskLoss`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tasks import IGNORE_INDEX, NUM_DEPTH_BINS


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and ``num * 0`` (graph-connected zero) where ``den == 0``.

    ``den`` (a count or a sum of class weights) is treated as a constant.
    """
    den = den.detach()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), num * 0)


def _compute_dtype(x: Tensor) -> Tensor:
    """``x`` in the dtype a loss computes in: float32 and float64 as they are, anything else
    (float16, bfloat16, integers) as float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _as_index_target(target: Tensor) -> Tensor:
    """Turn a B×H×W or B×1×H×W class map (any dtype) into an int64 B×H×W map."""
    if target.dim() == 4:
        if target.shape[1] != 1:
            raise ValueError(f"expected a single-channel class map, got shape {tuple(target.shape)}")
        target = target[:, 0]
    if target.is_floating_point():
        target = target.round()
    return target.long()


def l2_normalize_channels(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, p=2, dim=1, eps=eps)`` for B×C×H×W maps, float rounding aside, about 3×
    faster on the CPU (``linalg.vector_norm`` over the strided channel dim is slow there): the
    norm as ``sqrt(max(Σ x², eps²))``, whose gradient stays finite at a zero vector."""
    return x / (x * x).sum(dim=1, keepdim=True).clamp_min(eps * eps).sqrt()


def _check_spatial(pred: Tensor, target: Tensor, name: str) -> None:
    if pred.dim() != 4 or pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{name}: prediction {tuple(pred.shape)} does not match target {tuple(target.shape)} "
            "(outputs must be raw B×C×H×W maps at the target resolution)"
        )


def depth_to_bins(
    depth: Tensor, num_bins: int = NUM_DEPTH_BINS, d_min: float = 0.7, d_max: float = 10.0
) -> Tensor:
    """Discretise depth (metres) into ``num_bins`` log-spaced bins.

    ``bin = floor(num_bins · log(d / d_min) / log(d_max / d_min))`` clamped to
    ``[0, num_bins - 1]`` (computed in float64); pixels equal to 255 stay 255.
    Non-positive depths fall into bin 0. The output is an int64 tensor of ``depth``'s shape.
    """
    d = depth.detach().double()
    ignore = d == IGNORE_INDEX
    # Non-positive / NaN depths would give -inf or NaN; map them to the smallest bin.
    safe = torch.nan_to_num(d, nan=d_min).clamp_min(torch.finfo(torch.float64).tiny)
    scaled = num_bins * torch.log(safe / d_min) / math.log(d_max / d_min)
    bins = torch.floor(scaled).clamp(0, num_bins - 1).long()
    return torch.where(ignore, torch.full_like(bins, IGNORE_INDEX), bins)


def normals_to_centroid_index(normals: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid (max cosine similarity) for each pixel of a normal map.

    ``normals``: B×3×H×W (255 in any channel marks the pixel invalid); ``centroids``: K×3.
    Both are L2-normalised, so max cosine similarity == min Euclidean distance. Returns an
    int64 B×H×W map with 255 at invalid pixels.
    """
    if normals.dim() != 4 or normals.shape[1] != 3:
        raise ValueError(f"normals must be B×3×H×W, got {tuple(normals.shape)}")
    if centroids.dim() != 2 or centroids.shape[1] != 3:
        raise ValueError(f"centroids must be K×3, got {tuple(centroids.shape)}")
    with torch.autocast(device_type=normals.device.type, enabled=False):
        n = normals.detach().float()
        invalid = (n == IGNORE_INDEX).any(dim=1)
        c = F.normalize(centroids.detach().to(device=n.device, dtype=torch.float32), p=2, dim=1)
        n = l2_normalize_channels(n)
        sim = torch.matmul(c, n.reshape(n.shape[0], 3, -1)).view(n.shape[0], -1, *n.shape[2:])
        idx = sim.max(dim=1).indices  # argmax(dim=1)'s first maximum, 5× faster on CPU
    return torch.where(invalid, torch.full_like(idx, IGNORE_INDEX), idx)


def cross_entropy_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy with ignore index 255 and (optional) class weights.

    The original's reduction: ``Σ_valid w[y_i]·l_i / #valid`` (not PyTorch's weighted mean, which
    divides by ``Σ_valid w[y_i]``); returns a graph-connected 0 when there is no valid pixel.
    ``target`` may be B×H×W or B×1×H×W, integer or float (0/1 edge maps).
    """
    target = _as_index_target(target)
    logits = _compute_dtype(logits)
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    _check_spatial(logits, target, "cross_entropy_loss")
    valid = target != IGNORE_INDEX
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")
    return _safe_ratio(total, valid.sum().to(total.dtype))


def balanced_cross_entropy_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Class-balanced 2-class CE used for saliency (final and aux).

    ``w_pos = #negatives / #valid`` over the valid pixels of the batch; class weights
    ``(1 - w_pos, w_pos)`` for classes ``(0, 1)``; ``Σ w_i·l_i / #valid`` (ignore 255).
    """
    target = _as_index_target(target)
    if logits.shape[1] != 2:
        raise ValueError(f"balanced_cross_entropy_loss expects 2 channels, got {logits.shape[1]}")
    valid = target != IGNORE_INDEX
    n_valid = valid.sum().double()
    n_neg = ((target == 0) & valid).sum().double()
    w_pos = (n_neg / n_valid.clamp_min(1)).to(_compute_dtype(logits).dtype)
    weight = torch.stack([1.0 - w_pos, w_pos])
    return cross_entropy_loss(logits, target, weight=weight)


def _masked_l1(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """``Σ_valid |pred − target|`` (over every channel) divided by the number of valid pixels."""
    err = (pred - target.masked_fill(~valid, 0)).abs() * valid
    return _safe_ratio(err.sum(), valid.sum().to(err.dtype))


def normals_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 between ``F.normalize(pred, dim=1)`` and the target, summed over channels, / #valid pixels.

    A pixel is valid when none of its target channels equals 255.
    """
    _check_spatial(pred, target, "normals_l1_loss")
    pred = l2_normalize_channels(_compute_dtype(pred))
    target = target.to(pred.dtype)
    return _masked_l1(pred, target, (target != IGNORE_INDEX).all(dim=1, keepdim=True))


def depth_l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over valid pixels (target != 255), mean."""
    _check_spatial(pred, target, "depth_l1_loss")
    pred = _compute_dtype(pred)
    target = target.to(pred.dtype)
    return _masked_l1(pred, target, target != IGNORE_INDEX)


def edge_bce_per_pixel(logits: Tensor, target: Tensor, pos_weight: float) -> tuple[Tensor, Tensor]:
    """Per-pixel weighted BCE of the edge loss and the validity mask.

    ``l = -(w·y·log σ(x) + (1-w)·(1-y)·log(1-σ(x)))``, i.e. BCE-with-logits with
    ``pos_weight = w/(1-w)`` times ``(1-w)``. Returns ``(l · valid, valid)`` (the loss dtype,
    shape of ``logits``); invalid pixels contribute 0.
    """
    if not 0.0 < pos_weight < 1.0:
        raise ValueError(f"edge pos_weight must be in (0, 1), got {pos_weight}")
    _check_spatial(logits, target, "edge_bce_loss")
    logits = _compute_dtype(logits)
    target = target.to(logits.dtype)
    valid = target != IGNORE_INDEX
    y = target.masked_fill(~valid, 0)
    pw = torch.tensor(pos_weight / (1.0 - pos_weight), dtype=logits.dtype, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pw, reduction="none")
    return bce * (1.0 - pos_weight) * valid, valid


def edge_bce_loss(logits: Tensor, target: Tensor, pos_weight: float) -> Tensor:
    """Final edge loss: :func:`edge_bce_per_pixel` averaged over the valid pixels."""
    per_px, valid = edge_bce_per_pixel(logits, target, pos_weight)
    return _safe_ratio(per_px.sum(), valid.sum().to(per_px.dtype))


def weighted_edge_cross_entropy_loss(logits: Tensor, target: Tensor, pos_weight: float) -> Tensor:
    """Aux edge loss: 2-class CE with class weights ``(1-w, w)`` over 0/1 targets (ignore 255),
    ``Σ w_i·l_i / #valid``."""
    if logits.shape[1] != 2:
        raise ValueError(f"aux edge loss expects 2 channels, got {logits.shape[1]}")
    weight = torch.tensor(
        [1.0 - pos_weight, pos_weight], dtype=_compute_dtype(logits).dtype, device=logits.device
    )
    return cross_entropy_loss(logits, target, weight=weight)


class MultiTaskLoss(nn.Module):
    """Weighted sum of the final and auxiliary losses of ``tasks``.

    ``tasks``: :class:`~atrc_exp.task_kinds.Task` objects (their kind's losses, weight and options:
    ``edge_pos_weight``, the depth ``range``, the normals ``centroids`` as a K×3 array). The normals
    centroids become buffers (they move with ``.to(device)``).

    ``forward(outputs, batch) -> (total, terms)`` with ``outputs = {"final": {task: B×C×H×W},
    "aux": {task: B×C×H×W}}`` (``"aux"`` optional / partial; only the tasks of ``self.tasks`` are
    used), ``batch`` holding the targets under the task names. ``total`` is
    ``Σ weight_t·(final_t + aux_t)``; ``terms`` maps ``"loss/<task>"`` and ``"loss/aux_<task>"``
    to the detached, *unweighted* terms. A task without any valid pixel in the batch (images without
    its label) adds a graph-connected 0.
    """

    def __init__(self, tasks: Sequence):
        super().__init__()
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("MultiTaskLoss has no task")
        self.by_name = {t.name: t for t in self.tasks}
        self._const: dict[str, str] = {}
        for t in self.tasks:
            const = t.kind.aux_constant(t)
            if const is not None:
                self._const[t.name] = f"aux_constant_{t.name}"
                self.register_buffer(self._const[t.name], const.float())

    def aux_constant(self, task) -> Tensor | None:
        """The buffer of ``task``'s aux constant (normals centroids), or None."""
        name = self._const.get(task.name)
        return None if name is None else getattr(self, name)

    def final_loss(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        """Unweighted final loss of the task ``name``."""
        task = self.by_name[name]
        return task.kind.final_loss(pred, target, task, None)

    def aux_loss(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        """Unweighted auxiliary loss of the task ``name``."""
        task = self.by_name[name]
        return task.kind.aux_loss(pred, target, task, self.aux_constant(task))

    def forward(
        self, outputs: Mapping[str, Mapping[str, Tensor]], batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        final = outputs["final"]
        aux = outputs.get("aux") or {}
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        device_type = next(iter(final.values())).device.type if final else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            for task in self.tasks:
                name = task.name
                if name not in final:
                    raise KeyError(f"model outputs have no final prediction for task {name!r}")
                if name not in batch:
                    raise KeyError(f"batch has no target for task {name!r}")
                target = batch[name]
                task_loss = self.final_loss(name, final[name], target)
                terms[f"loss/{name}"] = task_loss.detach()
                if name in aux:
                    aux_l = self.aux_loss(name, aux[name], target)
                    terms[f"loss/aux_{name}"] = aux_l.detach()
                    task_loss = task_loss + aux_l
                weighted = task.weight * task_loss
                total = weighted if total is None else total + weighted
        return total, terms
