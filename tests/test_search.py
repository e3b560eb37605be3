"""ATRC search loop: schedules, entropy term, genotype file, search → distill."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_cfg, tiny_overrides
from omegaconf import OmegaConf

import atrc_exp
from atrc_exp.engine import fit
from atrc_exp.engine.search import SearchController, entropy_term, linear_schedule
from atrc_exp.models.genotype import load_genotype
from atrc_exp.models.search_block import SearchCPBlock


def test_tau_and_entropy_weight_schedules():
    mode = OmegaConf.create({"tau": [1.0, 0.05], "entropy_weight": [-0.02, 0.06], "freeze_gap": 0.3})
    model = atrc_exp.build_model(compose_cfg(["dataset=nyud", "context=search", "mode=search"]))
    ctl = SearchController(model, mode, max_steps=100)
    # the original's end + (1 − k/max_steps)·(start − end): the last step (99) is just above the end
    assert ctl.tau_at(0) == pytest.approx(1.0) and ctl.tau_at(99) == pytest.approx(0.05 + 0.95 / 100)
    assert ctl.tau_at(50) == pytest.approx(0.525)
    assert ctl.entropy_weight_at(0) == pytest.approx(-0.02)
    assert ctl.entropy_weight_at(50) == pytest.approx(0.02)
    assert ctl.entropy_weight_at(99) == pytest.approx(0.06 - 0.08 / 100)
    w = ctl.begin_step(50)
    assert w == pytest.approx(0.02) and all(b.tau == pytest.approx(0.525) for b in ctl.blocks.values())
    assert len(ctl.blocks) == 16
    assert linear_schedule(1.0, 0.0, 7, 1) == 0.0  # a 1-step run sits at the end value


def test_entropy_term_on_known_alpha():
    same, cross = SearchCPBlock(True, 8, 4, 3), SearchCPBlock(False, 8, 4, 3)
    # α = 0: uniform over 4 and 5 choices
    assert entropy_term([same, cross]).item() == pytest.approx((math.log(4) + math.log(5)) / 2, rel=1e-6)
    with torch.no_grad():
        cross.arch_param.copy_(torch.tensor([math.log(3.0), 0.0, 0.0, -1e4, -1e4]))  # p = (.6, .2, .2, 0, 0)
    p = torch.tensor([0.6, 0.2, 0.2])
    expected = -(p * p.log()).sum().item()
    assert entropy_term([cross]).item() == pytest.approx(expected, rel=1e-5)


def test_tiny_search_writes_genotype_that_distill_consumes(tiny_data_dir, tmp_path):
    run = tmp_path / "search"
    over = tiny_overrides(
        tiny_data_dir,
        **{
            "context": "search",
            "mode": "search",
            "trainer.max_steps": 3,
            "trainer.val_interval": 3,
            "mode.arch_lr": 0.05,
        },
    )
    metrics = fit(compose_cfg(over), run)
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    g = json.loads((run / "atrc_genotype.json").read_text())
    assert g["step"] == 3
    tasks = ["semseg", "depth", "normals", "edge"]
    genotype = load_genotype(run, tasks)
    assert set(genotype) == set(tasks) and all(0 <= genotype[t][s] <= 4 for t in tasks for s in tasks)
    # α moved (Adam stepped them), the weights optimizer did not own them
    ckpt = next((run / "checkpoints").glob("step_*"))
    state = torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    alphas = [v for k, v in state.items() if k.endswith("arch_param")]
    assert len(alphas) == 16 and any(a.abs().max() > 0 for a in alphas)
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    # 3 steps: τ at step 2 is 0.05 + (1 − 2/3)·0.95
    assert lines[0]["search/tau"] == pytest.approx(1.0) and lines[-1]["search/tau"] == pytest.approx(
        0.05 + 0.95 / 3
    )
    assert "train/loss/entropy_term" in lines[0]
    # distillation from the search run dir
    dist = tmp_path / "distill"
    over = tiny_overrides(
        tiny_data_dir, **{"context": "atrc", "context.genotype": str(run), "trainer.max_steps": 1}
    )
    fit(compose_cfg(over), dist)
    assert json.loads((dist / "metrics.json").read_text())["step"] == 1


def test_pipeline_search_distill_baseline(tiny_data_dir, tmp_path, capsys):
    from atrc_exp.train import pipeline_main

    over = tiny_overrides(tiny_data_dir)
    rc = pipeline_main(["--search-steps", "2", "--distill-steps", "1", "--out", str(tmp_path), *over])
    assert rc == 0
    out = capsys.readouterr().out
    assert "genotype found by the search" in out and "MT baseline" in out and "semseg/mIoU" in out
    for stage in ("search", "distill", "baseline"):
        assert (tmp_path / stage / "metrics.json").is_file()
    assert (tmp_path / "search" / "atrc_genotype.json").is_file()
