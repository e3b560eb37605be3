"""The ATRC pipeline as a Hydra job (``atrc-train mode=pipeline``) and its ``atrc-pipeline`` alias."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import compose_cfg
from omegaconf import OmegaConf
from test_train import _run_cli, cli_overrides

from atrc_exp.config import ConfigError, validate_config
from atrc_exp.models.genotype import load_genotype
from atrc_exp.pipeline import shared_overrides, stage_configs
from atrc_exp.train import translate_args


def test_pipeline_mode_defaults_and_search_settings_from_the_search_mode():
    pipe = compose_cfg(["mode=pipeline"])
    search = compose_cfg(["mode=search", "context=search"])
    assert (pipe.mode.name, pipe.context.name) == ("pipeline", "atrc")
    assert (pipe.mode.search_steps, pipe.mode.distill_steps, pipe.mode.baseline) == (80, 100, True)
    # conf/mode/search.yaml itself, not a copy: the same keys and values
    assert OmegaConf.to_container(pipe.mode.search) == OmegaConf.to_container(search.mode)
    validate_config(pipe)


@pytest.mark.parametrize("context", ["none", "local", "search"])
def test_pipeline_refuses_a_context_other_than_atrc(context):
    with pytest.raises(ConfigError, match=f"mode=pipeline distils with context=atrc.*got context={context}"):
        validate_config(compose_cfg(["mode=pipeline", f"context={context}"]))


def test_pipeline_refuses_zero_steps():
    with pytest.raises(ConfigError, match="mode.distill_steps=0"):
        validate_config(compose_cfg(["mode=pipeline", "mode.distill_steps=0"]))


def test_stage_configs(tmp_path):
    overrides = [
        "mode=pipeline",
        "context=atrc",
        "seed=3",
        "trainer.lr=0.02",
        "mode.search_steps=3",
        "mode.search.tau=[1.0,0.5]",
    ]
    assert shared_overrides(overrides) == ["seed=3", "trainer.lr=0.02"]
    stages = stage_configs(compose_cfg(overrides), overrides, tmp_path)
    assert list(stages) == ["search", "distill", "baseline"]
    s, d, b = stages["search"], stages["distill"], stages["baseline"]
    assert (s.mode.name, s.context.name, list(s.mode.tau)) == ("search", "search", [1.0, 0.5])
    assert s.mode.arch_lr == compose_cfg(["mode=search", "context=search"]).mode.arch_lr
    assert s.trainer.max_steps == s.trainer.val_interval == 3
    assert (d.mode.name, d.context.name, d.context.genotype) == ("distill", "atrc", str(tmp_path / "search"))
    assert (b.mode.name, b.context.name) == ("distill", "none")
    assert d.trainer.max_steps == b.trainer.max_steps == d.trainer.checkpoint_interval == 100
    assert all(c.seed == 3 and c.trainer.lr == 0.02 for c in stages.values())
    # no baseline; null steps keep trainer.max_steps as configured
    overrides = ["mode=pipeline", "mode.baseline=false", "mode.search_steps=null", "trainer.max_steps=7"]
    stages = stage_configs(compose_cfg(overrides), overrides, tmp_path)
    assert list(stages) == ["search", "distill"]
    assert stages["search"].trainer.max_steps == 7 and stages["distill"].trainer.max_steps == 100


def test_atrc_pipeline_translates_its_flags():
    args = ["--search-steps", "5", "--distill-steps=6", "--no-baseline", "--out", "/x/a b", "seed=1"]
    assert translate_args(args) == [
        "mode=pipeline",
        "mode.search_steps=5",
        "mode.distill_steps=6",
        "mode.baseline=false",
        "hydra.run.dir='/x/a b'",
        "seed=1",
    ]
    assert translate_args(["-m", "--out", "/s", "seed=0,1"]) == [
        "mode=pipeline",
        "-m",
        "hydra.sweep.dir='/s'",
        "seed=0,1",
    ]
    assert translate_args(["mode=pipeline"]) == ["mode=pipeline"]
    with pytest.raises(ConfigError, match="use atrc-train mode=search"):
        translate_args(["mode=search"])
    with pytest.raises(ConfigError, match="--search-steps needs a value"):
        translate_args(["--search-steps"])


def test_atrc_pipeline_alias_reaches_hydra(tmp_path):
    """``atrc-pipeline`` (``make train``) is ``atrc-train mode=pipeline``: its flags become config keys."""
    entry = "import sys; from atrc_exp.train import pipeline_main; sys.exit(pipeline_main())"
    cmd = [sys.executable, "-c", entry, "--search-steps", "5", "--no-baseline"]
    cmd += ["--out", str(tmp_path / "run x"), "seed=4", "--cfg", "all"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["hydra"]["run"]["dir"] == str(tmp_path / "run x")
    assert cfg["mode"]["name"] == "pipeline" and cfg["context"]["name"] == "atrc" and cfg["seed"] == 4
    assert (cfg["mode"]["search_steps"], cfg["mode"]["distill_steps"], cfg["mode"]["baseline"]) == (
        5,
        100,
        False,
    )


def test_pipeline_multirun_two_seeds(tiny_data_dir, tmp_path):
    """``atrc-train --multirun mode=pipeline seed=0,1``: per job a search, a distillation with the
    genotype it found, and the distillation's metrics at the job's top level."""
    sweep = tmp_path / "sweep"
    out = _run_cli(
        [
            "--multirun",
            "mode=pipeline",
            "seed=0,1",
            f"hydra.sweep.dir={sweep}",
            "trainer.cpu=true",
            "mode.search_steps=2",
            "mode.distill_steps=2",
            "mode.baseline=false",
            "mode.search.tau=[1.0,0.5]",
            *cli_overrides(tiny_data_dir, **{"tasks.names": "[semseg,depth]"}),
        ],
        cwd=tmp_path,
    )
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    results = []
    for seed, job in enumerate(jobs):
        genotype = load_genotype(job / "search", ["semseg", "depth"])
        assert set(genotype) == {"semseg", "depth"}
        search_cfg = OmegaConf.load(job / "search" / "config_resolved.yaml")
        assert (search_cfg.mode.name, search_cfg.context.name, list(search_cfg.mode.tau)) == (
            "search",
            "search",
            [1.0, 0.5],
        )
        assert search_cfg.seed == seed and search_cfg.trainer.max_steps == 2
        distill_cfg = OmegaConf.load(job / "distill" / "config_resolved.yaml")
        assert (distill_cfg.mode.name, distill_cfg.context.name) == ("distill", "atrc")
        assert distill_cfg.context.genotype == str(job / "search") and distill_cfg.seed == seed
        distill = json.loads((job / "distill" / "metrics.json").read_text())
        assert distill["step"] == 2 and {k.split("/")[0] for k in distill["metrics"]} == {"semseg", "depth"}
        assert json.loads((job / "metrics.json").read_text()) == distill
        assert not (job / "baseline").exists()
        results.append(distill["metrics"])
    assert results[0] != results[1]  # two seeds, two runs
    assert out.stdout.count("genotype found by the search") == 2
    assert out.stdout.count("ATRC final metrics") == 2
