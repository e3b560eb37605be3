"""The search head: parameter count of the original, freeze rule (also batched, with one device
read per training forward), argmax in evaluation."""

from __future__ import annotations

import torch
from conftest import compose_cfg

import atrc_exp
from atrc_exp.models import search_block
from atrc_exp.models.search_block import SearchCPBlock, check_freeze


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


def _count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts tensor-to-host reads (each one synchronises a GPU) while ``n["on"]`` is true."""
    n = {"on": False, "reads": 0}
    for name in ("__int__", "__float__", "__bool__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, real=real, **k):
            if n["on"]:
                n["reads"] += 1
            return real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return n


def test_check_freeze_decides_like_each_block_with_one_read(monkeypatch):
    """check_freeze over many blocks: one host read in all, the same freezes as each block's own
    check, and the blocks' op_weights/active_ops then read nothing until α changes."""
    gaps = ([0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0])
    mine, own = [], []
    for a in gaps:  # ≈0.26 (stays), ≈0.38 (freezes to 2), ≈0.52 (freezes to 3)
        for dst in (mine, own):
            b = _block().train()
            with torch.no_grad():
                b.arch_param.copy_(torch.tensor(a))
            dst.append(b)
    n = _count_host_reads(monkeypatch)
    n["on"] = True
    check_freeze(mine)
    assert n["reads"] == 1
    ws = [b.op_weights() for b in mine]
    active = [b.active_ops() for b in mine]
    assert n["reads"] == 1  # nothing more read
    n["on"] = False
    for b, w, act, ref in zip(mine, ws, active, own):
        w_ref = ref.op_weights()
        assert b.is_frozen == ref.is_frozen and act == ref.active_ops()
        if b.is_frozen:
            assert b.choice() == ref.choice() and int(b.fixed_weights.argmax()) == b.choice()
            assert torch.equal(w, w_ref)
    assert [b.choice() for b in mine[1:]] == [2, 3] and not mine[0].is_frozen
    n["on"] = True
    check_freeze(mine)  # only the unfrozen block is looked at: still one read
    assert n["reads"] == 2
    with torch.no_grad():
        mine[0].arch_param.add_(torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0]))  # α changed: its own check
    mine[0].op_weights()
    assert n["reads"] == 4 and mine[0].is_frozen and mine[0].choice() == 2  # gap and argmax read


def test_a_search_training_forward_checks_the_freeze_rule_once(monkeypatch):
    """In the search head's training forward the pairs' op_weights/active_ops read nothing from
    the device: check_freeze runs once for all 16 pairs."""
    model = _search_model().train()
    calls = []
    real = search_block.check_freeze
    monkeypatch.setattr(
        "atrc_exp.models.relational_head.check_freeze",
        lambda blocks: calls.append(len(blocks)) or real(blocks),
    )
    n = _count_host_reads(monkeypatch)
    for name in ("op_weights", "active_ops"):
        method = getattr(SearchCPBlock, name)

        def watched(self, method=method):
            n["on"] = True
            try:
                return method(self)
            finally:
                n["on"] = False

        monkeypatch.setattr(SearchCPBlock, name, watched)
    model(torch.randn(1, 3, 64, 96))
    assert calls == [16] and n["reads"] == 0
    model.eval()
    model(torch.randn(1, 3, 64, 96))  # evaluation: argmax per pair, no check
    assert calls == [16]
