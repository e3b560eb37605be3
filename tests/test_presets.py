"""Paper presets (conf/experiment/*.yaml): each one composes to the paper's settings, states only what
differs from the groups it selects, validates, builds its model and runs a forward pass (one training
step in the slow test). The smoke tests run over every file in conf/experiment/."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, tiny_overrides
from omegaconf import OmegaConf

from atrc_exp.config import CONF_DIR, validate_config
from atrc_exp.engine.trainer import grad_clip_of

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

NYUD = ["semseg", "depth", "normals", "edge"]
PASCAL = ["semseg", "human_parts", "sal", "normals", "edge"]
#: the trainer block every preset spelled out before trainer/paper.yaml existed
PAPER = {
    "max_steps": 40000,
    "batch_size": 8,
    "val_interval": 4000,
    "checkpoint_interval": 2000,
    "num_workers": 8,
}
#: the presets' composed values before they selected trainer=paper (from their files at a18bbce):
#: name -> (dataset, backbone, context, mode, tasks, lr, grad_clip); all had backbone.pretrained=true
EXPECTED = {
    "nyud_hrnet18_atrc": ("nyud", "hrnet18", "atrc", "distill", NYUD, 0.01, None),
    "nyud_hrnet18_global": ("nyud", "hrnet18", "global", "distill", NYUD, 0.01, None),
    "nyud_hrnet18_local": ("nyud", "hrnet18", "local", "distill", NYUD, 0.01, None),
    "nyud_hrnet18_mt": ("nyud", "hrnet18", "none", "distill", NYUD, 0.01, None),
    "nyud_hrnet18_search": ("nyud", "hrnet18", "search", "search", NYUD, 0.01, 10.0),
    "nyud_hrnet18_slabel": ("nyud", "hrnet18", "slabel", "distill", NYUD, 0.01, None),
    "nyud_hrnet18_st": ("nyud", "hrnet18", "none", "distill", ["semseg"], 0.01, None),
    "nyud_hrnet18_tlabel": ("nyud", "hrnet18", "tlabel", "distill", NYUD, 0.01, None),
    "nyud_hrnet48_atrc": ("nyud", "hrnet48", "atrc", "distill", NYUD, 0.01, None),
    "nyud_hrnet48_mt": ("nyud", "hrnet48", "none", "distill", NYUD, 0.01, None),
    "nyud_hrnet48_search": ("nyud", "hrnet48", "search", "search", NYUD, 0.01, 10.0),
    "nyud_hrnet48_st": ("nyud", "hrnet48", "none", "distill", ["semseg"], 0.01, None),
    "pascal_hrnet18_atrc": ("pascal_context", "hrnet18", "atrc", "distill", PASCAL, 0.005, None),
    "pascal_hrnet18_mt": ("pascal_context", "hrnet18", "none", "distill", PASCAL, 0.005, None),
    "pascal_hrnet18_search": ("pascal_context", "hrnet18", "search", "search", PASCAL, 0.005, 10.0),
    "pascal_hrnet18_st": ("pascal_context", "hrnet18", "none", "distill", ["semseg"], 0.005, None),
}
GENOTYPES = {
    "nyud_hrnet18_atrc": "genotypes/nyud_hrnet18.json",
    "nyud_hrnet48_atrc": "genotypes/nyud_hrnet48.json",
    "pascal_hrnet18_atrc": "genotypes/pascal_hrnet18.json",
}


@functools.cache
def _synthetic(name: str) -> str:
    """The synthetic dataset with the layout (and so the tasks) of the preset's dataset."""
    layout = compose_cfg([f"experiment={name}"]).dataset.layout
    return "dataset=synthetic_pascal" if layout == "PASCAL_MT" else "dataset=synthetic"


