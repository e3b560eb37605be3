"""Relational context: CP blocks, the ATRC head, genotypes, parameter counts, original-weight import."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_cfg, paper_loss

import atrc_exp
from atrc_exp.config import ConfigError
from atrc_exp.models.context_blocks import (
    GlobalContextBlock,
    LocalContextBlock,
    ignore_mask,
    make_cp_block,
    spatial_softmax,
)
from atrc_exp.models.genotype import (
    GENOTYPE_TABLE_COLUMNS,
    genotype_heatmap,
    genotype_table_rows,
    load_genotype,
    save_genotype,
)
from atrc_exp.models.relational_head import RelationalContextHead, aux_tasks_of, uniform_genotype

NYUD = ["semseg", "depth", "normals", "edge"]
PASCAL = ["semseg", "human_parts", "sal", "normals", "edge"]
GENO = {
    "nyud_hrnet18": ("dataset=nyud", "backbone=hrnet18", NYUD),
    "nyud_hrnet48": ("dataset=nyud", "backbone=hrnet48", NYUD),
    "pascal_hrnet18": ("dataset=pascal_context", "backbone=hrnet18", PASCAL),
}


pytestmark = pytest.mark.usefixtures("one_thread", "torch_local_attention")


def _overrides(context: str, dataset: str = "dataset=nyud", backbone: str = "backbone=hrnet18") -> list[str]:
    if context in GENO:
        dataset, backbone, _ = GENO[context]
        return [dataset, backbone, "context=atrc", f"context.genotype=genotypes/{context}.json"]
    return [dataset, backbone, f"context={context}"]


def _build(overrides, meta: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = compose_cfg(overrides)
    if meta:
        with torch.device("meta"):
            return atrc_exp.build_model(cfg)
    return atrc_exp.build_model(cfg)


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "context,expected",
    [
        ("none", 4_515_556),
        ("global", 4_734_172),
        ("local", 4_734_172),
        ("tlabel", 5_060_994),
        ("slabel", 5_060_994),
        ("nyud_hrnet18", 5_060_994),
        ("pascal_hrnet18", 5_383_142),
        ("nyud_hrnet48", 72_478_947),
    ],
)
def test_parameter_counts_match_original(context, expected):
    assert _count(_build(_overrides(context), meta=True)) == expected


# ------------------------------------------------------------------------------- shapes, aux presence


def _expected_aux(context: str) -> set[str]:
    if context in ("global", "local"):
        return set()
    if context in ("tlabel", "slabel", "nyud_hrnet18"):
        return set(NYUD)
    if context == "nyud_hrnet48":
        return {"semseg", "edge"}  # t-label in semseg's and edge's rows, s-label from semseg and edge
    raise AssertionError(context)


@pytest.mark.parametrize("context", ["global", "local", "tlabel", "slabel", "nyud_hrnet18"])
def test_outputs_at_odd_size_train_and_eval(context):
    ov = _overrides(context)
    if context == "nyud_hrnet48":  # the HRNet48 genotype on the small backbone: no HRNet48 forward here
        ov = [o if o != "backbone=hrnet48" else "backbone=hrnet18" for o in ov]
    model = _build(ov)
    aux = _expected_aux(context)
    x = torch.randn(1, 3, 97, 131)
    for train in (True, False):
        model.train(train)
        with torch.set_grad_enabled(train):
            out = model(x)
        assert set(out) == ({"final", "aux"} if aux else {"final"})
        assert {t: v.shape[1] for t, v in out["final"].items()} == {
            "semseg": 40,
            "depth": 1,
            "normals": 3,
            "edge": 1,
        }
        if aux:
            assert set(out["aux"]) == aux
            chans = {"semseg": 40, "depth": 40, "normals": 40, "edge": 2}
            assert all(v.shape[1] == chans[t] for t, v in out["aux"].items())
        for kind in out.values():
            for v in kind.values():
                assert v.shape[0] == 1 and v.shape[-2:] == (97, 131)
                assert torch.isfinite(v).all()


def test_pascal_atrc_outputs_and_missing_pair_has_no_block():
    model = _build(_overrides("pascal_hrnet18")).eval()
    assert "normals" not in model.head.atrc_module.cp_blocks["semseg"]  # semseg <- normals is 0
    assert set(model.head.aux_tasks) == set(PASCAL)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 71))
    assert out["final"]["human_parts"].shape == (1, 7, 65, 71)
    assert out["aux"]["sal"].shape == (1, 2, 65, 71)


def test_aux_heads_only_where_needed():
    g = {t: {s: 1 for s in NYUD} for t in NYUD}
    assert aux_tasks_of(g, NYUD) == []
    g["depth"]["edge"] = 3  # t-label: the target needs its aux prediction
    assert aux_tasks_of(g, NYUD) == ["depth"]
    g["semseg"]["normals"] = 4  # s-label: the source needs its aux prediction
    assert aux_tasks_of(g, NYUD) == ["depth", "normals"]
    g["semseg"]["normals"] = 0
    g["semseg"]["semseg"] = 0
    head = RelationalContextHead(40, NYUD, g, dict.fromkeys(NYUD, 1), dict.fromkeys(NYUD, 2))
    assert list(head.aux_conv) == ["depth"] and list(head.aux_logits) == ["depth"]


def test_target_without_sources_uses_plain_bottleneck():
    g = {t: {s: (0 if t == "edge" else 1) for s in NYUD} for t in NYUD}
    head = RelationalContextHead(40, NYUD, g, dict.fromkeys(NYUD, 1), dict.fromkeys(NYUD, 2)).eval()
    assert "edge" not in head.atrc_module.out_proj
    assert head.atrc_module.bottleneck["edge"][0].conv.in_channels == 10
    assert head.atrc_module.bottleneck["semseg"][0].conv.in_channels == 20
    out = head(torch.randn(1, 40, 9, 11))
    assert out["final"]["edge"].shape == (1, 1, 9, 11) and "aux" not in out


# ------------------------------------------------------------------------------------------- init


def test_init_out_proj_zero_so_context_has_no_effect_at_init():
    head = RelationalContextHead(
        48, NYUD, uniform_genotype(NYUD, "global"), dict.fromkeys(NYUD, 3), {}
    ).eval()
    mod = head.atrc_module
    for t in NYUD:
        bn = mod.out_proj[t].bn
        assert torch.count_nonzero(bn.weight) == 0 and torch.count_nonzero(bn.bias) == 0
    for name, m in head.named_modules():
        if "logits" in name and isinstance(m, torch.nn.Conv2d):
            assert torch.count_nonzero(m.bias) == 0 and m.weight.std() < 0.05
    # at init the projection is 0, so each target's output is its bottleneck on [features_t, 0]:
    # independent of the other tasks' features (but not the no-context path, whose conv is C -> C)
    feats = {t: torch.randn(2, 12, 5, 7) for t in NYUD}
    out = mod(feats)
    bott = mod.bottleneck["depth"][0]
    w = bott.conv.weight[:, :12]
    ref = F.relu(bott.bn(F.conv2d(feats["depth"], w)))
    torch.testing.assert_close(out["depth"], ref)
    feats2 = dict(feats, semseg=torch.randn(2, 12, 5, 7))
    torch.testing.assert_close(mod(feats2)["depth"], out["depth"])
    # gradients still reach the CP blocks' projection through the BN weight
    mod.train()
    mod(feats)["depth"].sum().backward()
    assert mod.out_proj["depth"].bn.weight.grad.abs().sum() > 0


def test_cp_block_layer_order_and_init():
    blk = GlobalContextBlock(12, 6)
    names = [n for n, _ in blk.named_parameters()]
    assert names[:2] == ["query_project.0.conv.weight", "query_project.0.bn.weight"]
    assert [n.split(".")[0] for n in names] == ["query_project"] * 6 + ["key_project"] * 6 + [
        "value_project"
    ] * 3
    assert isinstance(blk.query_project[2], torch.nn.Softplus) and not blk.query_project[1].relu  # ConvBN
    # value BN not affine in search
    s = make_cp_block("local", 12, 6, last_affine=False)
    assert not s.value_project.bn.affine and s.query_project[1].bn.affine
    assert sum(p.numel() for p in s.value_project.parameters()) == 12 * 6
    # xavier-uniform bound
    w = blk.key_project[0].conv.weight
    assert w.abs().max() <= math.sqrt(6 / (12 + 6)) + 1e-6


# --------------------------------------------------------------------------------- CP block maths


def test_global_block_is_linear_attention():
    torch.manual_seed(0)
    blk = GlobalContextBlock(8, 4).eval()
    ft, fs = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    q = blk.query_project(ft).flatten(2)
    k = blk.key_project(fs).flatten(2)
    v = blk.value_project(fs).flatten(2)
    ref = (
        torch.einsum("bcm,bdm,bdn->bcn", v, k, q)
        / torch.einsum("bdm,bdn->bn", k, q).clamp_min(1e-12)[:, None]
    )
    torch.testing.assert_close(blk(ft, fs), ref.view(2, 4, 5, 6))


def test_local_block_zero_padded_window_softmax():
    torch.manual_seed(0)
    blk = LocalContextBlock(8, 4, kernel_size=3).eval()
    ft, fs = torch.randn(1, 8, 4, 5), torch.randn(1, 8, 4, 5)
    q, k, v = blk.query_project(ft), blk.key_project(fs), blk.value_project(fs)
    ku = F.unfold(k, 3, padding=1).view(1, 4, 9, 20)  # zero keys outside the image
    vu = F.unfold(v, 3, padding=1).view(1, 4, 9, 20)
    a = ((q.view(1, 4, 1, 20) * ku).sum(1) / 2.0).softmax(1)  # 1/sqrt(4); padded positions stay
    ref = (a[:, None] * vu).sum(2).view(1, 4, 4, 5)
    torch.testing.assert_close(blk(ft, fs), ref)


@pytest.mark.parametrize("context_type", ["tlabel", "slabel"])
def test_label_block_attends_over_class_context(context_type):
    torch.manual_seed(0)
    blk = make_cp_block(context_type, 8, 4).eval()
    ft, fs = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    pt, ps = spatial_softmax(torch.randn(2, 3, 5, 6)), spatial_softmax(torch.randn(2, 7, 5, 6))
    p = pt if context_type == "tlabel" else ps
    ctx = torch.einsum("bkn,bcn->bck", p, fs.flatten(2)).unsqueeze(3)
    q = blk.query_project(ft).flatten(2)
    k, v = blk.key_project(ctx).flatten(2), blk.value_project(ctx).flatten(2)
    a = (torch.einsum("bdn,bdk->bnk", q, k) / 2.0).softmax(-1)
    ref = torch.einsum("bnk,bdk->bdn", a, v).view(2, 4, 5, 6)
    torch.testing.assert_close(blk(ft, fs, target_prob=pt, source_prob=ps), ref)
    with pytest.raises(ValueError, match="auxiliary prediction"):
        blk(ft, fs)


def test_spatial_softmax_excludes_255_pixels():
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    image = torch.zeros(2, 3, 8, 10)
    image[0, 1, :4] = 255  # top half of image 0 excluded (nearest-resized to 4×5)
    image[1] = 255  # image 1 entirely excluded
    p = spatial_softmax(logits, image)
    assert p.shape == (2, 3, 20)
    torch.testing.assert_close(p[0].sum(1), torch.ones(3))
    assert torch.all(p[0, :, :10] == 0)
    assert torch.all(p[1] == 0)
    torch.testing.assert_close(p[0, :, 10:], logits[0].flatten(1)[:, 10:].softmax(1))
    (p * torch.randn_like(p)).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[1] == 0)


def test_ignore_mask_once_for_all_aux_maps_gives_the_same_probabilities():
    """The head computes the ignore mask once (all False when the image has no 255 pixel: the
    plain softmax); the probabilities equal spatial_softmax's own per-map masking."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, k, 4, 5, generator=g) for k in (3, 7)]
    clean = torch.randn(2, 3, 8, 10, generator=g)
    assert not ignore_mask(clean, (4, 5)).any()
    dirty = clean.clone()
    dirty[0, 2, 2:6] = 255
    dirty[1] = 255
    mask = ignore_mask(dirty, (4, 5))
    assert mask.shape == (2, 1, 20) and mask[1].all() and mask[0].any() and not mask[0].all()
    for image, m in ((clean, ignore_mask(clean, (4, 5))), (dirty, mask)):
        for a in logits:
            torch.testing.assert_close(spatial_softmax(a, mask=m), spatial_softmax(a, image), rtol=0, atol=0)
    torch.testing.assert_close(
        spatial_softmax(logits[0], clean), logits[0].flatten(2).softmax(2), rtol=0, atol=1e-7
    )
    torch.testing.assert_close(spatial_softmax(logits[0], mask=None), logits[0].flatten(2).softmax(2))


