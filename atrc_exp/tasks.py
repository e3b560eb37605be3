"""Task registry: the facts every part of the framework shares about each dense task.

Target conventions inside a batch (after the transforms, B = batch, H×W = crop size):

| task          | batch key      | dtype / shape        | values                          | ignore  |
|---------------|----------------|----------------------|---------------------------------|---------|
| semseg        | ``semseg``     | int64  B×H×W         | 0..K-1                          | 255     |
| human_parts   | ``human_parts``| int64  B×H×W         | 0 background, 1..6 parts        | 255     |
| sal           | ``sal``        | int64  B×H×W         | 0 / 1                           | 255     |
| depth         | ``depth``      | float32 B×1×H×W      | metres (> 0)                    | 255     |
| normals       | ``normals``    | float32 B×3×H×W      | unit vectors, camera frame      | 255 (all three channels) |
| edge          | ``edge``       | float32 B×1×H×W      | 0 / 1                           | 255     |

An image smaller than the crop is padded with the image in the **centre** (the original's
placement, :func:`pad_offsets`); :func:`crop_center` takes a padded map or prediction back to the
image's own pixels.

Network outputs are logits/raw maps at input resolution with ``num_outputs(task)`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255

#: Every task the framework knows, in canonical order.
ALL_TASKS: tuple[str, ...] = ("semseg", "depth", "normals", "edge", "sal", "human_parts")

#: Loss weight of each task (applies to its ``final`` and ``aux`` terms alike).
LOSS_WEIGHTS: dict[str, float] = {
    "semseg": 1.0,
    "human_parts": 2.0,
    "sal": 5.0,
    "normals": 10.0,
    "depth": 1.0,
    "edge": 50.0,
}

#: Number of human-part classes including background (head, torso, upper arm, lower arm,
#: upper leg, lower leg + background).
HUMAN_PARTS_CLASSES = 7
#: Auxiliary classification targets for regression tasks.
NUM_NORMAL_CENTROIDS = 40
#: The normal centroids the original implementation ships, by set name (``dataset.normal_centroids``;
#: a JSON file each in ``atrc_exp/resources/``: ``{"centroids": [[x, y, z], ...]}``, class k = row k).
PUBLISHED_NORMAL_CENTROIDS: dict[str, str] = {
    "nyud": "nyud_normal_centroids.json",
    "pascal_context": "pascal_context_normal_centroids.json",
}
NUM_DEPTH_BINS = 40


def pad_offsets(image_hw: tuple[int, int], padded_hw: tuple[int, int]) -> tuple[int, int]:
    """``(top, left)`` of an ``h×w`` image inside its ``H×W`` padded version: the original pads with
    the image in the centre, ⌊(H − h)/2⌋ rows above and ⌊(W − w)/2⌋ columns to the left (0 along a
    dimension that needed no padding). Raises ``ValueError`` if the image is larger than ``padded_hw``
    (padding never cuts: a larger image is kept whole, so its padded size is its own size)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    H, W = int(padded_hw[0]), int(padded_hw[1])
    if h > H or w > W or min(h, w) < 0:
        raise ValueError(f"an image of {h}×{w} does not fit in a padded map of {H}×{W}")
    return (H - h) // 2, (W - w) // 2


def crop_center(arr, image_hw: tuple[int, int]):
    """The ``h×w`` window of ``arr`` (numpy array or tensor, …×H×W: the last two axes are the
    spatial ones) where the image sits after centred padding (:func:`pad_offsets`): a padded
    target or prediction cropped back to the image's own pixels. A view, not a copy."""
    h, w = int(image_hw[0]), int(image_hw[1])
    top, left = pad_offsets((h, w), tuple(arr.shape[-2:]))
    return arr[..., top : top + h, left : left + w]


@dataclass(frozen=True)
class TaskInfo:
    """Per-task facts: output channels of the final and auxiliary predictions."""

    name: str
    final_channels: int
    aux_channels: int
    #: True where a *lower* metric is better (Δm sign convention).
    lower_is_better: bool


def task_info(task: str, num_semseg_classes: int) -> TaskInfo:
    """Return the :class:`TaskInfo` of ``task`` for a dataset with ``num_semseg_classes`` classes."""
    table = {
        "semseg": (num_semseg_classes, num_semseg_classes, False),
        "human_parts": (HUMAN_PARTS_CLASSES, HUMAN_PARTS_CLASSES, False),
        "sal": (2, 2, False),
        "normals": (3, NUM_NORMAL_CENTROIDS, True),
        "depth": (1, NUM_DEPTH_BINS, True),
        "edge": (1, 2, False),
    }
    if task not in table:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")
    final, aux, lower = table[task]
    return TaskInfo(task, final, aux, lower)
