"""The local-attention op: reference, C++ (and CUDA where present) kernels, custom-op plumbing."""

from __future__ import annotations

import importlib
import math
import shutil
import warnings

import pytest
import torch
from local_attention_checks import compile_check_cuda, local_attention_naive

from atrc_exp import ops
from atrc_exp.ops import build
from atrc_exp.ops.local_attention import local_attention
from atrc_exp.ops.reference import reference_backward, reference_forward

# ``atrc_exp.ops.local_attention`` the attribute is the function; the module is in sys.modules
la_mod = importlib.import_module("atrc_exp.ops.local_attention")

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cpu_backends() -> list[str]:
    """``torch`` plus ``cpp`` (building the C++ extension once, cached on disk across runs).
    A missing compiler is a failure here: the CPU kernel is part of the default test run."""
    build.get_extension("cpp")
    return ["torch", "cpp"]


# sizes: (B, C, H, W); tiny/odd ones have H or W smaller than k
CASES = [
    (1, (2, 3, 5, 6)),
    (3, (2, 5, 4, 7)),
    (3, (1, 2, 1, 1)),
    (9, (2, 6, 5, 3)),
    (9, (1, 7, 11, 13)),
    (9, (2, 4, 2, 17)),
    (9, (1, 9, 10, 9)),
]


def _inputs(shape, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        for _ in range(4)
    ]


def _run(backend, q, k, v, g, ks):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = local_attention(q, k, v, ks, backend=backend)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _oracle(q, k, v, g, ks):
    """float64 autograd oracle (F.unfold formulation, independent of the hand-written backward)."""
    q, k, v = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    out = local_attention_naive(q, k, v, ks)
    out.backward(g.double().cpu())
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ks,shape", CASES)
def test_matches_float64_oracle(cpu_backends, backend, dtype, ks, shape):
    q, k, v, g = _inputs(shape, dtype)
    got = _run(backend, q, k, v, g, ks)
    want = _oracle(q, k, v, g, ks)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < tol, f"{backend} {dtype} k={ks} {shape}: {name} rel err {err:.2e}"


def test_border_semantics_zero_keys_stay_in_softmax():
    # one pixel, k=3: 8 of the 9 window positions are outside -> score 0 and value 0
    q = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    k = torch.full((1, 1, 1, 1), 3.0, dtype=torch.float64)
    v = torch.full((1, 1, 1, 1), 5.0, dtype=torch.float64)
    for backend in ("torch", "cpp"):
        out = local_attention(q, k, v, 3, backend=backend)
        w = math.exp(6.0) / (math.exp(6.0) + 8.0)
        assert out.item() == pytest.approx(5.0 * w, rel=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("ks,shape", [(3, (1, 2, 3, 4)), (5, (2, 3, 2, 3)), (1, (1, 2, 2, 2))])
def test_gradcheck(cpu_backends, backend, ks, shape):
    q, k, v, _ = _inputs(shape, scale=1.0)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: local_attention(a, b, c, ks, backend=backend), args)


def test_reference_backward_matches_autograd():
    q, k, v, g = _inputs((2, 3, 6, 7))
    out, lse = reference_forward(q, k, v, 5)
    got = reference_backward(g, q, k, v, lse, 5)
    want = _oracle(q, k, v, g, 5)
    assert torch.allclose(out, want[0], atol=1e-12)
    for a, b in zip(got, want[1:]):
        assert torch.allclose(a, b, atol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(cpu_backends, backend):
    q, k, v, _ = _inputs((2, 3, 5, 6), dtype=torch.float32, scale=1.0)
    args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), 3, backend)
    torch.library.opcheck(la_mod._la_fwd, args)
    out, lse = la_mod._la_fwd(q.detach(), k.detach(), v.detach(), 3, backend)
    torch.library.opcheck(
        la_mod._la_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), lse, 3, backend)
    )


def test_non_contiguous_inputs(cpu_backends):
    base = torch.randn(2, 9, 8, 6, dtype=torch.float64)
    q = base.permute(0, 3, 1, 2)  # B x 6 x 9 x 8, non-contiguous
    k = torch.randn(2, 6, 9, 16, dtype=torch.float64)[..., ::2]  # sliced view
    v = torch.randn(2, 9, 8, 6, dtype=torch.float64).transpose(1, 3).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    g = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    want = _oracle(q, k, v, g, 3)
    for backend in ("torch", "cpp"):
        got = _run(backend, q, k, v, g, 3)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-10)
    # a non-contiguous upstream gradient as well
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = local_attention(qq, kk, vv, 3, backend="cpp")
    gt = torch.randn(2, 6, 8, 9, dtype=torch.float64).transpose(2, 3)
    out.backward(gt)
    want = _oracle(q, k, v, gt.contiguous(), 3)
    assert torch.allclose(qq.grad, want[1], atol=1e-10)