# ------------------------------------------------------------------------------------------ genotypes


@pytest.mark.parametrize("name", list(GENO))
def test_published_genotypes_load_for_their_tasks(name):
    tasks = GENO[name][2]
    g = load_genotype(REPO / "genotypes" / f"{name}.json", tasks)
    assert list(g) == tasks and all(list(row) == tasks for row in g.values())
    assert json.loads((REPO / "genotypes" / f"{name}.json").read_text())["step"] == 40000
    # relative paths resolve against the repository root too
    assert load_genotype(f"genotypes/{name}.json", tasks) == g


def test_published_genotype_values():
    g = load_genotype("genotypes/nyud_hrnet48.json", NYUD)
    assert g["semseg"] == {"semseg": 3, "depth": 0, "normals": 0, "edge": 4}
    assert g["edge"] == dict.fromkeys(NYUD, 3)
    p = load_genotype("genotypes/pascal_hrnet18.json", PASCAL)
    assert p["semseg"]["normals"] == 0 and p["edge"]["normals"] == 1 and p["sal"]["normals"] == 4


def test_genotype_round_trip_file_and_run_dir(tmp_path):
    g = load_genotype("genotypes/nyud_hrnet18.json", NYUD)
    f = tmp_path / "g.json"
    save_genotype(g, f, step=7)
    assert json.loads(f.read_text()) == {"data": g, "step": 7}
    assert load_genotype(f, NYUD) == g
    (tmp_path / "run2").mkdir()
    save_genotype(g, tmp_path / "run2", step=5)  # a directory: writes atrc_genotype.json
    assert load_genotype(tmp_path / "run2", NYUD) == g
    # a search run dir through the config
    model = _build(["dataset=nyud", "context=atrc", f"context.genotype={tmp_path / 'run2'}"], meta=True)
    assert _count(model) == 5_060_994


