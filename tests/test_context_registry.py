"""Context types are one table (``context_blocks.CONTEXTS``): every row is wired to its block class
and config file, and a new row (one class, one row) reaches the genotype files, the heads, the
search's candidates, the aux heads and the plots without touching anything else."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, compose_cfg, randomise_head

import atrc_exp
from atrc_exp.config import ConfigError
from atrc_exp.models import context_blocks as cb
from atrc_exp.models.genotype import genotype_heatmap, genotype_table_rows, load_genotype
from atrc_exp.models.relational_head import RelationalContextHead, aux_tasks_of, uniform_genotype
from atrc_exp.models.search_block import SearchCPBlock

NYUD = ["semseg", "depth", "normals", "edge"]
OUT = {"semseg": 5, "depth": 1, "normals": 3, "edge": 1}
AUX = {"semseg": 5, "depth": 6, "normals": 7, "edge": 2}

pytestmark = pytest.mark.usefixtures("one_thread", "torch_local_attention")


def test_the_table_holds_the_original_codes():
    """The original's genotype codes: 0 none, 1 global, 2 local, 3 t-label, 4 s-label."""
    assert [(c.code, c.name, c.display) for c in cb.CONTEXTS] == [
        (0, "none", "none"),
        (1, "global", "global"),
        (2, "local", "local"),
        (3, "tlabel", "t-label"),
        (4, "slabel", "s-label"),
    ]
    assert [c.reads_aux for c in cb.CONTEXTS] == [None, None, None, "target", "source"]
    # the search offers s-label only off the diagonal (there it is t-label), as the original
    assert SearchCPBlock(True, 8, 4).codes == [1, 2, 3]
    assert SearchCPBlock(False, 8, 4).codes == [1, 2, 3, 4]


@pytest.mark.parametrize("spec", [c for c in cb.CONTEXTS if c.block is not None], ids=lambda c: c.name)
def test_every_row_has_its_config_and_builds_its_block(spec):
    conf = REPO / "conf" / "context" / f"{spec.name}.yaml"
    assert conf.is_file(), f"conf/context/{spec.name}.yaml is missing"
    model = atrc_exp.build_model(compose_cfg(["backbone.pretrained=false", f"context={spec.name}"]))
    blocks = [b for row in model.head.atrc_module.cp_blocks.values() for b in row.values()]
    assert blocks and all(type(b) is spec.block and b.reads_aux == spec.reads_aux for b in blocks)


def test_an_unknown_context_lists_the_table():
    with pytest.raises(ConfigError, match="0 none, 1 global, 2 local, 3 tlabel, 4 slabel"):
        cb.context_spec("ring")
    with pytest.raises(ConfigError, match="unknown context 'ring'.*0 none, 1 global"):
        atrc_exp.build_model(compose_cfg(["context=global", "context.name=ring"]))


class _PooledContextBlock(torch.nn.Module):
    """A toy context type written from scratch (any module with the CP block's forward): the
    source's features pooled under its auxiliary prediction, gated per pixel by the target."""

    def __init__(self, in_channels, out_channels, last_affine=True, **kwargs):
        super().__init__()
        self.query = torch.nn.Conv2d(in_channels, out_channels, 1)
        self.value = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, target_feats, source_feats, target_prob=None, source_prob=None):
        w = source_prob.mean(1)  # B×N, sums to 1 over the pixels
        pooled = torch.einsum("bn,bcn->bc", w, source_feats.flatten(2))[..., None, None]
        return torch.sigmoid(self.query(target_feats)) * self.value(pooled)


@pytest.fixture
def pooled_context():
    """One more row, as a user adding a context type writes it (removed afterwards)."""
    spec = cb.ContextSpec(
        5, "pooled", _PooledContextBlock, reads_aux="source", display="pooled", colour=(9, 9, 9)
    )
    cb.CONTEXTS.append(spec)
    try:
        yield spec
    finally:
        cb.CONTEXTS.remove(spec)


def test_a_new_row_reaches_every_part(pooled_context, tmp_path):
    # genotype files: code 5 is valid, shown by its display name
    data = {t: {s: 5 if (t, s) == ("semseg", "depth") else 1 for s in NYUD} for t in NYUD}
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"data": data, "step": 0}))
    g = load_genotype(path, NYUD)
    assert g["semseg"]["depth"] == 5
    assert ["semseg", "depth", "pooled", 5] in genotype_table_rows(g, NYUD)
    assert genotype_heatmap(g, NYUD).shape[-1] == 3
    # aux heads: the row's reads_aux (the source, depth)
    assert aux_tasks_of(g, NYUD) == ["depth"]
    # the head builds the block, runs it on the source's aux prediction, and it learns
    torch.manual_seed(0)
    head = RelationalContextHead(32, NYUD, uniform_genotype(NYUD, "pooled"), OUT, AUX, kernel_size=3).train()
    assert isinstance(head.atrc_module.cp_blocks["edge"]["normals"], _PooledContextBlock)
    randomise_head(head)
    out = head(torch.randn(2, 32, 6, 7))
    assert out["aux"].keys() == set(NYUD) and out["final"]["semseg"].shape == (2, 5, 6, 7)
    sum(v.sum() for d in out.values() for v in d.values()).backward()
    assert head.atrc_module.cp_blocks["semseg"]["depth"].value.weight.grad.abs().sum() > 0
    # the search offers it (and mixes it) wherever its row says
    blk = SearchCPBlock(False, 8, 4)
    assert blk.codes == [1, 2, 3, 4, 5] and blk.arch_param.numel() == 6
    assert isinstance(blk.op_list[4], _PooledContextBlock)
    f, prob = torch.randn(2, 8, 3, 4), torch.softmax(torch.randn(2, 5, 12), -1)
    assert blk.train()(f, f, prob, prob).shape == (2, 4, 3, 4)
