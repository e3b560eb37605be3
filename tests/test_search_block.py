"""The search head: parameter count of the original, freeze rule, argmax in evaluation."""

from __future__ import annotations

import torch
from conftest import compose_cfg

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
        assert op.value_project[1].affine is False


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
    # the original's keys: arch_param and op_list.<i>.*, no freeze buffer
    sd = {k: v.clone() for k, v in src.state_dict().items() if not k.endswith("frozen_choice")}
    assert "head.atrc_module.cp_blocks.semseg.depth.op_list.3.value_project.0.weight" in sd
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