def _bad(tmp_path, mutate):
    data = copy.deepcopy(json.loads((REPO / "genotypes" / "nyud_hrnet18.json").read_text()))
    mutate(data["data"])
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    return f


@pytest.mark.parametrize(
    "mutate,pair,what",
    [
        (
            lambda d: d.__setitem__("sal", dict.fromkeys(NYUD, 1)),
            "target='sal', source='semseg'",
            "unknown task 'sal'",
        ),
        (lambda d: d["depth"].__setitem__("sal", 1), "target='depth', source='sal'", "unknown task 'sal'"),
        (lambda d: d.pop("edge"), "target='edge', source='semseg'", "missing task 'edge'"),
        (lambda d: d["normals"].pop("depth"), "target='normals', source='depth'", "missing pair"),
        (lambda d: d["edge"].__setitem__("depth", 5), "target='edge', source='depth'", "integer 0-4"),
        (lambda d: d["edge"].__setitem__("edge", -1), "target='edge', source='edge'", "integer 0-4"),
        (lambda d: d["semseg"].__setitem__("depth", "2"), "target='semseg', source='depth'", "integer 0-4"),
        (lambda d: d["semseg"].__setitem__("depth", 1.5), "target='semseg', source='depth'", "integer 0-4"),
    ],
)
def test_genotype_validation_errors_name_file_and_pair(tmp_path, mutate, pair, what):
    f = _bad(tmp_path, mutate)
    with pytest.raises(ConfigError) as e:
        load_genotype(f, NYUD)
    msg = str(e.value)
    assert str(f) in msg and pair in msg and what in msg, msg


