"""Task kinds as one table: everything the framework does with a task follows from its kind.

:data:`TASK_KINDS` has one :class:`TaskKind` row per kind (``segmentation``, ``depth``,
``normals``, ``edge``, ``saliency``). A *task* (:class:`Task`) is a name, a kind and the kind's
options (``conf/dataset/*.yaml`` ``task_specs``, or a folder dataset's ``atrc_dataset.yaml``); the
paper's tasks are named tasks of these kinds (:data:`PAPER_TASK_SPECS`). No module branches on a
task's name: losses, metrics, transforms, predictions and reports ask the task's kind.

Adding a kind: its loss and meter (``losses.py``, ``metrics.py``), one row here; nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import label_io, losses, metrics, visualize
from .tasks import IGNORE_INDEX, NUM_DEPTH_BINS, NUM_NORMAL_CENTROIDS, PUBLISHED_NORMAL_CENTROIDS

#: Keys every task spec may hold, whatever its kind.
COMMON_KEYS = ("kind", "weight")
#: Names a task may have (folder datasets; the paper's names fit).
NAME_PATTERN = r"[a-z][a-z0-9_]*"


class TaskSpecError(ValueError):
    """A task spec that cannot be used; the message names the task and the fix."""


@dataclass(frozen=True)
class MeterSettings:
    """Evaluation settings that are not a task's own (``trainer.edge_eval_*``)."""

    edge_eval_workers: int = 0
    edge_thresholds: int | Sequence[float] = 99
    edge_nms: bool = True
    edge_odsf: bool = True


@dataclass(frozen=True)
class Task:
    """A named task: its kind and the kind's options (defaults filled in)."""

    name: str
    kind: TaskKind
    weight: float
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes (``classes``: a count or a list of names) — segmentation kinds."""
        c = self.options.get("classes")
        if c is None:
            raise TaskSpecError(
                f"task {self.name!r} ({self.kind.name}) needs `classes` (a list of names or a count)"
            )
        return int(c) if isinstance(c, (int, np.integer)) else len(c)

    @property
    def named_classes(self) -> list[str] | None:
        """The class names when ``classes`` lists them (None for a count)."""
        c = self.options.get("classes")
        return [str(x) for x in c] if isinstance(c, (list, tuple)) else None

    @property
    def final_channels(self) -> int:
        return self.kind.final_channels(self)

    @property
    def aux_channels(self) -> int:
        return self.kind.aux_channels(self)

    @property
    def main_metric(self) -> str:
        """The key of the task's main metric, e.g. ``semseg/mIoU``."""
        return f"{self.name}/{self.kind.metrics[0][0]}"

    def metric_directions(self) -> dict[str, bool]:
        """``{metric key: higher is better}`` of the task's metrics."""
        return {f"{self.name}/{m}": hib for m, hib in self.kind.metrics}

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.kind.name}, weight={self.weight:g}, {dict(self.options)})"

    def __reduce__(self):
        """Pickled as name, kind (by its row name), weight and options (spawned DataLoader workers)."""
        return (_task, (self.name, self.kind, self.weight, dict(self.options)))

    def with_options(self, **options: Any) -> Task:
        """The same task with ``options`` replaced (e.g. data-derived aux constants)."""
        return Task(self.name, self.kind, self.weight, MappingProxyType({**self.options, **options}))


def _kind(name: str) -> TaskKind:
    return TASK_KINDS[name]


def _task(name: str, kind: TaskKind, weight: float, options: dict) -> Task:
    return Task(name, kind, weight, MappingProxyType(options))


LossFn = Callable[[Tensor, Tensor, Task, "Tensor | None"], Tensor]


