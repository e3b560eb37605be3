"""The fused CPU label-context attention kernel (atrc_exp.ops.label_attention) against the
PyTorch formulation of ``LabelContextBlock.attend``.

Values and gradients must equal the reference's up to float rounding for every shape (K = 1..40,
pixel counts that are not a multiple of the kernel's 64-pixel tiles or 256-pixel chunks, strided
queries); the key/value gradients are bitwise reproducible, also across thread counts; where the
kernel does not apply (bfloat16, autocast) or the backend is ``torch`` the reference runs; a failed
build behaves as documented; a label-context block gives the same outputs and parameter gradients
with either backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fail_builds, kernel_op_fixtures

from atrc_exp.ops import build
from atrc_exp.ops import label_attention as laop
from atrc_exp.ops.label_attention import label_attention, label_attention_reference

_auto_backend, ext, calls = kernel_op_fixtures(laop, "label_cpp")


def _inputs(B, d, K, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, H, W, generator=g, dtype=dtype)
    k = torch.randn(B, d, K, 1, generator=g, dtype=dtype)
    v = torch.randn(B, d, K, 1, generator=g, dtype=dtype)
    grad = torch.randn(B, d, H, W, generator=g, dtype=dtype)
    return q, k, v, grad


def _run(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def _assert_close(a, b, tol, what=""):
    """max |a - b| <= tol * max |b| (sums over thousands of pixels: relative to the scale)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
SHAPES = [
    (2, 33, 40, 48, 64),  # ATRC's: N = 3072, 48 tiles, 12 chunks
    (2, 33, 2, 48, 64),
    (1, 5, 2, 7, 9),  # N = 63: a single, partial tile
    (3, 7, 13, 1, 3),  # N = 3: less than a vector
    (2, 67, 40, 17, 19),  # N = 323: a full chunk, then a partial chunk ending in a partial tile
    (1, 4, 1, 8, 8),  # K = 1: p = 1
    (2, 1, 21, 16, 16),  # d = 1, N = 256: exactly one chunk
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_reference(calls, dtype, shape):
    q, k, v, grad = _inputs(*shape, dtype)
    got = _run(label_attention, q, k, v, grad)
    want = _run(label_attention_reference, q, k, v, grad)
    assert calls == {"forward": 1, "backward": 1}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        _assert_close(a, b, _TOL[dtype], name)


def test_float32_is_as_accurate_as_the_reference(calls):
    """Against float64 truth, the float32 kernel's error is of the reference's order."""
    q, k, v, grad = _inputs(2, 33, 40, 48, 64, torch.float64, seed=3)
    truth = _run(label_attention_reference, q, k, v, grad)
    got = _run(label_attention, *(t.float() for t in (q, k, v, grad)))
    ref = _run(label_attention_reference, *(t.float() for t in (q, k, v, grad)))
    for name, a, r, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        err_kernel = (a.double() - t).abs().max().item()
        err_ref = (r.double() - t).abs().max().item()
        assert err_kernel <= 4 * err_ref + 1e-7 * t.abs().max().item(), (name, err_kernel, err_ref)


def test_large_scores_do_not_overflow(calls):
    """Scores of ±hundreds: the max-subtracted softmax saturates like the reference's."""
    q, k, v, grad = _inputs(2, 8, 6, 9, 11, torch.float32, seed=4)
    q = q * 60
    got = _run(label_attention, q, k, v, grad)
    want = _run(label_attention_reference, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        _assert_close(a, b, 1e-5, name)


def test_softmax_tails_in_float32(calls):
    """K = 2, scores (0, x) with x from -100 to 0: p = sigmoid(x) to float precision (the kernel's
    own exp; max. relative error 1.8e-7, PyTorch's softmax has the same), and exactly 0 below
    x = -87 (near the bottom of float's normal range: no denormal probabilities)."""
    x = torch.linspace(-100, 0, 4001).double()  # float32 values: exactly representable scores
    q = x.view(1, 1, 1, -1)
    k = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 2, 1)  # d = 1: scale 1
    v = torch.tensor([0.0, 1.0], dtype=torch.float64).view(1, 1, 2, 1)  # out = p[:, 1]
    got = label_attention(q.float(), k.float(), v.float()).double().flatten()
    want = torch.sigmoid(x)
    below = x < -87
    rel = ((got - want).abs() / want)[~below]
    assert rel.max() < 3e-7, rel.max()
    assert (got[below] == 0).all()
    assert calls["forward"] == 1


@pytest.mark.parametrize("layout", ["channel_slice", "pixel_major"])
def test_non_contiguous_query(calls, layout):
    B, d, K, H, W = 2, 9, 5, 13, 10
    g = torch.Generator().manual_seed(1)
    if layout == "channel_slice":  # a channel slice of a bigger tensor
        base = torch.randn(B, 2 * d + 3, H, W, generator=g, dtype=torch.float64)
        view = lambda t: t[:, 3 : 3 + d]  # noqa: E731
    else:  # strides (N·d, 1, W·d, d): the layout of the reference's own output
        base = torch.randn(B, H * W, d, generator=g, dtype=torch.float64)
        view = lambda t: t.transpose(1, 2).view(B, d, H, W)  # noqa: E731
    assert not view(base).is_contiguous()
    k = torch.randn(B, d, K, 1, generator=g, dtype=torch.float64)
    v = torch.randn(B, d, K, 1, generator=g, dtype=torch.float64)
    grad = torch.randn(B, d, H, W, generator=g, dtype=torch.float64)
    results = []
    for fn in (label_attention, label_attention_reference):
        b = base.clone().requires_grad_()
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(view(b), kk, vv)
        results.append((out, *torch.autograd.grad(out, (b, kk, vv), grad)))
    assert calls == {"forward": 1, "backward": 1}
    for name, a, b in zip(("out", "dbase", "dk", "dv"), *results):
        _assert_close(a, b, 1e-12, name)


def test_gradcheck_in_double(ext):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 4, 1, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 4, 1, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(label_attention, (q, k, v))


def test_eval_and_no_grad(calls):
    q, k, v, _ = _inputs(2, 6, 3, 5, 7, torch.float64)
    with torch.no_grad():
        out = label_attention(q, k, v)
    with torch.inference_mode():
        out2 = label_attention(q, k, v)
    assert calls == {"forward": 2, "backward": 0}
    _assert_close(out, label_attention_reference(q, k, v), 1e-12)
    assert torch.equal(out, out2)


def test_key_value_gradients_are_deterministic(ext):
    q, k, v, grad = _inputs(2, 33, 40, 37, 41, torch.float32, seed=5)  # 1517 px: 6 chunks per image
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            runs.append(_run(label_attention, q, k, v, grad))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)  # bitwise, whatever the thread count


