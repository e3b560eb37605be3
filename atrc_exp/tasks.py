"""Facts every part of the framework shares about dense targets (what each *kind* of task does is
the table :data:`atrc_exp.task_kinds.TASK_KINDS`).

Target conventions inside a batch (after the transforms, B = batch, H×W = crop size), by kind;
the batch key is the task's name (``semseg``, ``depth``, …, or a folder dataset's own names):

| kind          | dtype / shape        | values                          | ignore (no label) |
|---------------|----------------------|---------------------------------|-------------------|
| segmentation  | int64  B×H×W         | 0..K-1                          | 255     |
| saliency      | int64  B×H×W         | 0 / 1                           | 255     |
| depth         | float32 B×1×H×W      | metres (> 0)                    | 255     |
| normals       | float32 B×3×H×W      | unit vectors, camera frame      | 255 (all three channels) |
| edge          | float32 B×1×H×W      | 0 / 1                           | 255     |

An image smaller than the crop is padded with the image in the **centre** (the original's
placement, :func:`pad_offsets`); :func:`crop_center` takes a padded map or prediction back to the
image's own pixels.

Network outputs are logits/raw maps at input resolution with ``task.final_channels`` channels.
"""

from __future__ import annotations

IGNORE_INDEX = 255

#: Auxiliary classification targets for regression tasks.
NUM_NORMAL_CENTROIDS = 40
#: The normal centroids the original implementation ships, by set name (a normals task's ``centroids``;
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