def test_genotype_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_genotype(tmp_path / "nope.json", NYUD)
    with pytest.raises(ConfigError, match="atrc_genotype.json"):
        load_genotype(tmp_path, NYUD)
    f = tmp_path / "x.json"
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="x.json"):
        load_genotype(f, NYUD)
    f.write_text(json.dumps({"semseg": {}}))
    with pytest.raises(ConfigError, match="not a genotype file"):
        load_genotype(f, NYUD)
    # a genotype for other tasks: the configured tasks decide
    with pytest.raises(ConfigError, match="unknown task 'human_parts'"):
        load_genotype("genotypes/pascal_hrnet18.json", NYUD)


def test_build_model_context_errors():
    with pytest.raises(ConfigError, match="context.genotype"):
        _build(["dataset=nyud", "context=atrc"], meta=True)
    with pytest.raises(ConfigError, match="pair"):
        _build(
            ["dataset=nyud", "tasks=semseg", "context=atrc", "context.genotype=genotypes/nyud_hrnet18.json"],
            meta=True,
        )


def test_genotype_heatmap_and_table():
    g = load_genotype("genotypes/pascal_hrnet18.json", PASCAL)
    img = genotype_heatmap(g, PASCAL)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 5 * 40 and img.shape[1] > 5 * 60
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 5  # coloured cells and text
    rows = genotype_table_rows(g, PASCAL)
    assert len(rows) == 25 and all(len(r) == len(GENOTYPE_TABLE_COLUMNS) for r in rows)
    assert ["semseg", "normals", "none", 0] in rows and ["edge", "normals", "global", 1] in rows
    assert ["semseg", "sal", "s-label", 4] in rows


