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
    assert cfg.dataset.name == "nyud" and cfg.backbone._target_.endswith(".hrnet48")
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


#: bad values and the one line each gives (compose and ``atrc-train``: exit 2 before anything starts)
BAD_VALUES = {
    "seed=abc": "seed=abc: must be int",
    "trainer.weight_decay=-1": "trainer.weight_decay=-1: must be float >= 0",
    "trainer.poly_power=abc": "trainer.poly_power=abc: must be float >= 0",
    "dataset.crop_size=[0,0]": "dataset.crop_size=[0, 0]: must be pair of int >= 1",
    "trainer.max_steps=-5": "trainer.max_steps=-5: must be int >= 0",
    "trainer.momentum=2": "trainer.momentum=2: must be float in [0, 1)",
    "trainer.lr=0": "trainer.lr=0: must be float > 0",
    "trainer.batch_size=0": "trainer.batch_size=0: must be int >= 1",
    "trainer.grad_clip=-1": "trainer.grad_clip=-1: must be null|float > 0",
    "dataset.augment.scale_range=[0.5]": "dataset.augment.scale_range=[0.5]: must be pair of float > 0",
    "trainer.on_nonfinite=ignore": "trainer.on_nonfinite=ignore: must be stop|skip",
    "backbone._target_=mypkg.MyBackbone": "backbone._target_=mypkg.MyBackbone: cannot import it "
    "(No module named 'mypkg'); is its package on PYTHONPATH?",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_a_bad_value_is_one_line_at_compose_time(override):
    from atrc_exp.config import compose

    with pytest.raises(ConfigError) as e:
        compose([override])
    assert str(e.value) == BAD_VALUES[override]


def test_bad_values_stop_atrc_train_with_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"  # the synthetic dataset would be written here if anything started
    for override, line in BAD_VALUES.items():
        run = tmp_path / "run"
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "atrc_exp.train",
                override,
                f"paths.data_dir={data}",
                f"hydra.run.dir={run}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (out.returncode, out.stderr.splitlines()) == (2, [f"error: {line}"]), (override, out.stderr)
        assert not data.exists() and not (run / "train_log.jsonl").exists()


def _leaf_keys(node, prefix=""):
    from omegaconf import DictConfig, OmegaConf

    for k in node:
        v = node._get_node(k)
        if isinstance(v, DictConfig) and not OmegaConf.is_interpolation(node, k):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("group", GROUPS)
def test_every_key_has_a_type_and_range(group):
    """Every key of every option of conf/ is in atrc_exp.config.SCHEMA (or under an ``any`` node)."""
    from atrc_exp.config import SCHEMA

    for option in _options(group):
        extra = {"context=search": ["mode=search"], "mode=search": ["context=search"]}
        cfg = compose_cfg([f"{group}={option}", *extra.get(f"{group}={option}", [])])
        for key in _leaf_keys(cfg):
            spec = SCHEMA
            for part in key.split("."):
                assert isinstance(spec, dict) and part in spec, f"{group}={option}: {key} is not in SCHEMA"
                spec = spec[part]
                if spec == "any":
                    break
