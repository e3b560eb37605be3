"""Bilinear upsampling fused into the cross-entropy (atrc_exp.ops.upsample_cross_entropy) and the
losses on low-resolution outputs (``model(image, resize=False)``, what the trainer feeds the loss).

The kernel must equal ``F.interpolate(bilinear, align_corners=False)`` followed by
``F.cross_entropy`` (values and gradients, float64 to 1e-12, float32 to float rounding),
deterministically; the losses on low-resolution outputs must equal the losses on the upsampled
outputs, with the kernel and with PyTorch's path; the switch and a failed build behave as the
other kernels' do.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fail_builds, kernel_op_fixtures

from atrc_exp.config import ConfigError
from atrc_exp.engine.trainer import check_cpu_kernel_backend
from atrc_exp.losses import MultiTaskLoss, cross_entropy_loss
from atrc_exp.models.layers import resize_prediction
from atrc_exp.ops import build
from atrc_exp.ops import upsample_cross_entropy as uce

IGN = 255


_auto_backend, ext, calls = kernel_op_fixtures(uce, "ce_cpp")


def _reference(x, y, w):
    z = F.interpolate(x, size=tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
    return (F.cross_entropy(z, y, reduction="none") * w).sum()


SHAPES = [  # B, C, h, w, H, W
    (2, 40, 12, 16, 48, 64),  # 4x, the HRNet head
    (2, 5, 6, 7, 13, 30),  # odd, different factors per axis
    (1, 2, 8, 8, 3, 5),  # downsampling, 2 classes
    (3, 3, 5, 5, 5, 5),  # same size
    (1, 7, 1, 1, 4, 6),  # a single low-resolution pixel
]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_interpolate_then_cross_entropy_float64(ext, shape):
    B, C, h, w, H, W = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, C, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B, H, W), generator=g)
    wt = torch.rand(B, H, W, generator=g, dtype=torch.float64) * (torch.rand(B, H, W, generator=g) > 0.2)
    got = uce.upsample_cross_entropy(x, y, wt)
    want = _reference(x, y, wt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(got, x)
    (rx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)


def test_kernel_float32_large_logits_and_gradcheck(ext):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 40, 12, 16, generator=g) * 30).requires_grad_()  # saturated softmax
    y = torch.randint(0, 40, (2, 48, 64), generator=g)
    wt = torch.ones(2, 48, 64)
    got = uce.upsample_cross_entropy(x, y, wt)
    want = _reference(x.double(), y, wt.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    (gx,) = torch.autograd.grad(got, x)
    (rx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(gx.double(), rx.double(), rtol=1e-4, atol=1e-4)
    x64 = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y64 = torch.randint(0, 3, (1, 9, 11), generator=g)
    w64 = torch.rand(1, 9, 11, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: uce.upsample_cross_entropy(t, y64, w64), (x64,))


def test_kernel_is_deterministic_across_threads(ext):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 12, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (2, 48, 64), generator=g)
    wt = torch.ones(2, 48, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            t = uce.upsample_cross_entropy(x, y, wt)
            results.append((t.detach(), torch.autograd.grad(t, x)[0]))
    finally:
        torch.set_num_threads(threads)
    for t, gx in results[1:]:
        assert torch.equal(t, results[0][0]) and torch.equal(gx, results[0][1])


def test_kernel_rejects_out_of_range_targets(ext):
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="target class 3 is out of range"):
        uce.upsample_cross_entropy(x, torch.full((1, 8, 8), 3), torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match="B×H×W target"):
        uce.upsample_cross_entropy(x, torch.zeros(1, 1, 8, 8, dtype=torch.long), torch.ones(1, 8, 8))
    y = torch.full((1, 8, 8), IGN)
    y[0, 3, 3] = 7  # neither a class nor the ignore index
    with pytest.raises(RuntimeError, match="target class 7 is out of range"):
        uce.upsample_cross_entropy_ignore(x, y, None, IGN)
    y[0, 3, 3] = 2
    total, den = uce.upsample_cross_entropy_ignore(x, y, torch.tensor([1.0, 2.0, 0.5]), IGN)
    assert float(den) == 0.5 and not den.requires_grad  # the one valid pixel's class weight


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cross_entropy_loss_on_low_resolution_logits(ext, calls, backend):
    """Ignore pixels, class weights and an all-ignored image: the same loss and gradient as
    upsampling first (the model's own resize), with the kernel and with PyTorch's path."""
    uce.set_backend(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 10, 12, generator=g, requires_grad=True)
    y = torch.randint(0, 6, (2, 1, 40, 48), generator=g)
    y[0, 0, :5] = IGN
    y[1] = IGN
    weight = torch.rand(6, generator=g)
    for wgt in (None, weight):
        got = cross_entropy_loss(x, y, weight=wgt)
        want = cross_entropy_loss(resize_prediction(x, (40, 48)), y, weight=wgt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (gx,) = torch.autograd.grad(got, x)
        (rx,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-7)
    assert (calls["forward"] > 0) == (backend == "auto")


def test_multitask_loss_on_low_resolution_outputs(ext, calls):
    """Every NYUD and PASCAL task, final and aux: ``loss(low-res outputs)`` == ``loss(upsampled
    outputs)``, values, terms and gradients."""
    g = torch.Generator().manual_seed(2)
    B, h, w, H, W = 2, 8, 10, 32, 40
    tasks = ["semseg", "depth", "normals", "edge", "sal", "human_parts"]
    chans = {"semseg": 7, "depth": 1, "normals": 3, "edge": 1, "sal": 2, "human_parts": 5}
    aux_ch = {"semseg": 7, "depth": 40, "normals": 4, "edge": 2, "sal": 2, "human_parts": 5}
    low = {
        "final": {t: torch.randn(B, chans[t], h, w, generator=g, requires_grad=True) for t in tasks},
        "aux": {t: torch.randn(B, aux_ch[t], h, w, generator=g, requires_grad=True) for t in tasks},
    }
    batch = {
        "semseg": torch.randint(0, 7, (B, 1, H, W), generator=g),
        "human_parts": torch.randint(0, 5, (B, 1, H, W), generator=g),
        "sal": (torch.rand(B, 1, H, W, generator=g) > 0.5).float(),
        "edge": (torch.rand(B, 1, H, W, generator=g) > 0.8).float(),
        "depth": torch.rand(B, 1, H, W, generator=g) * 9 + 0.5,
        "normals": F.normalize(torch.randn(B, 3, H, W, generator=g), dim=1),
    }
    batch["semseg"][0, 0, :3] = IGN
    batch["depth"][1, 0, 5:9] = IGN
    centroids = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    crit = MultiTaskLoss(tasks, edge_pos_weight=0.8, normal_centroids=centroids)
    full = {k: {t: resize_prediction(v, (H, W)) for t, v in d.items()} for k, d in low.items()}
    loss_low, terms_low = crit(low, batch)
    loss_full, terms_full = crit(full, batch)
    torch.testing.assert_close(loss_low, loss_full, rtol=1e-5, atol=1e-6)
    assert terms_low.keys() == terms_full.keys()
    for k in terms_low:
        torch.testing.assert_close(terms_low[k], terms_full[k], rtol=1e-5, atol=1e-6)
    leaves = [v for d in low.values() for v in d.values()]
    g_low = torch.autograd.grad(loss_low, leaves)
    g_full = torch.autograd.grad(loss_full, leaves)
    for a, b in zip(g_low, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the 2+ channel class logits went through the kernel: semseg, sal, parts (final) + 6 aux
    assert calls["forward"] == 9


def test_model_without_resize_returns_the_head_maps():
    from atrc_exp.models.heads import MultiTaskFCNHead
    from atrc_exp.models.model import MultiTaskModel

    class Backbone(torch.nn.Module):
        out_channels = [4]

        def forward(self, x):
            return [F.avg_pool2d(x.repeat(1, 2, 1, 1)[:, :4], 4)]

    model = MultiTaskModel(Backbone(), MultiTaskFCNHead(4, {"semseg": 5, "depth": 1}), ["semseg", "depth"])
    x = torch.randn(2, 3, 16, 20)
    low = model(x, resize=False)
    full = model(x)
    assert low["final"]["semseg"].shape == (2, 5, 4, 5)
    assert full["final"]["semseg"].shape == (2, 5, 16, 20)
    torch.testing.assert_close(resize_prediction(low["final"]["semseg"], (16, 20)), full["final"]["semseg"])


def test_backend_switch_and_failed_build(monkeypatch):
    with pytest.raises(ValueError, match="auto"):
        uce.set_backend("fast")
    with pytest.raises(ConfigError, match="ops.upsample_cross_entropy.backend=fast"):
        check_cpu_kernel_backend("upsample_cross_entropy", "fast")

    fail_builds(monkeypatch, uce, "no compiler here")
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    y = torch.randint(0, 3, (1, 1, 8, 8))
    want = cross_entropy_loss(resize_prediction(x, (8, 8)), y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cross_entropy_loss(x, y)
        cross_entropy_loss(x, y)
    torch.testing.assert_close(got, want)
    assert sum("upsample_cross_entropy" in str(w.message) for w in caught) == 1
    uce.set_backend("cpp")
    with pytest.raises(build.ExtensionBuildError):
        cross_entropy_loss(x, y)
    with pytest.raises(ConfigError, match="forced"):
        check_cpu_kernel_backend("upsample_cross_entropy", "cpp")


def test_nearest_centroid_kernel_equals_pytorch(ext, calls):
    """The aux normals target from the kernel equals PyTorch's matmul + argmax path: invalid
    pixels 255, ties to the first centroid, NaN normals handed back to PyTorch's argmax."""
    from atrc_exp.losses import normals_to_centroid_index

    g = torch.Generator().manual_seed(5)
    n = torch.randn(2, 3, 24, 32, generator=g) * 3
    n[0, :, :4] = 255  # invalid
    n[1, :, 5, 5] = 0.0  # zero vector: every similarity 0, the first centroid
    c = torch.randn(12, 3, generator=g)
    c[7] = c[2]  # a tie between two centroids: the first wins
    got = normals_to_centroid_index(n, c)
    uce.set_backend("torch")
    want = normals_to_centroid_index(n, c)
    uce.set_backend("auto")
    assert calls["forward"] == 0  # nearest_centroid is its own entry point
    assert torch.equal(got, want)
    assert (got[0, :4] == IGN).all() and got[1, 5, 5] == 0 and not (got == 7).any()
    n[1, 0, 2, 2] = float("nan")
    uce.set_backend("torch")
    want = normals_to_centroid_index(n, c)
    uce.set_backend("auto")
    assert torch.equal(normals_to_centroid_index(n, c), want)
