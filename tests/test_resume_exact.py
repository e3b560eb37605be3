"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) and resumed equals an uninterrupted one.

Every run is a subprocess of ``atrc-train`` on tiny synthetic data with augmentation on; runs that
are compared use the same thread settings, so weights must match bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from atrc_exp.engine.sampling import SeededAugmentation, StepBatchSampler

STEPS = 7


def _cmd(run_dir: Path, data_dir: Path, extra: dict) -> list[str]:
    over = {
        "trainer.max_steps": STEPS,
        "trainer.val_interval": STEPS,
        "trainer.checkpoint_interval": 3,
        "trainer.keep_checkpoints": 5,
        "dataset.augment.scale_range": "[0.8,1.25]",
        **extra,
    }
    return [
        sys.executable,
        "-m",
        "atrc_exp.train",
        f"hydra.run.dir={run_dir}",
        *tiny_overrides(data_dir, **over),
    ]


def _start(run_dir, data_dir, extra, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("ATRC_FAULT_INJECT", None)
    if fault:
        env["ATRC_FAULT_INJECT"] = fault
    return subprocess.Popen(
        _cmd(run_dir, data_dir, extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait(p: subprocess.Popen, expect_rc: int | None = 0) -> str:
    out, err = p.communicate(timeout=600)
    if expect_rc is not None:
        assert p.returncode == expect_rc, f"rc {p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    return err


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "pytorch_model.bin", weights_only=True)


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    la = [json.loads(x) for x in (a / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, STEPS + 1))
    assert [r["train/loss"] for r in la] == [r["train/loss"] for r in lb]


@pytest.fixture(scope="module")
def reference_runs(tiny_data_dir, tmp_path_factory):
    """Uninterrupted distill and search runs, started together (2 cores)."""
    root = tmp_path_factory.mktemp("reference")
    specs = {
        "distill": {"context": "local"},
        "search": {"mode": "search", "context": "search"},
    }
    procs = {k: _start(root / k, tiny_data_dir, v) for k, v in specs.items()}
    for p in procs.values():
        _wait(p)
    return {k: (root / k, specs[k]) for k in specs}


@pytest.mark.parametrize("kind", ["distill", "search"])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(reference_runs, tiny_data_dir, tmp_path, kind):
    ref_dir, extra = reference_runs[kind]
    run = tmp_path / "run"
    # killed during step 5 (after the forward pass); the step-3 checkpoint is the newest
    p = _start(run, tiny_data_dir, {**extra, "trainer.num_workers": 2}, fault="sigkill@5")
    _wait(p, expect_rc=-signal.SIGKILL)
    assert sorted(c.name for c in (run / "checkpoints").glob("step_*")) == ["step_00000003"]
    # resumed (trainer.resume=auto is the default) with a different worker count: same data
    _wait(_start(run, tiny_data_dir, extra))
    _assert_same_run(ref_dir, run)
    if kind == "search":
        ga = json.loads((ref_dir / "atrc_genotype.json").read_text())
        gb = json.loads((run / "atrc_genotype.json").read_text())
        assert ga == gb
        alpha = [k for k in _final_state(run) if k.endswith("arch_param")]
        assert len(alpha) == 16


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes(reference_runs, tiny_data_dir, tmp_path):
    ref_dir, extra = reference_runs["distill"]
    run = tmp_path / "run"
    err = _wait(_start(run, tiny_data_dir, extra, fault="sigterm@4"), expect_rc=128 + signal.SIGTERM)
    assert "preempted: SIGTERM received: stopped at step 4" in err
    assert "Traceback" not in err
    assert sorted(c.name for c in (run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["data"]["epoch"] == 1  # 8 samples / batch 2 = 4 steps per epoch
    _wait(_start(run, tiny_data_dir, extra))
    _assert_same_run(ref_dir, run)


# ---------------------------------------------------------------- the data order itself


def test_step_sampler_is_a_function_of_the_step():
    full = StepBatchSampler(10, 4, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(7)]
    assert first == [full.batch_for_step(k) for k in range(7)]
    resumed = iter(StepBatchSampler(10, 4, seed=3, start_step=4))
    assert [next(resumed) for _ in range(3)] == first[4:]
    # an epoch is 2 batches of 4 (drop_last): 8 distinct samples, codes carry the epoch
    epoch0 = first[0] + first[1]
    assert len(set(epoch0)) == 8 and all(c < 10 for c in epoch0)
    assert all(10 <= c < 20 for c in first[2] + first[3])
    # two processes split every global batch in order
    r0 = StepBatchSampler(10, 4, seed=3, rank=0, world_size=2)
    r1 = StepBatchSampler(10, 4, seed=3, rank=1, world_size=2)
    for k in range(5):
        assert r0.batch_for_step(k) + r1.batch_for_step(k) == full.batch_for_step(k)
    assert StepBatchSampler(10, 4, seed=4).batch_for_step(0) != full.batch_for_step(0)


def test_seeded_augmentation_ignores_and_keeps_the_global_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.rand(3) + i

    ds = SeededAugmentation(Noisy(), seed=1)
    torch.manual_seed(0)
    a = ds[7]  # epoch 1, sample 2
    state = torch.get_rng_state()
    torch.manual_seed(123)
    b = ds[7]
    assert torch.equal(a, b)
    assert not torch.equal(ds[2], a)  # same sample, other epoch: other augmentation
    torch.manual_seed(0)
    ds[7]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
