"""The Python API: ``import atrc_exp`` is enough to compose the config (Hydra's compose API or
``atrc_exp.compose``), and the README's "Python API" example runs as written."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import atrc_exp
from atrc_exp.config import CONF_DIR, cache_dir

README = REPO / "README.md"
API_HEADING = "## Python API"


def _run_python(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter (no resolver registered yet) from ``tmp_path``; it prints
    one JSON line last."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_registers_resolvers_for_hydra_compose(tmp_path):
    code = (
        "import sys, json\n"
        "from omegaconf import OmegaConf\n"
        "assert not OmegaConf.has_resolver('atrc_cache_dir')\n"
        "import atrc_exp\n"
        "torch_loaded = 'torch' in sys.modules\n"
        "from hydra import compose, initialize_config_dir\n"
        "with initialize_config_dir(config_dir=str(atrc_exp.config.CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose(config_name='train', overrides=['dataset=nyud'])\n"
        "print(json.dumps({'cache': cfg.paths.cache_dir, 'dataset': cfg.dataset.name,\n"
        "                  'run_name': cfg.run_name, 'torch': torch_loaded}))\n"
    )
    got = _run_python(code, tmp_path)
    assert got["cache"] == str(tmp_path / "xdg" / "atrc_exp")
    assert got["dataset"] == "nyud" and got["run_name"] == "distill_none"
    assert got["torch"] is False, "import atrc_exp should not import torch"


def test_compose_helper_in_fresh_interpreter(tmp_path):
    code = (
        "import json, atrc_exp\n"
        "cfg = atrc_exp.compose(['context=atrc', 'context.genotype=genotypes/nyud_hrnet18.json',\n"
        "                        'dataset=nyud', 'trainer.max_steps=7'])\n"
        "print(json.dumps({'cache': cfg.paths.cache_dir, 'ctx': cfg.context.name,\n"
        "                  'genotype': cfg.context.genotype, 'steps': cfg.trainer.max_steps,\n"
        "                  'all': 'compose' in atrc_exp.__all__}))\n"
    )
    got = _run_python(code, tmp_path)
    assert got == {
        "cache": str(tmp_path / "xdg" / "atrc_exp"),
        "ctx": "atrc",
        "genotype": "genotypes/nyud_hrnet18.json",
        "steps": 7,
        "all": True,
    }


def test_compose_matches_hydra_and_keeps_outer_hydra_state():
    overrides = ["tasks=semseg", "trainer.batch_size=3"]
    cfg = atrc_exp.compose(overrides)
    assert cfg.paths.cache_dir == str(cache_dir())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        ref = hydra_compose(config_name="train", overrides=overrides)
        # inside an initialised Hydra (a notebook that set it up, a Hydra app): still works ...
        inner = atrc_exp.compose(["tasks=depth"])
        assert list(inner.tasks.names) == ["depth"]
        # ... and the outer state is the one in use afterwards
        assert GlobalHydra.instance().is_initialized()
        again = hydra_compose(config_name="train", overrides=overrides)
    assert cfg == ref == again
    assert list(cfg.tasks.names) == ["semseg"] and cfg.trainer.batch_size == 3
    assert not GlobalHydra.instance().is_initialized()


def _python_api_block(text: str) -> str | None:
    """The first ```python block of the README's "## Python API" section; ``None`` without the
    section (a section without such a block is a failure)."""
    m = re.search(rf"^{re.escape(API_HEADING)}[ \t]*$", text, re.M)
    if m is None:
        return None
    section = text[m.end() :]
    nxt = re.search(r"^## ", section, re.M)
    section = section[: nxt.start()] if nxt else section
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section, re.M | re.S)
    assert block is not None, f"README.md: the '{API_HEADING}' section has no ```python code block"
    return block.group(1)


def _snippet_overrides(code: str) -> list[str]:
    m = re.search(r"atrc_exp\.compose\((\[.*?\])\)", code, re.S)
    assert m is not None, "the README snippet does not call atrc_exp.compose([...])"
    return list(ast.literal_eval(m.group(1)))


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    code = _python_api_block(README.read_text(encoding="utf-8"))
    if code is None:
        pytest.skip(f"README.md has no '{API_HEADING}' section: nothing to run (issue 23 adds it)")
    # the files the snippet reads, in the working directory: weights of its configuration (changed
    # from a fresh initialisation, so that loading them shows) and an image of an odd size
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ref = atrc_exp.build_model(atrc_exp.compose(_snippet_overrides(code)))
    state = {
        k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone()
        for k, v in ref.state_dict().items()
    }
    torch.save(state, tmp_path / "original.ckpt")
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "photo.jpg"), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))

    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md#python-api", "exec"), ns)

    model, out = ns["model"], ns["out"]
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), f"{k} was not loaded from original.ckpt"
    cfg = atrc_exp.compose(_snippet_overrides(code))
    assert set(out) == set(cfg.tasks.names)
    for task, pred in out.items():
        assert pred.shape[0] == 1 and tuple(pred.shape[-2:]) == (64, 96), (task, pred.shape)
        assert torch.isfinite(pred).all(), task