def test_torch_compile_traces_through(cpu_backends):
    q, k, v, _ = _inputs((1, 4, 6, 7), dtype=torch.float32, scale=1.0)

    def f(a, b, c):
        return local_attention(a * 2, b, c, 3).sin().sum()

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = compiled(*args)
    got.backward()
    args2 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = f(*args2)
    want.backward()
    assert counter.frame_count == 1
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(args, args2):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4), 3), ValueError, "rank 4"),
        (
            lambda: (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 4), 3),
            ValueError,
            "same shape",
        ),
        (lambda: (torch.randn(1, 2, 4, 4),) * 3 + (4,), ValueError, "odd"),
        (lambda: (torch.randn(1, 2, 4, 4),) * 3 + (0,), ValueError, "odd"),
        (lambda: (torch.randn(1, 2, 4, 4),) * 3 + (3.0,), TypeError, "kernel_size must be an int"),
        (lambda: (torch.randn(1, 2, 4, 4).half(),) * 3 + (3,), TypeError, "bfloat16/float16 on CUDA only"),
        (lambda: (torch.randn(1, 2, 4, 4).bfloat16(),) * 3 + (3,), TypeError, "not supported on cpu"),
        (lambda: (torch.zeros(1, 2, 4, 4, dtype=torch.int64),) * 3 + (3,), TypeError, "not supported"),
        (
            lambda: (torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4).double(), torch.randn(1, 2, 4, 4), 3),
            TypeError,
            "same dtype",
        ),
        (
            lambda: (
                torch.randn(1, 2, 4, 4),
                torch.randn(1, 2, 4, 4, device="meta"),
                torch.randn(1, 2, 4, 4),
                3,
            ),
            ValueError,
            "same device",
        ),
    ],
)
def test_input_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        local_attention(*make())


def test_backend_errors():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        local_attention(x, x, x, 3, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        local_attention(x, x, x, 3, backend="cuda")


def test_set_backend_and_available(cpu_backends):
    assert {"torch", "cpp"} <= set(ops.available_backends())
    old = ops.get_backend()
    try:
        ops.set_backend("torch")
        x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
        a = local_attention(x, x, x, 3)
        ops.set_backend("cpp")
        b = local_attention(x, x, x, 3)
        assert torch.allclose(a, b, atol=1e-12)
    finally:
        ops.set_backend(old)


def test_missing_compiler_falls_back_with_one_warning(monkeypatch):
    def fail(kind, verbose=False):
        raise build.ExtensionBuildError("no C++ compiler found (simulated)")

    monkeypatch.setattr(build, "_build", fail)
    monkeypatch.setattr(build, "_cache", {})
    la_mod._switch.reset_warnings()
    q, k, v, _ = _inputs((1, 2, 4, 5))
    want = _oracle(q, k, v, torch.ones(1, 2, 4, 5, dtype=torch.float64), 3)[0]
    with pytest.warns(RuntimeWarning, match="slow PyTorch reference") as rec:
        out1 = local_attention(q, k, v, 3, backend="auto")
        out2 = local_attention(q, k, v, 3, backend="auto")
    assert len([w for w in rec if "slow PyTorch reference" in str(w.message)]) == 1
    assert torch.allclose(out1, want) and torch.allclose(out2, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_attention(q, k, v, 3, backend="auto")  # still no second warning
    # an explicit backend never falls back silently
    with pytest.raises(build.ExtensionBuildError, match="simulated"):
        local_attention(q, k, v, 3, backend="cpp")


def test_build_dir_outside_source_tree_and_keyed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.build_root() == tmp_path / "atrc_exp"
    key = build._build_key("cpp")
    assert len(key) == 16 and key == build._build_key("cpp")
    repo = build.KERNELS_DIR.parent
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert repo not in build.build_root().parents


def test_find_cuda_home_follows_wrapper(tmp_path, monkeypatch):
    real = tmp_path / "cuda-x" / "bin"
    real.mkdir(parents=True)
    (real / "nvcc").write_bytes(b"\x7fELF fake binary")
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real / "nvcc"} "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrap))
    assert build.find_cuda_home() == str(tmp_path / "cuda-x")


@pytest.mark.skipif(build.find_cuda_home() is None or shutil.which("g++") is None, reason="no nvcc")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Build-only check of the CUDA sources (no GPU needed): the float32 and bf16 kernel units
    (k = 9 and generic k) with nvcc, the binding/dispatch unit with the host compiler. About a
    minute the first time; cached per source hash afterwards."""
    res = compile_check_cuda(str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(build.find_cuda_home() is None or shutil.which("g++") is None, reason="no nvcc")
def test_cuda_sources_compile_with_nvcc_all_instantiations(tmp_path):
    res = compile_check_cuda(str(tmp_path), quick=False)
    assert res.returncode == 0, res.stderr[-4000:]


# ----------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("ks,shape", CASES + [(9, (2, 33, 20, 27))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_oracle(ks, shape, dtype):
    q, k, v, g = _inputs(shape, dtype, device="cuda")
    got = _run("cuda", q, k, v, g, ks)
    want = _oracle(q, k, v, g, ks)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, want):
        assert a.device.type == "cuda"
        err = (a.double().cpu() - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < tol


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    q, k, v, g = _inputs((2, 33, 13, 17), torch.float32, device="cuda", scale=1.0)
    got = _run("cuda", *(t.to(dtype) for t in (q, k, v, g)), 9)
    want = _oracle(q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype), 9)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        err = (a.double().cpu() - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < 3e-2


@pytest.mark.cuda
@needs_cuda
def test_cuda_gradcheck_and_opcheck():
    q, k, v, _ = _inputs((1, 2, 3, 4), device="cuda", scale=1.0)
    args = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: local_attention(a, b, c, 3, backend="cuda"), args)
    torch.library.opcheck(la_mod._la_fwd, (q.float(), k.float(), v.float(), 3, "cuda"))