@dataclass(frozen=True, repr=False)
class TaskKind:
    """One row of :data:`TASK_KINDS`: what the framework does with a task of this kind.

    Raw labels (as readers return them, before the transforms) follow ``integer_labels`` (int64
    H×W class maps, else float32 H×W, or H×W×3 for ``label_channels == 3``); ``pad_value`` fills
    padding, and where ``zero_is_ignore`` a label of 0 (all channels) becomes 255 after padding.
    """

    name: str
    #: Options a task spec may set, with their default (``classes`` etc.).
    options: Mapping[str, Any]
    weight: float
    final_channels: Callable[[Task], int]
    aux_channels: Callable[[Task], int]
    #: ``loss(pred, target, task, aux_constant) -> 0-dim tensor`` (unweighted).
    final_loss: LossFn
    aux_loss: LossFn
    #: ``meter(task, settings)``: a :class:`~atrc_exp.metrics.SumMeter` whose keys are ``<task>/<metric>``.
    meter: Callable[[Task, MeterSettings], metrics.SumMeter]
    #: ``(metric, higher is better)``, the main metric first.
    metrics: tuple[tuple[str, bool], ...]
    #: ``read_label(path, task) -> raw label``: the folder format's ``labels/<task>/<id>.png|.npy``.
    read_label: Callable[[Path, Task], np.ndarray]
    pad_value: float
    #: Network output (B×C×H×W) → prediction in label units (B×H×W classes or B×C×H×W maps).
    postprocess: Callable[[Tensor], Tensor]
    #: A prediction or target (H×W or C×H×W numpy) → RGB uint8 (ignore pixels black).
    colorize: Callable[[np.ndarray], np.ndarray]
    #: A prediction (H×W or C×H×W numpy) → an 8-bit PNG array, or None (no PNG for this kind).
    prediction_png: Callable[[np.ndarray], np.ndarray | None] = lambda p: None
    integer_labels: bool = False
    #: The aux loss's constant tensor (normals: the K×3 centroids), or None.
    aux_constant: Callable[[Task], Tensor | None] = lambda task: None
    #: Options a spec must set.
    required: tuple[str, ...] = ()
    #: Channels of a label (normals: 3).
    label_channels: int = 1
    #: A label of 0 (all channels) means no label: it becomes 255 after padding (depth, normals).
    zero_is_ignore: bool = False
    #: Random scaling divides the values by the scale factor (depth: a larger object is nearer).
    scale_divides_values: bool = False
    #: A horizontal flip negates channel 0 (normals' x).
    flip_negates_x: bool = False

    def __repr__(self) -> str:
        return f"TaskKind({self.name!r})"

    def __reduce__(self):
        """Pickled as a reference to its row of :data:`TASK_KINDS` (its functions are not picklable)."""
        return (_kind, (self.name,))

    def missing_label(self, h: int, w: int) -> np.ndarray:
        """The raw label of an image without one: nothing valid."""
        shape = (h, w) if self.label_channels == 1 else (h, w, self.label_channels)
        if self.integer_labels:
            return np.full(shape, IGNORE_INDEX, np.int64)
        fill = 0.0 if self.zero_is_ignore else IGNORE_INDEX
        return np.full(shape, fill, np.float32)


# -- the rows' functions ---------------------------------------------------------------------
def _classes(task: Task) -> int:
    return task.num_classes


def _depth_aux(pred: Tensor, target: Tensor, task: Task, const: Tensor | None) -> Tensor:
    rng = task.options.get("range")
    if rng is None:
        raise TaskSpecError(
            f"task {task.name!r}: the depth range of its aux bins is not set (the trainer takes it from "
            f"the training labels; set `range: [min, max]` in metres to give it)"
        )
    d_min, d_max = float(rng[0]), float(rng[1])
    return losses.cross_entropy_loss(pred, losses.depth_to_bins(target, pred.shape[1], d_min, d_max))


def _normals_aux(pred: Tensor, target: Tensor, task: Task, const: Tensor | None) -> Tensor:
    if const is None:
        raise TaskSpecError(f"task {task.name!r}: an aux normals output needs its centroids (K×3)")
    if pred.shape[1] != const.shape[0]:
        raise ValueError(
            f"aux {task.name} has {pred.shape[1]} channels but there are {const.shape[0]} centroids"
        )
    return losses.cross_entropy_loss(pred, losses.normals_to_centroid_index(target, const))