def _smoke_overrides(name: str) -> list[str]:
    return [f"experiment={name}", _synthetic(name), "backbone.pretrained=false"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_composes_to_the_paper_settings(name):
    dataset, backbone, context, mode, tasks, lr, grad_clip = EXPECTED[name]
    cfg = compose_cfg([f"experiment={name}"])
    assert {k: cfg.trainer[k] for k in PAPER} == PAPER
    assert cfg.trainer.lr == lr
    assert grad_clip_of(cfg) == grad_clip
    assert (cfg.dataset.name, cfg.backbone._target_.rsplit(".", 1)[-1], cfg.context.name, cfg.mode.name) == (
        dataset,
        backbone,
        context,
        mode,
    )
    assert list(cfg.tasks.names) == tasks
    assert cfg.backbone.pretrained is True
    assert cfg.context.get("genotype") == GENOTYPES.get(name)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_states_only_what_differs(name):
    """Every value a preset sets differs from what the groups it selects give, and it takes the
    paper's optimisation from trainer=paper rather than repeating it."""
    body = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml"))
    # `- override /dataset: nyud` -> dataset=nyud (the `_self_` marker is no choice)
    entries = [e for e in body.pop("defaults", []) if isinstance(e, dict)]
    choices = [f"{k.removeprefix('override /')}={v}" for e in entries for k, v in e.items()]
    groups_only = compose_cfg(choices)
    for key, value in _leaves(body).items():
        given = _select(groups_only, key)
        assert given != value, (
            f"{name}: {key}={value!r} is what its groups give already; drop it from the preset"
        )


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Dotted keys of the leaf values of a YAML mapping."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _select(cfg, key: str) -> object:
    """``cfg``'s value at ``key`` as plain Python (None where it is missing or does not resolve)."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_runs_a_forward(name):
    """On synthetic data with a random backbone: the config validates and the model maps a
    (1, 3, 64, 64) batch to full-resolution final predictions of every task (and auxiliary ones,
    where the head has them, of some tasks)."""
    from atrc_exp.models import build_model

    cfg = compose_cfg(_smoke_overrides(name))
    validate_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    tasks = list(cfg.tasks.names)
    k = cfg.dataset.task_specs.semseg.classes
    k = k if isinstance(k, int) else len(k)
    #: (final, aux) channels of each paper task (SPEC: aux depth 40 bins, normals 40 centroids)
    channels_of = {
        "semseg": (k, k),
        "human_parts": (7, 7),
        "sal": (2, 2),
        "depth": (1, 40),
        "normals": (3, 40),
        "edge": (1, 2),
    }
    assert sorted(out.get("final", {})) == sorted(tasks), {k: sorted(v) for k, v in out.items()}
    for kind, preds in out.items():
        assert set(preds) <= set(tasks), (kind, sorted(preds))
        for task, pred in preds.items():
            channels = channels_of[task][0 if kind == "final" else 1]
            assert tuple(pred.shape) == (1, channels, 64, 64), (kind, task, tuple(pred.shape))
            assert torch.isfinite(pred).all(), (kind, task)


@pytest.fixture(scope="module")
def tiny_both_layouts(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the NYUD_MT and PASCAL_MT layouts side by side."""
    from atrc_exp.data.layouts import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic_both")
    for layout in ("NYUD_MT", "PASCAL_MT"):
        ensure_synthetic_dataset(
            root, n_train=8, n_val=4, height=48, width=64, seed=0, progress=False, layout=layout
        )
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step(name, tiny_both_layouts, tmp_path, monkeypatch):
    """One training step and a validation through ``fit``, with the preset's learning rate and
    gradient clipping reaching the optimisation step."""
    import atrc_exp.engine.trainer as trainer
    from atrc_exp.engine import fit

    seen: dict[str, object] = {}
    real_parts = trainer.StepParts

    def record_parts(**kw):
        seen["grad_clip"] = kw.get("grad_clip")
        seen["lr"] = kw["optimizer"].param_groups[0]["initial_lr"]
        return real_parts(**kw)

    monkeypatch.setattr(trainer, "StepParts", record_parts)
    over = tiny_overrides(tiny_both_layouts, **{"trainer.max_steps": 1, "trainer.val_interval": 1})
    cfg = compose_cfg([*_smoke_overrides(name), *over])
    metrics = fit(cfg, tmp_path)
    assert metrics and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 1
    assert seen["lr"] == pytest.approx(float(cfg.dataset.default_lr))
    assert seen["grad_clip"] == grad_clip_of(cfg)
    if name in EXPECTED:
        assert seen["grad_clip"] == EXPECTED[name][-1]
