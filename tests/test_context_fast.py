"""The ATRC head's batched evaluation and the memory-lean search give the numbers of the method
written block by block (``tests/reference_head.py``): outputs, gradients and batch-norm running
statistics, train and eval."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, paper_loss, randomise_head
from reference_head import reference_atrc_module, reference_head, reference_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import atrc_exp
from atrc_exp.models.layers import (
    ConvBNReLU,
    batch_norm_group,
    constant_vector,
    conv_bn_relu_group,
    frozen_bn_stats,
)
from atrc_exp.models.relational_head import RelationalContextHead, uniform_genotype

NYUD = ["semseg", "depth", "normals", "edge"]
NYUD18 = {
    "semseg": {"semseg": 3, "depth": 3, "normals": 4, "edge": 4},
    "depth": {"semseg": 4, "depth": 3, "normals": 4, "edge": 4},
    "normals": {"semseg": 4, "depth": 3, "normals": 3, "edge": 4},
    "edge": {"semseg": 3, "depth": 3, "normals": 1, "edge": 3},
}
# every code, a target without sources (edge), s-label and t-label from tasks with different K
MIXED = {
    "semseg": {"semseg": 1, "depth": 2, "normals": 3, "edge": 4},
    "depth": {"semseg": 4, "depth": 0, "normals": 2, "edge": 1},
    "normals": {"semseg": 2, "depth": 1, "normals": 4, "edge": 3},
    "edge": {"semseg": 0, "depth": 0, "normals": 0, "edge": 0},
}
OUT = {"semseg": 5, "depth": 1, "normals": 3, "edge": 1}
AUX = {"semseg": 5, "depth": 6, "normals": 7, "edge": 2}


pytestmark = pytest.mark.usefixtures("one_thread", "torch_local_attention")


_randomise = randomise_head


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """Equal up to float rounding, relative to the tensor's scale (at least 0.1: gradients that
    are analytically zero, e.g. of a bias in front of a batch norm, are rounding noise)."""
    assert a.shape == b.shape, what
    scale = max(a.abs().max().item(), 0.1)
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs diff {err:.3g} at scale {scale:.3g}"


def _step(module: nn.Module, batched: bool, inputs: tuple, seed: int = 7):
    """Forward (the module's, or ``reference_head`` block by block; seeded: dropout, Gumbel
    noise), a loss on every output, backward."""
    module.zero_grad(set_to_none=True)
    inputs = tuple(x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs)
    torch.manual_seed(seed)
    out = module(*inputs) if batched else reference_head(module, *inputs)
    flat = {f"{k}/{t}": v for k, d in out.items() for t, v in d.items()}
    if torch.is_grad_enabled():
        g = torch.Generator().manual_seed(3)
        loss = sum((v * torch.randn(v.shape, generator=g)).sum() for v in flat.values())
        loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": x.grad for i, x in enumerate(inputs) if x.grad is not None})
    return flat, grads, {n: b.clone() for n, b in module.named_buffers()}


def _compare(module: nn.Module, inputs: tuple, train: bool = True, rtol: float = 1e-5) -> None:
    plain = module.train(train)
    fused = copy.deepcopy(plain)
    out_p, grad_p, buf_p = _step(plain, False, inputs)
    out_f, grad_f, buf_f = _step(fused, True, inputs)
    assert out_p.keys() == out_f.keys()
    for k in out_p:
        _close(out_p[k], out_f[k], f"output {k}", rtol)
    assert grad_p.keys() == grad_f.keys()
    if train:  # the test would be vacuous if no CP block got a gradient
        assert any("cp_blocks" in n and g.abs().sum() > 0 for n, g in grad_p.items())
    for k in grad_p:  # gradients go through more products (and the global block's division)
        _close(grad_p[k], grad_f[k], f"grad {k}", 10 * rtol)
    assert buf_p.keys() == buf_f.keys()
    for k in buf_p:
        if buf_p[k].is_floating_point():
            _close(buf_p[k], buf_f[k], f"buffer {k}", rtol)
        else:
            assert torch.equal(buf_p[k], buf_f[k]), k


def _head(genotype, c_in: int = 32, seed: int = 0) -> RelationalContextHead:
    torch.manual_seed(seed)
    head = RelationalContextHead(c_in, NYUD, genotype, OUT, AUX, kernel_size=3)
    _randomise(head)
    return head


def _head_inputs(c_in: int = 32, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, h, w, generator=g)
    image = torch.randn(2, 3, 2 * h, 2 * w, generator=g)
    image[1, :, :4, :] = 255  # ignored pixels in the label context
    return x, image


# -- the grouped layers ---------------------------------------------------------------------------


def _bns(affine=(True, False, True), sizes=(3, 4, 5)):
    torch.manual_seed(0)
    bns = [nn.BatchNorm2d(c, affine=a) for c, a in zip(sizes, affine)]
    with torch.no_grad():
        for b in bns:
            b.running_mean.normal_()
            b.running_var.uniform_(0.5, 2.0)
            if b.affine:
                b.weight.uniform_(0.5, 1.5)
                b.bias.normal_()
    return bns


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_group_equals_modules(train):
    plain = _bns()
    grouped = copy.deepcopy(plain)
    for b in plain + grouped:
        b.train(train)
    x = torch.randn(2, 12, 5, 6) * 3 + 1
    xp, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_p = torch.cat([b(part) for b, part in zip(plain, xp.split([3, 4, 5], dim=1))], dim=1)
    y_g = batch_norm_group(xg, grouped)
    _close(y_p, y_g, "output")
    g = torch.randn_like(y_p)
    y_p.backward(g)
    y_g.backward(g)
    _close(xp.grad, xg.grad, "input grad")
    for bp, bg in zip(plain, grouped):
        if bp.affine:
            _close(bp.weight.grad, bg.weight.grad, "weight grad")
            _close(bp.bias.grad, bg.bias.grad, "bias grad")
        _close(bp.running_mean, bg.running_mean, "running mean")
        _close(bp.running_var, bg.running_var, "running var")
        assert int(bp.num_batches_tracked) == int(bg.num_batches_tracked) == int(train)
    if train:  # the running statistics did move
        assert not torch.allclose(plain[0].running_mean, _bns()[0].running_mean)
    # the non-affine module's weight and bias stand-ins are shared constants, left as they were
    ones, zeros = constant_vector(1.0, 4, x), constant_vector(0.0, 4, x)
    assert torch.equal(ones, torch.ones(4)) and torch.equal(zeros, torch.zeros(4))
    assert ones is constant_vector(1.0, 4, x) and not ones.requires_grad


def test_batch_norm_group_frozen_stats_and_fallbacks():
    x = torch.randn(2, 12, 5, 6) * 3 + 1
    ref = batch_norm_group(x, _bns())
    # frozen: batch statistics, the same output, nothing updated
    bns = _bns()
    with frozen_bn_stats():
        y = batch_norm_group(x, bns)
    _close(ref, y, "frozen output")
    for b, fresh in zip(bns, _bns()):
        assert torch.equal(b.running_mean, fresh.running_mean) and int(b.num_batches_tracked) == 0
    # cumulative averages (momentum None) and BN subclasses (SyncBatchNorm) go module by module
    for make in (lambda c, a: nn.BatchNorm2d(c, affine=a, momentum=None), _SubBN):
        torch.manual_seed(0)
        plain = [make(c, a) for c, a in ((3, True), (4, False))]
        grouped = copy.deepcopy(plain)
        xs = torch.randn(2, 7, 4, 4)
        y_p = torch.cat([b(p) for b, p in zip(plain, xs.split([3, 4], 1))], 1)
        _close(y_p, batch_norm_group(xs, grouped), "fallback output")
        for bp, bg in zip(plain, grouped):
            _close(bp.running_var, bg.running_var, "fallback running var")
        before = [b.running_mean.clone() for b in grouped]
        with frozen_bn_stats():
            batch_norm_group(xs, grouped)
        assert all(torch.equal(b.running_mean, m) for b, m in zip(grouped, before))
        assert all(int(b.num_batches_tracked) == 1 for b in grouped)


class _SubBN(nn.BatchNorm2d):
    """Stands in for SyncBatchNorm: not a plain BatchNorm2d, so it is called as a module."""

    def __init__(self, c, affine):
        super().__init__(c, affine=affine)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_conv_bn_relu_group_equals_layers_and_gradients_split():
    torch.manual_seed(0)
    layers = [ConvBNReLU(6, 3, 1), ConvBNReLU(6, 4, 1, affine=False)]
    fused = copy.deepcopy(layers)
    x = torch.randn(2, 6, 5, 5)
    y_p = torch.cat([m(x) for m in layers], 1)
    y_f = conv_bn_relu_group(x, fused)
    _close(y_p, y_f, "output")
    y_p.square().sum().backward()
    y_f.square().sum().backward()
    for mp, mf in zip(layers, fused):
        _close(mp.conv.weight.grad, mf.conv.weight.grad, "conv weight grad")
        assert mf.conv.weight.grad.shape == mf.conv.weight.shape
    with pytest.raises(ValueError, match="mix"):
        conv_bn_relu_group(x, [ConvBNReLU(6, 3, 1), ConvBNReLU(6, 3, 1, relu=False)])


# -- the head -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "genotype",
    [NYUD18, MIXED, "global", "local", "tlabel", "slabel"],
    ids=["nyud18", "mixed", "global", "local", "tlabel", "slabel"],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_head_equals_block_by_block(genotype, train):
    g = uniform_genotype(NYUD, genotype) if isinstance(genotype, str) else genotype
    head = _head(g)
    _compare(head, _head_inputs(), train=train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_head_batches_equal_aux_logits(train):
    """Aux logits of equal width (NYUD: semseg, depth and normals all 40) run as one batched
    product on the grouped aux features: same outputs, gradients and buffers, fewer convs."""
    aux_eq = {"semseg": 5, "depth": 5, "normals": 5, "edge": 2}
    torch.manual_seed(0)
    head = RelationalContextHead(32, NYUD, NYUD18, OUT, aux_eq, kernel_size=3)
    _randomise(head)
    _compare(head, _head_inputs(), train=train)
    import atrc_exp.models.relational_head as rh

    x, image = _head_inputs()
    counts = []
    for blockwise in (rh.pointwise_runs, lambda y, convs: [c(p) for c, p in zip(convs, y.split(32, 1))]):
        with pytest.MonkeyPatch.context() as mp, _CountConvs() as c, torch.no_grad():
            mp.setattr(rh, "pointwise_runs", blockwise)
            head(x, image=image)
        counts.append(c.n)
    assert counts[0] == counts[1] - 3  # the 3 equal aux logits convs are one matrix product


def test_head_channels_last_and_no_grad():
    head = _head(MIXED).to(memory_format=torch.channels_last)
    x, image = _head_inputs()
    # mkldnn picks other kernels for NHWC: a little more rounding
    _compare(head, (x.to(memory_format=torch.channels_last), image), rtol=1e-4)
    with torch.no_grad():
        _compare(head.eval(), (x, image), train=False)


class _CountConvs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_head_batches_the_projections():
    """NYUD HRNet18 genotype: the 16 blocks' first query layers run as 4 convolutions (one per
    target), the 4 aux heads as one, label contexts shared by several blocks once."""
    head = _head(NYUD18).train()
    x, image = _head_inputs()
    counts = {}
    for batched in (False, True):
        with _CountConvs() as c, torch.no_grad():
            head(x, image=image) if batched else reference_head(head, x, image)
        counts[batched] = c.n
    # block by block: 4 bottlenecks + 4×2 aux + per block 5 convs + 4×(out_proj, bottleneck) +
    # 4 final = 4 + 8 + 16·5 + 8 + 4
    assert counts[False] == 104
    # batched: 1 (the 4 task bottlenecks) + (1 + 4) aux + 4 query groups + one key/value
    # convolution per distinct key input (the global block's source features, 8 label contexts
    # for 15 label blocks) + 4 final; the second query and key layers, the 4 out_proj and the 4
    # ATRC bottlenecks are batched matrix products, not convolutions
    assert counts[True] == 1 + 5 + 4 + 1 + 8 + 4


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fcn_head_equals_task_by_task(train):
    """The baseline head: its task bottlenecks (3×3 ConvBNReLU, all reading x) as one convolution."""
    from atrc_exp.models.heads import MultiTaskFCNHead

    torch.manual_seed(0)
    head = MultiTaskFCNHead(32, OUT)
    _randomise(head)
    head.train(train)
    x, _ = _head_inputs()
    plain, fused = _step(copy.deepcopy(head), False, (x,)), _step(head, True, (x,))
    for p_, f_ in zip(plain, fused):
        assert p_.keys() == f_.keys()
        for k in p_:
            _close(p_[k].double(), f_[k].double(), k, 1e-4)
    if train:
        assert fused[1]["bottleneck.semseg.conv.weight"].abs().sum() > 0
        assert fused[2]["bottleneck.edge.bn.running_mean"].abs().sum() > 0  # updated, in its own buffer
    with _CountConvs() as c, torch.no_grad():
        head(x)
    assert c.n == 1 + 4  # one bottleneck conv, four final logits


# -- the search head ---------------------------------------------------------------------------------


def _search_head(seed: int = 0) -> RelationalContextHead:
    head = _head(None, seed=seed)
    blocks = head.atrc_module.cp_blocks
    with torch.no_grad():
        blocks["depth"]["semseg"].arch_param.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]))  # freezes: local
        blocks["edge"]["normals"].arch_param.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]))  # freezes: none
        blocks["normals"]["edge"].arch_param.copy_(torch.tensor([0.1, 0.3, -0.2, 0.0, 0.2]))
    return head


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lean_search_equals_block_by_block(train):
    head = _search_head()
    head.atrc_module.recompute = True
    _compare(head, _head_inputs(), train=train)
    if train:
        blocks = head.atrc_module.cp_blocks
        assert blocks["depth"]["semseg"].choice() == 2 and blocks["edge"]["normals"].choice() == 0


def test_search_without_recompute_equals_block_by_block():
    head = _search_head()
    head.atrc_module.recompute = False
    _compare(head, _head_inputs())


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_lean_search_keeps_far_fewer_activations():
    head = _search_head().train()
    mod = head.atrc_module
    g = torch.Generator().manual_seed(0)
    feats = {t: torch.randn(2, 8, 9, 10, generator=g, requires_grad=True) for t in NYUD}
    probs = {t: torch.softmax(torch.randn(2, AUX[t], 90, generator=g), -1).requires_grad_() for t in NYUD}
    sizes = {}
    for mode in ("plain", "batched", "lean"):
        mod.recompute = mode == "lean"
        torch.manual_seed(0)
        run = (
            (lambda: reference_atrc_module(mod, feats, probs))
            if mode == "plain"
            else (lambda: mod(feats, probs))
        )
        sizes[mode], out = _saved_bytes(run)
        sum(v.sum() for v in out.values()).backward()  # the recomputation runs without error
    # batched keeps the concatenated weights of its grouped convolutions as well: a few percent at
    # this tiny size (9×10 maps), nothing at real ones
    assert sizes["batched"] <= sizes["plain"] * 1.15
    assert sizes["lean"] < 0.5 * sizes["plain"], sizes


# -- the whole network and loss ----------------------------------------------------------------------


def test_full_model_training_step_equals_block_by_block():
    torch.manual_seed(0)
    cfg = compose_cfg(["dataset=nyud", "context=atrc", "context.genotype=genotypes/nyud_hrnet18.json"])
    model = atrc_exp.build_model(cfg)
    _randomise(model.head)
    criterion = paper_loss(NYUD, 0.8, F.normalize(torch.randn(40, 3), dim=1))
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 64, 80
    image = torch.randn(B, 3, H, W, generator=g)
    targets = {
        "semseg": torch.randint(0, 40, (B, 1, H, W), generator=g),
        "depth": torch.rand(B, 1, H, W, generator=g) * 5 + 0.5,
        "normals": F.normalize(torch.randn(B, 3, H, W, generator=g), dim=1),
        "edge": (torch.rand(B, 1, H, W, generator=g) > 0.8).float(),
    }
    results = []
    for batched in (False, True):
        m = copy.deepcopy(model).train()
        torch.manual_seed(1)
        loss, _ = criterion(m(image) if batched else reference_model(m, image), targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    (lp, gp), (lf, gf) = results
    _close(lp, lf, "loss")
    assert gp["head.atrc_module.cp_blocks.edge.normals.query_project.0.conv.weight"].abs().sum() > 0
    for n in gp:
        _close(gp[n], gf[n], f"grad {n}", rtol=1e-4)
