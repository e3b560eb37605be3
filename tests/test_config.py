"""Every config group option composes; cross-group errors name the fix; --help lists the groups."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CONF_DIR, compose_cfg

from atrc_exp.config import ConfigError, resolve_data_dir, validate_config

GROUPS = ["dataset", "backbone", "tasks", "context", "mode", "trainer", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_spec_groups_and_options_exist():
    assert set(_options("dataset")) >= {"synthetic", "nyud", "pascal_context"}
    assert set(_options("backbone")) >= {"hrnet18", "hrnet48", "timm"}
    assert set(_options("tasks")) >= {"all", "semseg", "depth", "normals", "edge", "sal", "human_parts"}
    assert set(_options("context")) >= {"none", "global", "local", "tlabel", "slabel", "atrc", "search"}
    assert set(_options("mode")) == {"search", "distill", "pipeline"}
    assert set(_options("logger")) == {"wandb", "none"}
    assert set(_options("trainer")) >= {"default", "paper"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "context" and option == "search":
        overrides.append("mode=search")
    if group == "mode" and option == "search":
        overrides.append("context=search")
    cfg = compose_cfg(overrides)
    for key in ("seed", "paths", "dataset", "backbone", "tasks", "context", "mode", "trainer", "logger"):
        assert key in cfg, key
    for key in ("max_steps", "batch_size", "lr", "val_interval", "num_workers", "mixed_precision", "resume"):
        assert key in cfg.trainer, key
    if group == "tasks" and option != "all":
        assert list(cfg.tasks.names) == [option]
    if (
        group == "dataset"
        and option in {"synthetic", "nyud"}
        or group == "tasks"
        and option in {"semseg", "depth", "normals", "edge"}
    ):
        validate_config(cfg)


def test_tasks_all_follows_dataset():
    assert list(compose_cfg(["dataset=nyud"]).tasks.names) == ["semseg", "depth", "normals", "edge"]
    assert list(compose_cfg(["dataset=pascal_context"]).tasks.names) == [
        "semseg",
        "human_parts",
        "sal",
        "normals",
        "edge",
    ]
    assert compose_cfg(["dataset=pascal_context"]).trainer.lr == 0.005
    assert compose_cfg(["dataset=nyud"]).trainer.lr == 0.01


def test_experiment_preset_overrides_groups():
    cfg = compose_cfg(["experiment=nyud_hrnet48_mt"])
    assert cfg.dataset.name == "nyud" and cfg.backbone.name == "hrnet48"
    assert cfg.trainer.max_steps == 40000 and cfg.trainer.batch_size == 8
    # the preset takes its whole trainer from trainer=paper
    assert cfg.trainer == compose_cfg(["dataset=nyud", "trainer=paper"]).trainer


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["tasks=sal"], "not in dataset=synthetic"),
        (["context=search"], "context=search goes with mode=search"),
        (["mode=search"], "mode=search needs context=search"),
        (["trainer.mixed_precision=fp8"], "mixed_precision"),
    ],
)
def test_bad_combinations_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(compose_cfg(overrides))


def test_real_dataset_without_data_dir_says_what_to_set(monkeypatch):
    monkeypatch.delenv("ATRC_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="paths.data_dir"):
        resolve_data_dir(compose_cfg(["dataset=nyud"]))


def test_help_lists_groups():
    out = subprocess.run(
        [sys.executable, "-m", "atrc_exp.train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for group in GROUPS:
        assert f"{group}:" in out.stdout
    assert "hrnet18, hrnet48, timm" in out.stdout