def _centroids(task: Task) -> Tensor | None:
    c = task.options.get("centroids")
    if c is None or isinstance(c, str):
        return None  # not resolved yet (a published set name or kmeans)
    return torch.as_tensor(np.asarray(c, np.float32))


def _normals_aux_channels(task: Task) -> int:
    c = task.options.get("centroids")
    return NUM_NORMAL_CENTROIDS if c is None or isinstance(c, str) else len(c)


def _edge_weight(task: Task) -> float:
    return float(task.options["edge_pos_weight"])


def _edge_meter(task: Task, s: MeterSettings) -> metrics.SumMeter:
    if not s.edge_odsf:
        return metrics.EdgeLossMeter(_edge_weight(task), task=task.name)
    return metrics.EdgeMeter(
        _edge_weight(task),
        max_dist=float(task.options["edge_max_dist"]),
        thresholds=s.edge_thresholds,
        workers=s.edge_eval_workers,
        nms=s.edge_nms,
        task=task.name,
    )


def _class_png(p: np.ndarray) -> np.ndarray:
    return np.clip(p, 0, 255).astype(np.uint8)


#: Kind name -> :class:`TaskKind`.
TASK_KINDS: dict[str, TaskKind] = {
    "segmentation": TaskKind(
        name="segmentation",
        options={"classes": None, "ignore_without_foreground": False},
        required=("classes",),
        weight=1.0,
        final_channels=_classes,
        aux_channels=_classes,
        final_loss=lambda p, t, task, c: losses.cross_entropy_loss(p, t),
        aux_loss=lambda p, t, task, c: losses.cross_entropy_loss(p, t),
        meter=lambda task, s: metrics.SegmentationMeter(task.name, task.num_classes, task.named_classes),
        metrics=(("mIoU", True),),
        read_label=lambda path, task: label_io.read_class_map(path, task.num_classes),
        integer_labels=True,
        pad_value=IGNORE_INDEX,
        postprocess=visualize.argmax_classes,
        colorize=visualize.colorize_classes,
        prediction_png=_class_png,
    ),
    "depth": TaskKind(
        name="depth",
        options={"range": None},
        weight=1.0,
        final_channels=lambda task: 1,
        aux_channels=lambda task: NUM_DEPTH_BINS,
        final_loss=lambda p, t, task, c: losses.depth_l1_loss(p, t),
        aux_loss=_depth_aux,
        meter=lambda task, s: metrics.DepthMeter(task.name),
        metrics=(("rmse", False), ("abs_rel", False)),
        read_label=lambda path, task: label_io.read_depth(path),
        pad_value=0.0,
        zero_is_ignore=True,
        scale_divides_values=True,
        postprocess=lambda x: x.float().clamp(min=0),
        colorize=visualize.colorize_depth,
    ),
    "normals": TaskKind(
        name="normals",
        options={"centroids": "kmeans"},
        weight=10.0,
        final_channels=lambda task: 3,
        aux_channels=_normals_aux_channels,
        final_loss=lambda p, t, task, c: losses.normals_l1_loss(p, t),
        aux_loss=_normals_aux,
        meter=lambda task, s: metrics.NormalsMeter(task.name),
        metrics=(
            ("mean_angle", False),
            ("median_angle", False),
            ("rmse_angle", False),
            ("within_11.25", True),
            ("within_22.5", True),
            ("within_30", True),
        ),
        read_label=lambda path, task: label_io.read_normals(path),
        label_channels=3,
        pad_value=0.0,
        zero_is_ignore=True,
        flip_negates_x=True,
        postprocess=visualize.unit_vectors,
        colorize=visualize.colorize_normals,
        aux_constant=_centroids,
    ),
    "edge": TaskKind(
        name="edge",
        options={"edge_pos_weight": 0.95, "edge_max_dist": 0.0075},
        weight=50.0,
        final_channels=lambda task: 1,
        aux_channels=lambda task: 2,
        final_loss=lambda p, t, task, c: losses.edge_bce_loss(p, t, _edge_weight(task)),
        aux_loss=lambda p, t, task, c: losses.weighted_edge_cross_entropy_loss(p, t, _edge_weight(task)),
        meter=_edge_meter,
        metrics=(("odsF", True), ("oisF", True), ("loss", False)),
        read_label=lambda path, task: label_io.read_edge(path),
        pad_value=IGNORE_INDEX,
        postprocess=lambda x: x.float().sigmoid(),
        colorize=visualize.colorize_probability,
        prediction_png=lambda p: visualize.to_uint8_prob(p),
    ),
    "saliency": TaskKind(
        name="saliency",
        options={},
        weight=5.0,
        final_channels=lambda task: 2,
        aux_channels=lambda task: 2,
        final_loss=lambda p, t, task, c: losses.balanced_cross_entropy_loss(p, t),
        aux_loss=lambda p, t, task, c: losses.balanced_cross_entropy_loss(p, t),
        meter=lambda task, s: metrics.SaliencyMeter(task.name),
        metrics=(("maxF", True), ("mIoU", True)),
        read_label=lambda path, task: label_io.read_saliency(path),
        integer_labels=True,
        pad_value=IGNORE_INDEX,
        postprocess=lambda x: x.float().softmax(1)[:, 1:2],
        colorize=visualize.colorize_probability,
        prediction_png=lambda p: visualize.to_uint8_prob(p),
    ),
}