def test_bfloat16_and_autocast_use_the_reference(calls):
    q, k, v, _ = _inputs(2, 6, 4, 5, 7, torch.float32)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert torch.equal(label_attention(qb, kb, vb), label_attention_reference(qb, kb, vb))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = label_attention(q, k, v)
        want = label_attention_reference(q, k, v)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    # mixed dtypes: the reference's own error
    with pytest.raises(RuntimeError):
        label_attention(q, k.double(), v)
    # not a CPU tensor (meta stands in for CUDA here): the reference, shapes as always
    out = label_attention(q.to("meta"), k.to("meta"), v.to("meta"))
    assert out.device.type == "meta" and out.shape == q.shape
    assert calls == {"forward": 0, "backward": 0}


def test_tracing_uses_the_reference(calls, monkeypatch):
    q, k, v, _ = _inputs(2, 6, 4, 5, 7, torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(label_attention(q, k, v), label_attention_reference(q, k, v))
    assert calls == {"forward": 0, "backward": 0}


def test_torch_backend_never_calls_the_extension(monkeypatch):
    asked = []
    monkeypatch.setattr(build, "get_extension", lambda kind, **kw: asked.append(kind))
    laop.set_backend("torch")
    assert laop.get_backend() == "torch"
    q, k, v, grad = _inputs(2, 6, 4, 5, 7, torch.float64)
    got = _run(label_attention, q, k, v, grad)
    want = _run(label_attention_reference, q, k, v, grad)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert asked == []
    with pytest.raises(ValueError, match="one of"):
        laop.set_backend("cuda")


def test_a_failed_build(monkeypatch):
    q, k, v, _ = _inputs(2, 6, 4, 5, 7, torch.float32)

    fail_builds(monkeypatch, laop)
    laop.set_backend("cpp")
    with pytest.raises(build.ExtensionBuildError, match="simulated"):
        label_attention(q, k, v)
    laop.set_backend("auto")
    with pytest.warns(RuntimeWarning, match="label_attention: the C\\+\\+ kernel is unavailable"):
        out = label_attention(q, k, v)
    assert torch.equal(out, label_attention_reference(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        label_attention(q, k, v)


def _block_run(block, state, inputs, backend):
    laop.set_backend(backend)
    block.load_state_dict(state)
    block.zero_grad(set_to_none=True)
    tf, sf, prob, r = inputs
    tf, sf = tf.clone().requires_grad_(), sf.clone().requires_grad_()
    out = block(tf, sf, target_prob=prob)
    (out * r).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return out.detach(), tf.grad, sf.grad, grads


def _block_and_inputs():
    from atrc_exp.models.context_blocks import TLabelContextBlock

    torch.manual_seed(0)
    block = TLabelContextBlock(64, 33).double().train()  # float64: BN's projected gradients
    state = {k: v.clone() for k, v in block.state_dict().items()}
    B, K, H, W = 2, 40, 12, 16
    tf = torch.randn(B, 64, H, W, dtype=torch.float64)
    sf = torch.randn(B, 64, H, W, dtype=torch.float64)
    prob = torch.randn(B, K, H * W, dtype=torch.float64).softmax(dim=2)
    r = torch.randn(B, 33, H, W, dtype=torch.float64)
    return block, state, (tf, sf, prob, r)


def _compare_block_runs(a, b):
    for name, x, y in zip(("out", "d target_feats", "d source_feats"), a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=name)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        torch.testing.assert_close(a[3][name], b[3][name], rtol=1e-9, atol=1e-10, msg=name)


def test_label_context_block_with_label_attention_in_attend(calls, monkeypatch):
    """``label_attention`` as the block's ``attend``: same outputs and parameter gradients with
    the kernel and with the reference (a drop-in for the formulation it replaces)."""
    from atrc_exp.models.context_blocks import LabelContextBlock

    monkeypatch.setattr(LabelContextBlock, "attend", lambda self, q, k, v: label_attention(q, k, v))
    block, state, inputs = _block_and_inputs()
    a = _block_run(block, state, inputs, "cpp")
    assert calls == {"forward": 1, "backward": 1}
    b = _block_run(block, state, inputs, "torch")
    assert calls == {"forward": 1, "backward": 1}
    _compare_block_runs(a, b)


def test_label_context_block_routes_through_the_kernel(calls):
    """The model's own ``LabelContextBlock.attend`` calls :func:`label_attention`."""
    block, state, inputs = _block_and_inputs()
    a = _block_run(block, state, inputs, "cpp")
    if calls["forward"] == 0:
        pytest.skip("LabelContextBlock.attend does not call atrc_exp.ops.label_attention (not wired yet)")
    assert calls == {"forward": 1, "backward": 1}
    b = _block_run(block, state, inputs, "torch")
    assert calls == {"forward": 1, "backward": 1}
    _compare_block_runs(a, b)


# -- values of another width, accumulation into a given output (the ATRC module's out_proj fold) --


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 33, 40, 48, 64, 67), (2, 33, 2, 17, 19, 67), (1, 5, 3, 1, 70, 2)])
def test_values_of_another_width(calls, dtype, shape):
    B, d, K, H, W, dv = shape
    q, k, _, _ = _inputs(B, d, K, H, W, dtype)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(B, dv, K, 1, generator=g, dtype=dtype)
    grad = torch.randn(B, dv, H, W, generator=g, dtype=dtype)
    got = _run(label_attention, q, k, v, grad)
    want = _run(label_attention_reference, q, k, v, grad)
    assert calls["forward"] == 1 and calls["backward"] == 1 and got[0].shape == (B, dv, H, W)
    for a, b, what in zip(got, want, ("out", "dq", "dk", "dv")):
        _assert_close(a, b, _TOL[dtype], what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_add_into_a_channel_slice(calls, dtype):
    """``label_attention_add`` into a channel slice of a wider map (batch stride ≠ d_v·N), written in
    place, twice: base + both attentions, and the gradients (the base's passes through; the
    kernel reads the sliced gradient in place) as the reference's."""
    B, d, H, W, dv = 2, 33, 9, 70, 12  # N = 630: partial tiles and chunks
    g = torch.Generator().manual_seed(6)
    q1, k1 = (
        torch.randn(B, d, H, W, generator=g, dtype=dtype),
        torch.randn(B, d, 40, 1, generator=g, dtype=dtype),
    )
    q2, k2 = (
        torch.randn(B, d, H, W, generator=g, dtype=dtype),
        torch.randn(B, d, 2, 1, generator=g, dtype=dtype),
    )
    v1, v2 = (
        torch.randn(B, dv, 40, 1, generator=g, dtype=dtype),
        torch.randn(B, dv, 2, 1, generator=g, dtype=dtype),
    )
    x0 = torch.randn(B, 3 * dv, H, W, generator=g, dtype=dtype)
    grad = torch.randn(B, 3 * dv, H, W, generator=g, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x0, q1, k1, v1, q2, k2, v2)]

    def run(add):
        x, a1, b1, c1, a2, b2, c2 = (t.detach().clone().requires_grad_() for t in leaves)
        buf = x * 1.0
        part = add(add(buf[:, dv : 2 * dv], a1, b1, c1), a2, b2, c2)
        out = torch.cat([buf[:, :dv], part, buf[:, 2 * dv :]], dim=1)
        return (out, *torch.autograd.grad(out, (x, a1, b1, c1, a2, b2, c2), grad))

    want = run(lambda base, q, k, v: base + label_attention_reference(q, k, v))
    got = run(laop.label_attention_add)
    assert calls["forward"] == 2 and calls["backward"] == 2
    for a, b, what in zip(got, want, ("out", "dx", "dq1", "dk1", "dv1", "dq2", "dk2", "dv2")):
        _assert_close(a, b, _TOL[dtype], what)
