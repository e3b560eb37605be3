"""The resize-and-add kernel (``atrc_exp.ops.upsample_add``) and the aux heads' 1×1 convolution at
the backbone branches' resolutions (``layers.pointwise_conv_of_concat``) against PyTorch:
``F.interpolate`` + add, and the convolution of the concatenated features."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fail_builds, kernel_op_fixtures

from atrc_exp.config import ConfigError
from atrc_exp.engine.trainer import check_cpu_kernel_backend
from atrc_exp.models.layers import concat_features, pointwise_conv_of_concat
from atrc_exp.models.relational_head import RelationalContextHead
from atrc_exp.ops import build
from atrc_exp.ops import upsample_add as ua

# upsampling by 2, 4, 8, a map of the output's size, odd ratios and a downsampling
SIZES = [(8, 12), (4, 6), (2, 3), (16, 24), (5, 7), (20, 30)]


_auto_backend, ext, calls = kernel_op_fixtures(ua, "ups_cpp")


def _maps(dtype, B=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, C, 16, 24, generator=g, dtype=dtype, requires_grad=True)
    maps = [torch.randn(B, C, h, w, generator=g, dtype=dtype, requires_grad=True) for h, w in SIZES]
    return base, maps


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_kernel_matches_interpolate_and_add(calls, dtype, tol):
    base, maps = _maps(dtype)
    want = ua.upsample_add_reference(base, maps)
    got = ua.upsample_add(base, maps)
    assert calls["forward"] == 1
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g = torch.randn_like(want)
    rg = torch.autograd.grad(want, [base, *maps], g)
    kg = torch.autograd.grad(got, [base, *maps], g)
    assert calls["backward"] == 1
    for a, b in zip(kg, rg):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10)


def test_gradcheck(ext):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    maps = [
        torch.randn(1, 2, h, w, generator=g, dtype=torch.float64, requires_grad=True)
        for h, w in [(3, 4), (2, 5), (6, 8)]
    ]
    assert torch.autograd.gradcheck(lambda b, *m: ua.upsample_add(b, m), (base, *maps))


def test_inplace_writes_base_and_default_does_not(ext):
    base, maps = _maps(torch.float32)
    b = base.detach().clone()
    want = ua.upsample_add_reference(b, [m.detach() for m in maps])
    out = ua.upsample_add(b, [m.detach() for m in maps])
    assert out.data_ptr() != b.data_ptr() and torch.equal(b, base.detach())
    out2 = ua.upsample_add(b, [m.detach() for m in maps], inplace=True)
    assert out2.data_ptr() == b.data_ptr()
    torch.testing.assert_close(b, want)
    # through autograd: the fresh output of an op, written in place, gradients unchanged
    x = base.detach().clone().requires_grad_()
    y = ua.upsample_add(x * 2, maps, inplace=True)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gx, torch.full_like(gx, 2.0))


def test_same_bits_for_any_thread_count(ext):
    base, maps = _maps(torch.float32, C=9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = ua.upsample_add(base, maps)
            results.append((y.detach(), torch.autograd.grad(y, maps, torch.ones_like(y))))
    finally:
        torch.set_num_threads(threads)
    for y, gs in results[1:]:
        assert torch.equal(y, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(gs, results[0][1]))


def _branches(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 16, 20), (5, 8, 10), (4, 4, 5), (3, 2, 3)]  # HRNet-like halving (odd last)
    return [torch.randn(2, c, h, w, generator=g, dtype=dtype) for c, h, w in shapes]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_pointwise_conv_of_concat_matches_the_convolution(calls, backend):
    ua.set_backend(backend)
    branches = [b.requires_grad_() for b in _branches(torch.float64)]
    weight = torch.randn(7, 18, 1, 1, dtype=torch.float64, requires_grad=True)
    want = F.conv2d(concat_features(branches), weight)
    got = pointwise_conv_of_concat(branches, weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad(got, [weight, *branches], g), torch.autograd.grad(want, [weight, *branches], g)
    ):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert (calls["forward"] == 1) == (backend == "auto")


def _head(seed=0):
    torch.manual_seed(seed)
    tasks = ["semseg", "depth", "edge"]
    geno = {
        "semseg": {"semseg": 3, "depth": 4, "edge": 4},
        "depth": {"semseg": 1, "depth": 3, "edge": 0},
        "edge": {"semseg": 3, "depth": 2, "edge": 3},
    }
    return (
        RelationalContextHead(
            18,
            tasks,
            geno,
            {"semseg": 5, "depth": 1, "edge": 1},
            {"semseg": 5, "depth": 4, "edge": 2},
            kernel_size=3,
        )
        .double()
        .train()
    )


def test_head_with_branches_matches_the_concatenated_path(calls):
    """The ATRC head given the backbone branches: same outputs, parameter gradients and running
    statistics as without them (float64), and the aux convolution went through the kernel."""
    branches = _branches(torch.float64)
    x = concat_features(branches).requires_grad_()
    results = []
    for use in (False, True):
        head = _head()
        out = head(x, branches=branches if use else None)
        loss = sum(v.square().mean() for kind in out.values() for v in kind.values())
        grads = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)
        results.append((out, grads, {k: v.clone() for k, v in head.state_dict().items()}))
        assert calls["forward"] == (1 if use else 0)
    (o0, g0, s0), (o1, g1, s1) = results
    for kind in o0:
        for t in o0[kind]:
            torch.testing.assert_close(o1[kind][t], o0[kind][t], rtol=1e-9, atol=1e-10)
    for a, b in zip(g1, g0):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-9, atol=1e-10)


def test_branches_that_do_not_make_x_are_ignored(calls):
    branches = _branches(torch.float64)
    x = concat_features(branches)
    head = _head()
    head(x, branches=branches[:3])  # channels do not add up to x's
    head(x, branches=branches[1:] + branches[:1])  # the first branch is not x's size
    assert calls["forward"] == 0


def test_backend_switch_and_failed_build(monkeypatch):
    with pytest.raises(ValueError, match="auto"):
        ua.set_backend("fast")
    with pytest.raises(ConfigError, match="ops.upsample_add.backend=fast"):
        check_cpu_kernel_backend("upsample_add", "fast")

    fail_builds(monkeypatch, ua, "no compiler here")
    branches = _branches(torch.float32)
    weight = torch.randn(4, 18, 1, 1)
    x = concat_features(branches)
    head = _head().float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head(x, branches=branches)  # falls back to the convolution of x
        head(x, branches=branches)
    assert sum("upsample_add" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(
        pointwise_conv_of_concat(branches, weight), F.conv2d(x, weight), rtol=1e-5, atol=1e-5
    )
    ua.set_backend("cpp")
    with pytest.raises(build.ExtensionBuildError):
        ua.upsample_add(torch.zeros(1, 1, 2, 2), [torch.zeros(1, 1, 1, 1)])
    with pytest.raises(ConfigError, match="forced"):
        check_cpu_kernel_backend("upsample_add", "cpp")