#: The paper's tasks as named tasks of these kinds (the dataset configs state them with their
#: dataset's numbers; this table is the default of the Python API, e.g. the transforms).
PAPER_TASK_SPECS: dict[str, dict[str, Any]] = {
    "semseg": {"kind": "segmentation"},
    "human_parts": {"kind": "segmentation", "classes": 7, "weight": 2.0, "ignore_without_foreground": True},
    "sal": {"kind": "saliency"},
    "depth": {"kind": "depth", "range": [0.7, 10.0]},
    "normals": {"kind": "normals"},
    "edge": {"kind": "edge"},
}


def _plain(v: Any) -> Any:
    """An OmegaConf node as plain Python (lists, dicts); anything else as it is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v


def spec_problems(name: str, spec: Any) -> list[str]:
    """What is wrong with the spec of task ``name`` (empty: nothing), one line each."""
    import re

    spec = _plain(spec)
    if not re.fullmatch(NAME_PATTERN, str(name)):
        return [f"task name {name!r}: use lower-case letters, digits and _ (starting with a letter)"]
    if not isinstance(spec, Mapping):
        return [
            f"task {name!r}: expected a mapping such as {{kind: segmentation, classes: [a, b]}}, got {spec!r}"
        ]
    kind = TASK_KINDS.get(str(spec.get("kind")))
    if kind is None:
        return [f"task {name!r}: unknown kind {spec.get('kind')!r}; known kinds: {', '.join(TASK_KINDS)}"]
    out = []
    unknown = [k for k in spec if k not in COMMON_KEYS and k not in kind.options]
    if unknown:
        allowed = ", ".join([*COMMON_KEYS, *kind.options])
        out.append(
            f"task {name!r}: unknown key(s) {', '.join(map(str, unknown))} for kind {kind.name} (allowed: {allowed})"
        )
    for key in kind.required:
        if spec.get(key) is None:
            out.append(f"task {name!r}: kind {kind.name} needs `{key}`")
    w = spec.get("weight", kind.weight)
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
        out.append(f"task {name!r}: weight must be a positive number, got {w!r}")
    out += _option_problems(name, kind, spec)
    return out


def _option_problems(name: str, kind: TaskKind, spec: Mapping) -> list[str]:
    out = []
    c = spec.get("classes")
    if c is not None:
        ok = (isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255) or (
            isinstance(c, list) and 1 <= len(c) <= 255 and len({str(x) for x in c}) == len(c)
        )
        if not ok:
            out.append(
                f"task {name!r}: classes must be a list of distinct names (at most 255) or a count, got {c!r}"
            )
    r = spec.get("range")
    if r is not None and not (
        isinstance(r, list)
        and len(r) == 2
        and all(isinstance(x, (int, float)) for x in r)
        and 0 < r[0] < r[1]
    ):
        out.append(f"task {name!r}: range must be [min, max] in metres with 0 < min < max, got {r!r}")
    cent = spec.get("centroids")
    if cent is not None and not (
        cent in ("kmeans", *PUBLISHED_NORMAL_CENTROIDS)
        if isinstance(cent, str)
        else np.asarray(cent).ndim == 2 and np.asarray(cent).shape[1] == 3 and len(cent) >= 2
    ):
        out.append(
            f"task {name!r}: centroids must be kmeans, a published set ({', '.join(PUBLISHED_NORMAL_CENTROIDS)}) "
            f"or a list of [x, y, z] rows, got {cent!r}"
        )
    w = spec.get("edge_pos_weight")
    if w is not None and not (isinstance(w, (int, float)) and 0 < w < 1):
        out.append(f"task {name!r}: edge_pos_weight must be in (0, 1), got {w!r}")
    d = spec.get("edge_max_dist")
    if d is not None and not (isinstance(d, (int, float)) and 0 < d < 1):
        out.append(f"task {name!r}: edge_max_dist is a fraction of the image diagonal in (0, 1), got {d!r}")
    return out


def make_task(name: str, spec: Any) -> Task:
    """The :class:`Task` of ``spec`` (a mapping with ``kind``, optional ``weight`` and the kind's
    options); a :class:`TaskSpecError` listing every problem otherwise. ``classes`` may be left out
    (Python API use); configs and folder datasets must give it (:func:`spec_problems`)."""
    spec = _plain(spec)
    problems = [p for p in spec_problems(name, spec) if "needs `classes`" not in p]
    if problems:
        raise TaskSpecError("; ".join(problems))
    kind = TASK_KINDS[spec["kind"]]
    opts = {k: _plain(spec.get(k, default)) for k, default in kind.options.items()}
    return Task(str(name), kind, float(spec.get("weight", kind.weight)), MappingProxyType(opts))


def make_tasks(specs: Mapping[str, Any], names: Iterable[str] | None = None) -> list[Task]:
    """The tasks ``names`` (default: all) of ``specs`` (``{name: spec}``), in the order of ``names``."""
    specs = _plain(specs) or {}
    names = list(specs) if names is None else list(names)
    missing = [n for n in names if n not in specs]
    if missing:
        raise TaskSpecError(
            f"no spec for task(s) {', '.join(missing)}; the specs have {', '.join(specs) or 'none'}"
        )
    return [make_task(n, specs[n]) for n in names]


def paper_tasks(names: Iterable[str] = tuple(PAPER_TASK_SPECS), **options: Mapping[str, Any]) -> list[Task]:
    """The paper's named tasks ``names`` (:data:`PAPER_TASK_SPECS`); ``options`` adds per-task
    options, e.g. ``paper_tasks(["semseg", "edge"], semseg={"classes": 40}, edge={"edge_pos_weight": 0.8})``."""
    names = list(names)
    unknown = [n for n in names if n not in PAPER_TASK_SPECS]
    if unknown:
        raise TaskSpecError(
            f"unknown paper task(s) {unknown}; the paper's tasks: {', '.join(PAPER_TASK_SPECS)}"
        )
    return [make_task(n, {**PAPER_TASK_SPECS[n], **dict(options.get(n, {}))}) for n in names]


def tasks_by_name(tasks: Iterable[Task] | Mapping[str, Task] | None) -> dict[str, Task]:
    """``{name: task}`` of ``tasks`` (None: the paper's tasks, as the Python API's default)."""
    if tasks is None:
        return {t.name: t for t in paper_tasks()}
    if isinstance(tasks, Mapping):
        return dict(tasks)
    return {t.name: t for t in tasks}