# ------------------------------------------------------------------------------ original weights


# the original's keys, shapes and checkpoints: tests/test_fidelity.py


def test_original_import_names_bad_keys():
    model = _build(["dataset=nyud", "context=global"], meta=False)
    sd = dict(model.state_dict())
    sd["head.atrc_module.cp_blocks.semseg.depth.bogus.weight"] = torch.zeros(1)
    del sd["head.final_logits.edge.bias"]
    with pytest.raises(ValueError) as e:
        atrc_exp.load_original_state_dict(model, {"state_dict": sd})
    msg = str(e.value)
    assert "head.atrc_module.cp_blocks.semseg.depth.bogus.weight" in msg and "unexpected" in msg
    assert "head.final_logits.edge.bias" in msg and "missing" in msg
    sd = dict(model.state_dict())
    sd["head.final_logits.edge.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"head.final_logits.edge.bias \(checkpoint \(3,\)"):
        atrc_exp.load_original_state_dict(model, sd)
    # a genotype mismatch shows up as missing / unexpected CP blocks
    other = _build(["dataset=nyud", "context=tlabel"], meta=True)
    with pytest.raises(ValueError, match="aux_conv"):
        atrc_exp.load_original_state_dict(model, other.state_dict())


# ------------------------------------------------------------------------------------ tiny training


class _TinyBackbone(torch.nn.Module):
    """A 4-scale stand-in for HRNet (strides 4-32) so training steps take milliseconds."""

    out_channels = [8, 8, 8, 8]

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x):
        f = self.stem(x)
        return [f] + [F.avg_pool2d(f, 2**i, ceil_mode=True) for i in (1, 2, 3)]


@pytest.mark.parametrize("context", ["global", "local", "tlabel", "slabel", "nyud_hrnet18", "nyud_hrnet48"])
def test_tiny_training_steps(context):
    from atrc_exp.models.model import MultiTaskModel

    torch.manual_seed(0)
    if context in GENO:
        genotype = load_genotype(f"genotypes/{context}.json", NYUD)
    else:
        genotype = uniform_genotype(NYUD, context)
    out_ch = {"semseg": 7, "depth": 1, "normals": 3, "edge": 1}
    aux_ch = {"semseg": 7, "depth": 40, "normals": 40, "edge": 2}
    head = RelationalContextHead(32, NYUD, genotype, out_ch, aux_ch)
    model = MultiTaskModel(_TinyBackbone(), head, NYUD).train()
    B, H, W = 2, 45, 61
    batch = {
        "semseg": torch.randint(0, 7, (B, H, W)),
        "depth": torch.rand(B, 1, H, W) * 5 + 0.5,
        "normals": F.normalize(torch.randn(B, 3, H, W), dim=1),
        "edge": (torch.rand(B, 1, H, W) > 0.8).float(),
    }
    crit = paper_loss(NYUD, edge_pos_weight=0.8, normal_centroids=F.normalize(torch.randn(40, 3), dim=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(B, 3, H, W)
    x[1, :, :5] = 255  # an ignore band (label context excludes it)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for _ in range(3):
        out = model(x)
        loss, terms = crit(out, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss.detach()))
        if context in ("global", "local"):
            assert "aux" not in out
        else:
            assert set(out["aux"]) == _expected_aux(context)
            assert all(f"loss/aux_{t}" in terms for t in out["aux"])
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert any(k.startswith("head.atrc_module.cp_blocks.") for k in changed)
    assert any(k.startswith("head.atrc_module.out_proj.") for k in changed)
    assert any(k.startswith("backbone.") for k in changed)
    if context not in ("global", "local"):
        assert any(k.startswith("head.aux_logits.") for k in changed)
    model.eval()
    with torch.no_grad():
        assert all(torch.isfinite(v).all() for v in model(x)["final"].values())


def test_aux_heads_see_detached_features():
    """The aux loss trains the aux heads but does not reach the backbone."""
    from atrc_exp.models.model import MultiTaskModel

    head = RelationalContextHead(
        32, NYUD, uniform_genotype(NYUD, "tlabel"), dict.fromkeys(NYUD, 1), dict.fromkeys(NYUD, 2)
    )
    model = MultiTaskModel(_TinyBackbone(), head, NYUD)
    out = model(torch.randn(1, 3, 33, 41))
    out["aux"]["depth"].sum().backward()
    assert (
        model.backbone.stem.weight.grad is None or torch.count_nonzero(model.backbone.stem.weight.grad) == 0
    )
    assert torch.count_nonzero(head.aux_logits["depth"].weight.grad) > 0


@pytest.mark.parametrize(
    "context",
    [
        "global",
        "local",
        "tlabel",
        "atrc",
    ],
)
def test_tiny_fit_with_relational_context(tiny_data_dir, tmp_path, context):
    from conftest import tiny_overrides

    from atrc_exp.engine import fit

    extra = {"context.genotype": "genotypes/nyud_hrnet18.json"} if context == "atrc" else {}
    ov = tiny_overrides(
        tiny_data_dir, **{"context": context, "trainer.max_steps": 2, "trainer.val_interval": 2, **extra}
    )
    metrics = fit(compose_cfg(ov + ["++trainer.edge_eval_workers=0"]), tmp_path)
    assert metrics and all(math.isfinite(float(v)) for v in metrics.values())
