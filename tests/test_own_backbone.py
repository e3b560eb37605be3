"""A backbone from the user's own package, outside atrc_exp: ``atrc-train backbone._target_=mypkg.MyBackbone``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO, tiny_overrides

MYPKG = '''
import torch
from torch import nn


class MyBackbone(nn.Module):
    """Two feature maps (strides 4 and 8), highest resolution first."""

    def __init__(self, pretrained=False, **kwargs):  # the other keys of the backbone group
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.out_channels = [8, 16]

    def forward(self, x):
        y = self.stem(x)
        return [y, self.down(y)]
'''


def test_a_backbone_from_the_users_package_trains(tiny_data_dir, tmp_path):
    pkg = tmp_path / "site" / "mypkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(MYPKG))
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path / "site")])
    env.pop("HYDRA_FULL_ERROR", None)
    run_dir = tmp_path / "run"
    over = tiny_overrides(
        tiny_data_dir, **{"tasks": "semseg", "trainer.max_steps": 2, "trainer.val_interval": 2}
    )
    cmd = [sys.executable, "-m", "atrc_exp.train", "backbone._target_=mypkg.MyBackbone", *over]
    out = subprocess.run(
        [*cmd, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 2
    # the network trained and saved is the user's backbone (its keys) under the configured head
    import torch

    (ckpt,) = sorted((run_dir / "checkpoints").glob("step_*"))
    weights = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {f"backbone.{m}.0.{p}" for m in ("stem", "down") for p in ("weight", "bias")}
    expected |= {f"backbone.{m}.1.{p}" for m in ("stem", "down") for p in bn}
    assert {k for k in weights if k.startswith("backbone.")} == expected
    # the FCN head reads the user's 8 + 16 channels, concatenated
    assert weights["head.bottleneck.semseg.conv.weight"].shape[1] == 24

    # a class that cannot be imported: one line at compose time, exit 2, before anything starts
    bad = subprocess.run(
        [*cmd[:3], "backbone._target_=mypkg.Nope", *over, f"hydra.run.dir={tmp_path / 'bad'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: backbone._target_=mypkg.Nope: cannot import it (module 'mypkg' has no attribute 'Nope'); "
        "is its package on PYTHONPATH?"
    ], bad.stderr
