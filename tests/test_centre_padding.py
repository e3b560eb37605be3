"""Centred padding (the original's placement) and cropping predictions back from the centre."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atrc_exp.data import transforms as T
from atrc_exp.task_kinds import paper_tasks
from atrc_exp.tasks import crop_center, pad_offsets

X = 255  # label padding / ignore


def _small():
    """A 2×3 sample with every kind of map (values chosen to be told apart from the padding)."""
    img = np.array([[[10, 11, 12], [20, 21, 22], [30, 31, 32]], [[40, 41, 42], [50, 51, 52], [60, 61, 62]]])
    return {
        "image": img.astype(np.uint8),
        "semseg": np.array([[1, 2, 3], [4, 5, 6]], np.int64),
        "depth": np.array([[1.5, 2.5, 3.5], [4.5, 5.5, 6.5]], np.float32),
        "normals": np.tile(np.array([0.0, 0.6, 0.8], np.float32), (2, 3, 1)),
        "edge": np.array([[0, 1, 0], [1, 0, 1]], np.float32),
        "meta": {"name": "small"},
    }


# 2×3 padded to 5×6: ΔH = 3 → 1 row above, 2 below; ΔW = 3 → 1 column left, 2 right
SEMSEG_5x6 = [
    [X, X, X, X, X, X],
    [X, 1, 2, 3, X, X],
    [X, 4, 5, 6, X, X],
    [X, X, X, X, X, X],
    [X, X, X, X, X, X],
]
# what bottom-right padding (the old placement) gave
SEMSEG_5x6_BOTTOM_RIGHT = [
    [1, 2, 3, X, X, X],
    [4, 5, 6, X, X, X],
    [X, X, X, X, X, X],
    [X, X, X, X, X, X],
    [X, X, X, X, X, X],
]
IMAGE_R_5x6 = [
    [0, 0, 0, 0, 0, 0],
    [0, 10, 20, 30, 0, 0],
    [0, 40, 50, 60, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
]
DEPTH_5x6 = [
    [0, 0, 0, 0, 0, 0],
    [0, 1.5, 2.5, 3.5, 0, 0],
    [0, 4.5, 5.5, 6.5, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
]


def test_padding_puts_the_image_in_the_centre():
    """Padding alone (mean 0, std 1, no ignore regions: raw values and each kind's pad value)."""
    out = T.NormalizePadToTensor((5, 6), mean=(0, 0, 0), std=(1, 1, 1), ignore_regions=False)(_small())
    assert out["semseg"].tolist() == SEMSEG_5x6 and out["semseg"].tolist() != SEMSEG_5x6_BOTTOM_RIGHT
    assert out["image"][0].tolist() == IMAGE_R_5x6
    assert out["depth"][0].tolist() == DEPTH_5x6
    edge = np.full((5, 6), X, np.float32)
    edge[1:3, 1:4] = [[0, 1, 0], [1, 0, 1]]
    np.testing.assert_array_equal(out["edge"][0].numpy(), edge)
    normals = np.zeros((5, 6, 3), np.float32)
    normals[1:3, 1:4] = [0.0, 0.6, 0.8]
    np.testing.assert_array_equal(out["normals"].permute(1, 2, 0).numpy(), normals)
    assert out["meta"] == {"name": "small"}


def test_fused_normalize_pad_to_tensor_centres_too():
    """The one-pass step (mean 0, std 1: raw values) writes the same centred maps; padded depth and
    normals become ignore (255)."""
    out = T.NormalizePadToTensor((5, 6), mean=(0, 0, 0), std=(1, 1, 1))(_small())
    assert out["semseg"].tolist() == SEMSEG_5x6
    assert out["image"][0].tolist() == IMAGE_R_5x6
    blue = np.array(IMAGE_R_5x6) + np.where(np.array(SEMSEG_5x6) == X, 0, 2)  # 12, 22, ... inside
    assert out["image"][2].tolist() == blue.tolist()
    depth = np.array(DEPTH_5x6, np.float32)
    depth[depth == 0] = X
    assert out["depth"][0].numpy().tolist() == depth.tolist()
    valid = np.array(SEMSEG_5x6) != X
    assert (out["normals"][:, ~valid] == X).all() and (out["normals"][1, valid] == np.float32(0.6)).all()
    # and the validation pipeline (ImageNet statistics): the padding is 0 after normalisation
    val = T.build_val_transform((5, 6))(_small())
    assert val["semseg"].tolist() == SEMSEG_5x6 and (val["image"][:, ~valid] == 0).all()
    assert (val["image"][:, valid] != 0).all()


def test_nothing_is_cut_along_a_larger_dimension():
    s = _small()
    s = {k: (v if k == "meta" else np.concatenate([v, v, v, v[:1]], 0)) for k, v in s.items()}  # 7×3
    out = T.NormalizePadToTensor((5, 6))(s)["semseg"].numpy()
    assert out.shape == (7, 6)  # 7 rows kept, 3 columns padded: 1 left, 2 right
    np.testing.assert_array_equal(out[:, 1:4], s["semseg"])
    assert (out[:, [0, 4, 5]] == X).all()


def test_pad_offsets_and_crop_center_by_hand():
    assert pad_offsets((2, 3), (5, 6)) == (1, 1)
    assert pad_offsets((375, 500), (512, 512)) == (68, 6)  # a PASCAL-Context image
    assert pad_offsets((500, 333), (512, 512)) == (6, 89)
    assert pad_offsets((425, 560), (425, 560)) == (0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        pad_offsets((6, 3), (5, 6))
    padded = np.array(SEMSEG_5x6)
    assert crop_center(padded, (2, 3)).tolist() == [[1, 2, 3], [4, 5, 6]]
    t = torch.arange(2 * 5 * 6).reshape(2, 1, 5, 6)  # tensors, with leading axes
    assert torch.equal(crop_center(t, (2, 3)), t[..., 1:3, 1:4])
    np.testing.assert_array_equal(crop_center(padded, (5, 6)), padded)  # nothing padded: all of it


class _EchoNet(torch.nn.Module):
    """Returns its input's channel 0 as edge logits and records the input."""

    def forward(self, x):
        self.seen = x
        return {"final": {"edge": x[:, :1].clone(), "semseg": torch.cat([x[:, :1], -x[:, :1]], 1)}}


def test_predict_pads_in_the_centre_and_crops_back_from_it():
    from atrc_exp.cli.predict import predict_image
    from atrc_exp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 37, 3), dtype=np.uint8)
    net = _EchoNet()
    preds = predict_image(
        net, rgb, torch.device("cpu"), paper_tasks(["edge", "semseg"], semseg={"classes": 2})
    )
    # 20×37 → 32×64 (multiples of 32): 6 rows above, 13 columns to the left
    assert net.seen.shape == (1, 3, 32, 64)
    inside = torch.zeros(32, 64, dtype=torch.bool)
    inside[6:26, 13:50] = True
    assert (net.seen[0][:, ~inside] == 0).all()
    norm0 = (rgb[..., 0].astype(np.float32) - np.float32(IMAGENET_MEAN[0])) / np.float32(IMAGENET_STD[0])
    np.testing.assert_allclose(net.seen[0, 0, 6:26, 13:50].numpy(), norm0, rtol=1e-6, atol=1e-6)
    # every prediction is the image's own window: sigmoid of the normalised red channel
    assert preds["edge"].shape == (20, 37)
    np.testing.assert_allclose(preds["edge"], 1 / (1 + np.exp(-norm0)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(preds["semseg"], (norm0 < -norm0).astype(np.int64))


def test_predict_writes_truncated_probability_pngs(tmp_path):
    import cv2

    from atrc_exp.cli.predict import write_predictions

    rgb = np.zeros((2, 3, 3), np.uint8)
    p = np.array([[0.5, 1.0, 0.0], [0.999, 0.2, 0.75]], np.float32)
    write_predictions(rgb, {"edge": p, "sal": p}, tmp_path, paper_tasks(["edge", "sal"]))
    for task in ("edge", "sal"):
        png = cv2.imread(str(tmp_path / f"{task}.png"), cv2.IMREAD_UNCHANGED)
        # 127.5 → 127, 255, 0, 254.745 → 254, 51, 191.25 → 191 (truncated, not rounded)
        assert png.tolist() == [[127, 255, 0], [254, 51, 191]], task


def test_batch_image_sizes_from_collated_meta():
    from torch.utils.data import default_collate

    from atrc_exp.metrics import batch_image_sizes

    samples = [{"meta": {"name": "a", "size": (20, 30)}}, {"meta": {"name": "b", "size": (24, 17)}}]
    batch = default_collate(samples)
    assert batch_image_sizes(batch, (2, 1, 24, 32)) == [(20, 30), (24, 17)]
    assert batch_image_sizes(batch, (3, 1, 24, 32)) is None  # not one size per image
    assert batch_image_sizes(batch, (2, 1, 23, 32)) is None  # 24 rows do not fit in 23
    assert batch_image_sizes({"edge": torch.zeros(2, 1, 24, 32)}, (2, 1, 24, 32)) is None
    assert batch_image_sizes({"meta": {"name": ["a"]}}, (1, 1, 24, 32)) is None
