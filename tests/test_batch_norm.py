"""The fused CPU batch norm (+ReLU) kernel (atrc_exp.ops.batch_norm) against F.batch_norm.

Values, gradients and running statistics must equal PyTorch's up to float rounding; where the
kernel does not apply (eval, channels-last, bfloat16, a single value per channel) PyTorch's own
batch norm runs; the backend switch and a failed build behave as documented; the layers and
HRNet that route through it give the numbers of their plain ``nn.Sequential``/module forwards.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import count_kernel_calls, fail_builds, kernel_op_fixtures
from torch import nn

from atrc_exp.ops import batch_norm as bnop
from atrc_exp.ops import build

_auto_backend, ext, calls = kernel_op_fixtures(bnop, "bn_cpp")


def _reference(x, rm, rv, w, b, training, momentum, eps, relu):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return F.relu(y) if relu else y


def _run(fn, x, w, b, g, rm, rv, relu, momentum=0.1):
    x = x.clone().requires_grad_()
    w = None if w is None else w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, rm, rv, w, b, True, momentum, 1e-5, relu)
    inputs = [t for t in (x, w, b) if t is not None]
    return y, torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 20, 7, 9), (3, 5, 11), (1, 6, 1, 2)])
def test_matches_pytorch(calls, dtype, relu, affine, shape):
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
    grad = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.randn(C, generator=g, dtype=dtype) if affine else None
    b = torch.randn(C, generator=g, dtype=dtype) if affine else None
    rm, rv = torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y, grads = _run(bnop.batch_norm_act, x, w, b, grad, rm, rv, relu, momentum=0.3)
    y2, grads2 = _run(_reference, x, w, b, grad, rm2, rv2, relu, momentum=0.3)
    assert calls == {"forward": 1, "backward": 1}
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, y2, **tol)
    for a, r in zip(grads, grads2):
        torch.testing.assert_close(a, r, **tol)
    torch.testing.assert_close(rm, rm2, **tol)  # running mean and the unbiased running variance
    torch.testing.assert_close(rv, rv2, **tol)


def test_gradcheck_in_double(ext):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    for relu in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, w, b, relu=relu: bnop.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, relu),
            (x, w, b),
        )


def test_falls_back_to_pytorch_where_the_kernel_does_not_apply(calls):
    x = torch.randn(2, 6, 5, 4)
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    cases = [
        (x, False),  # eval: running statistics
        (x.contiguous(memory_format=torch.channels_last), True),
        (x.bfloat16(), True),  # as under CPU autocast: float32 parameters
    ]
    for xi, training in cases:
        y = bnop.batch_norm_act(xi, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, True)
        ref = F.relu(F.batch_norm(xi, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5))
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert calls == {"forward": 0, "backward": 0}
    # a single value per channel: PyTorch's error, not a division by zero
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnop.batch_norm_act(torch.randn(1, 3, 1, 1), None, None, None, None, True, 0.1, 1e-5)


def test_backend_switch_and_a_failed_build(monkeypatch, calls):
    x = torch.randn(2, 3, 4, 4)
    bnop.set_backend("torch")
    bnop.batch_norm_act(x, None, None, None, None, True)
    assert calls["forward"] == 0
    with pytest.raises(ValueError, match="auto, cpp, torch|one of"):
        bnop.set_backend("cuda")

    fail_builds(monkeypatch, bnop)
    bnop.set_backend("cpp")
    with pytest.raises(build.ExtensionBuildError, match="simulated"):
        bnop.batch_norm_act(x, None, None, None, None, True)
    bnop.set_backend("auto")
    with pytest.warns(RuntimeWarning, match="batch_norm: the C\\+\\+ kernel is unavailable"):
        y = bnop.batch_norm_act(x, None, None, None, None, True, relu=True)
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, None, None, True)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        bnop.batch_norm_act(x, None, None, None, None, True)


def test_conv_bn_relu_layers_match_their_modules_forward(calls):
    from atrc_exp.models.layers import ConvBNReLU

    torch.manual_seed(0)
    for relu in (True, False):
        # float64: the BN input gradient cancels (it is projected), float32 rounding would show
        a = ConvBNReLU(5, 7, 3, relu=relu, stride=2).double().train()
        b = ConvBNReLU(5, 7, 3, relu=relu, stride=2).double().train()
        b.load_state_dict(a.state_dict())
        x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
        r = torch.randn(2, 7, 5, 4, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = a(xa)
        yb = b.bn(b.conv(xb))  # the modules' own forward
        yb = yb.relu() if relu else yb
        torch.testing.assert_close(ya, yb)
        (ya.square() * r).sum().backward()
        (yb.square() * r).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        for (k, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=k)
        for k, v in a.state_dict().items():  # running statistics, num_batches_tracked
            torch.testing.assert_close(v, b.state_dict()[k], msg=k)
    assert calls["forward"] == 2 and calls["backward"] == 2


def test_modules_with_forward_hooks_run_their_own_forward(calls):
    from atrc_exp.models.layers import ConvBNReLU

    layer = ConvBNReLU(3, 4, 1).train()
    seen = []
    layer.bn.register_forward_hook(lambda m, i, o: seen.append("bn"))
    y = layer(torch.randn(2, 3, 5, 5))
    assert seen == ["bn"] and (y >= 0).all()
    assert calls["forward"] == 0


def test_hrnet_with_the_kernel_matches_pytorch_batch_norm(calls):
    from atrc_exp.models.hrnet import hrnet18

    torch.manual_seed(0)
    net = hrnet18().double().train()  # float64: a deep float32 net amplifies rounding differences
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)

    def run(backend):
        bnop.set_backend(backend)
        net.load_state_dict(state)
        net.zero_grad(set_to_none=True)
        ys = net(x)
        sum((y * y).mean() for y in ys).backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        return [y.detach() for y in ys], grads, {k: v.clone() for k, v in net.state_dict().items()}

    ys, grads, after = run("auto")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert calls["forward"] == n_bn  # every batch norm went through the kernel
    ys2, grads2, after2 = run("torch")
    assert calls["forward"] == n_bn
    for a, b in zip(ys, ys2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for k in grads:
        torch.testing.assert_close(grads[k], grads2[k], rtol=1e-7, atol=1e-9, msg=k)
    for k in after:
        torch.testing.assert_close(after[k], after2[k], rtol=1e-9, atol=1e-9, msg=k)


# --- softplus (the same extension) -----------------------------------------------------------
@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.0, 5.0), (0.5, 30.0)])
def test_softplus_matches_the_float64_result(monkeypatch, ext, beta, threshold):
    """float32: within 3e-7 relative of softplus in float64 over [-120, 60] (0 where the result is
    below the normal floats, as exp underflows), with PyTorch's threshold; float64: PyTorch's to
    1e-14; the gradient is PyTorch's own."""
    n = count_kernel_calls(monkeypatch, ext, "bn_cpp", names=("softplus",))
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-120, 60, 40001), torch.randn(9999, generator=g) * 4]).reshape(2, 5, 5000)
    ref = F.softplus(x.double(), beta, threshold)
    got = bnop.softplus(x, beta, threshold)
    assert got.dtype == torch.float32 and n["softplus"] == 1
    torch.testing.assert_close(got.double(), ref, rtol=3e-7, atol=1.2e-38)
    over = x * beta > threshold
    assert torch.equal(got[over], x[over])  # above the threshold: x itself
    got64 = bnop.softplus(x.double(), beta, threshold)
    torch.testing.assert_close(got64, ref, rtol=1e-14, atol=0)
    xr = x.clone().requires_grad_()
    gy = torch.randn(x.shape, generator=g)
    (dx,) = torch.autograd.grad(bnop.softplus(xr, beta, threshold), xr, gy)
    xr2 = x.clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.softplus(xr2, beta, threshold), xr2, gy)
    assert torch.equal(dx, dx_ref)
    assert n["softplus"] == 3
    xd = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bnop.softplus(t, beta, threshold), (xd,))


def test_softplus_of_a_channel_slice_and_where_the_kernel_does_not_apply(monkeypatch, ext):
    """A channel slice of an NCHW tensor (contiguous samples, another batch stride) goes through
    the kernel; non-contiguous samples, bfloat16 and backend ``torch`` give ``F.softplus`` itself."""
    n = count_kernel_calls(monkeypatch, ext, "bn_cpp", names=("softplus",))
    g = torch.Generator().manual_seed(1)
    big = torch.randn(3, 10, 6, 7, generator=g) * 5
    part = big[:, 4:7]
    got = bnop.softplus(part)
    assert n["softplus"] == 1 and got.is_contiguous() and got.shape == part.shape
    torch.testing.assert_close(got, F.softplus(part), rtol=3e-7, atol=0)
    for x in (big.transpose(2, 3), big.bfloat16()):
        assert torch.equal(bnop.softplus(x), F.softplus(x))
    bnop.set_backend("torch")
    assert torch.equal(bnop.softplus(part), F.softplus(part))
    assert n["softplus"] == 1
