"""The search head: parameter count of the original, the freeze rule (decided on the device, no
host read in a training step), argmax in evaluation."""

from __future__ import annotations

import torch
from conftest import HostReads, compose_cfg

import atrc_exp
from atrc_exp.models.search_block import SearchCPBlock


def _search_model():
    return atrc_exp.build_model(compose_cfg(["dataset=nyud", "context=search", "mode=search"]))


def test_search_head_parameter_count_matches_original():
    model = _search_model()
    assert sum(p.numel() for p in model.parameters()) == 5_459_314
    blocks = model.head.atrc_module.cp_blocks
    assert blocks["semseg"]["semseg"].arch_param.numel() == 4  # none, global, local, t-label
    assert blocks["semseg"]["depth"].arch_param.numel() == 5  # + s-label
    assert set(model.head.aux_tasks) == {"semseg", "depth", "normals", "edge"}
    # value projections' BN is not affine in search
    for op in blocks["semseg"]["depth"].op_list:
        assert op.value_project.bn.affine is False


def _block():
    torch.manual_seed(0)
    return SearchCPBlock(False, 8, 4, kernel_size=3)


def test_freeze_fires_at_gap_and_never_unfreezes():
    blk = _block().train()
    t, s = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    prob = torch.softmax(torch.randn(2, 3, 30), -1)
    with torch.no_grad():
        blk.arch_param.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))  # softmax gap ≈ 0.26 < 0.3
    blk(t, s, prob, prob)
    assert not blk.is_frozen
    with torch.no_grad():
        blk.arch_param.copy_(torch.tensor([0.0, 0.0, 1.5, 0.0, 0.0]))  # gap ≈ 0.38 ≥ 0.3
    blk(t, s, prob, prob)
    assert blk.is_frozen and blk.choice() == 2
    with torch.no_grad():
        blk.arch_param.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0]))
    blk(t, s, prob, prob)
    assert blk.choice() == 2  # irreversible
    state = blk.state_dict()
    fresh = _block()
    fresh.load_state_dict(state)
    assert fresh.is_frozen and fresh.choice() == 2


def test_eval_uses_argmax_one_hot():
    blk = _block().eval()
    with torch.no_grad():
        blk.arch_param.copy_(torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0]))  # argmax = global, no freeze
    w = blk.op_weights()
    assert torch.equal(w, torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    t, s = torch.randn(1, 8, 5, 6), torch.randn(1, 8, 5, 6)
    out = blk(t, s)
    assert torch.allclose(out, blk.op_list[0](t, s))
    with torch.no_grad():
        blk.arch_param.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))  # none
    assert torch.count_nonzero(blk(t, s)) == 0


def test_search_model_genotype_is_argmax_per_pair():
    model = _search_model().eval()
    blk = model.head.atrc_module.cp_blocks["depth"]["edge"]
    with torch.no_grad():
        blk.arch_param.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2]))
    g = model.head.genotype
    assert g["depth"]["edge"] == 4 and g["semseg"]["semseg"] == 0


def test_original_search_weights_import_and_argmax_outputs_match():
    torch.manual_seed(0)
    src = _search_model().eval()
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith("arch_param"):
                p.copy_(torch.randn(p.shape))
    # the original's keys: arch_param and op_list.<i>.*, no freeze buffer while nothing is frozen
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert "head.atrc_module.cp_blocks.semseg.depth.op_list.3.value_project.conv.weight" in sd
    assert not any(k.endswith("fixed_weights") for k in sd)
    torch.manual_seed(1)
    dst = _search_model().eval()
    atrc_exp.load_original_state_dict(dst, {"state_dict": sd})
    assert dst.head.genotype == src.head.genotype
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        a, b = src(x), dst(x)
    for kind in a:
        for t in a[kind]:
            torch.testing.assert_close(a[kind][t], b[kind][t], rtol=0, atol=0)


def test_freeze_rule_decides_on_the_device_without_host_reads():
    """In training, op_weights/active_ops read nothing from the device: the freeze rule runs there.
    The host learns of a freeze at sync() (log steps, state dict, evaluation); the weights of a pair
    frozen on the device are its one-hot vector either way."""
    gaps = ([0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0])
    blocks = []
    for a in gaps:  # softmax top-two gap ≈0.26 (stays), ≈0.38 (freezes to 2), ≈0.52 (freezes to 3)
        b = _block().train()
        with torch.no_grad():
            b.arch_param.copy_(torch.tensor(a))
        blocks.append(b)
    with HostReads() as reads:
        ws = [b.op_weights() for b in blocks]
        active = [b.active_ops() for b in blocks]
    assert reads.reads == []
    assert active == [[0, 1, 2, 3]] * 3  # the host does not know yet: every op runs
    assert ws[1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0] and ws[2].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert 0 < ws[0].max() < 1 and abs(float(ws[0].sum()) - 1) < 1e-6  # Gumbel-softmax, not frozen
    assert [b.sync() for b in blocks] == [-1, 2, 3]
    assert [b.active_ops() for b in blocks] == [[0, 1, 2, 3], [1], [2]]  # now only the chosen op
    with HostReads() as reads:
        for b in blocks:
            b.op_weights()
    assert reads.reads == []  # a frozen pair known on the host: nothing read either
    with torch.no_grad():  # irreversible: α moving away changes nothing
        blocks[1].arch_param.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0]))
    assert blocks[1].op_weights().tolist() == [0.0, 0.0, 1.0, 0.0, 0.0] and blocks[1].choice() == 2


def test_a_search_training_step_reads_nothing_from_the_device():
    """A training forward and backward of the whole search network, every pair's freeze rule
    included, reads nothing on the host (with PyTorch's ops, the path a GPU runs)."""
    import atrc_exp.ops as la

    model = _search_model().train()
    mods = [la]
    for m in mods:
        m.set_backend("torch")
    try:
        x = torch.randn(1, 3, 64, 96)
        with HostReads() as reads:
            out = model(x)
            sum(v.float().mean() for kind in out.values() for v in kind.values()).backward()
    finally:
        for m in mods:
            m.set_backend("auto")
    assert reads.reads == []
    model.eval()
    model(torch.randn(1, 3, 64, 96))  # evaluation: argmax per pair
