"""The memory-lean search (``mode.recompute``: each target's row of mixtures under activation
checkpointing) computes what the plain search computes — outputs, gradients, batch-norm running
statistics updated once — and keeps far fewer activations; :func:`running_stats_kept` by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import randomise_head
from torch import nn

from atrc_exp.models.layers import running_stats_kept
from atrc_exp.models.relational_head import RelationalContextHead

NYUD = ["semseg", "depth", "normals", "edge"]
OUT = {"semseg": 5, "depth": 1, "normals": 3, "edge": 1}
AUX = {"semseg": 5, "depth": 6, "normals": 7, "edge": 2}

pytestmark = pytest.mark.usefixtures("one_thread", "torch_local_attention")


def _search_head() -> RelationalContextHead:
    torch.manual_seed(0)
    head = RelationalContextHead(32, NYUD, None, OUT, AUX, kernel_size=3).double()
    randomise_head(head)
    blocks = head.atrc_module.cp_blocks
    with torch.no_grad():
        blocks["depth"]["semseg"].arch_param.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]))  # freezes: local
        blocks["edge"]["normals"].arch_param.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0]))  # freezes: none
        blocks["normals"]["edge"].arch_param.copy_(torch.tensor([0.1, 0.3, -0.2, 0.0, 0.2]))
    return head.train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 6, 7, generator=g, dtype=torch.float64)
    image = torch.randn(2, 3, 12, 14, generator=g, dtype=torch.float64)
    image[1, :, :4, :] = 255  # ignored pixels in the label context
    return x, image


def _step(head: RelationalContextHead, recompute: bool):
    head.atrc_module.recompute = recompute
    x, image = _inputs()
    x.requires_grad_()
    torch.manual_seed(7)  # the Gumbel noise
    out = head(x, image=image)
    flat = {f"{k}/{t}": v for k, d in out.items() for t, v in d.items()}
    g = torch.Generator().manual_seed(3)
    sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in flat.values()).backward()
    grads = {n: p.grad for n, p in head.named_parameters() if p.grad is not None}
    grads["x"] = x.grad
    return flat, grads, dict(head.named_buffers())


def test_recompute_equals_the_plain_search():
    plain, lean = _search_head(), _search_head()
    before = {n: b.clone() for n, b in plain.named_buffers()}
    results = [_step(plain, False), _step(lean, True)]
    for name in ("outputs", "gradients", "buffers"):
        a, b = (r[("outputs", "gradients", "buffers").index(name)] for r in results)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-12, atol=1e-12), f"{name} {k}"
    grads, buffers = results[1][1], results[1][2]
    assert grads["atrc_module.cp_blocks.normals.edge.arch_param"].abs().sum() > 0
    assert grads["atrc_module.cp_blocks.semseg.depth.op_list.1.key_project.0.conv.weight"].abs().sum() > 0
    # the statistics moved, and every batch norm counted the step once (not twice)
    name = "atrc_module.cp_blocks.semseg.depth.op_list.1.key_project.0.bn"
    assert not torch.equal(buffers[f"{name}.running_mean"], before[f"{name}.running_mean"])
    assert all(int(b) == 1 for n, b in buffers.items() if n.endswith("num_batches_tracked"))
    blocks = lean.atrc_module.cp_blocks
    assert blocks["depth"]["semseg"].choice() == 2 and blocks["edge"]["normals"].choice() == 0


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_recompute_keeps_far_fewer_activations():
    sizes = {}
    for recompute in (False, True):
        head = _search_head()
        head.atrc_module.recompute = recompute
        x, image = _inputs()
        sizes[recompute] = _saved_bytes(lambda h=head, x=x, image=image: h(x.requires_grad_(), image=image))
    assert sizes[True] < 0.5 * sizes[False], sizes


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_kept(momentum):
    """Batch statistics as in training (the output by hand), running statistics and the counter
    left alone, the momentum restored."""
    bn = nn.BatchNorm2d(2, momentum=momentum).train()
    x = torch.arange(16, dtype=torch.float64).reshape(2, 2, 2, 2)
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
    bn.double()
    with running_stats_kept(nn.Sequential(bn)):
        y = bn(x)
    # channel 0 holds 0,1,2,3,8,9,10,11: mean 5.5, biased variance 138 / 8 = 17.25
    assert torch.allclose(y[0, 0, 0, 0], torch.tensor((0 - 5.5) / (17.25 + 1e-5) ** 0.5, dtype=torch.float64))
    assert torch.equal(bn.running_mean, torch.full((2,), 3.0, dtype=torch.float64))
    assert torch.equal(bn.running_var, torch.ones(2, dtype=torch.float64))
    assert int(bn.num_batches_tracked) == 0 and bn.momentum == momentum
    bn(x)  # outside: updated as usual
    assert int(bn.num_batches_tracked) == 1 and bn.running_mean[0] != 3.0
