"""The training step and the loop around it (atrc_exp.engine.step, atrc_exp.engine.trainer).

* A step only queues device work: no host read in ten steps of ``context=atrc`` or of the search
  (the reads happen at log, validation and checkpoint steps), and a non-finite step is still caught
  there, naming the first bad step and term.
* Whole-step compilation: forward + loss (+ backward) of every distillation context as one graph.
* Checkpoints: an incomplete folder is never resumed from; rotation keeps exactly the newest.
* Two processes (torchrun, gloo): the poly learning rates at given steps; BatchNorm → SyncBatchNorm.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import HostReads, compose_cfg, paper_loss, tiny_overrides

from atrc_exp.engine import fit
from atrc_exp.engine import trainer as trainer_mod
from atrc_exp.engine.faults import NonFiniteError


@pytest.fixture(scope="module")
def genotype_file(all_contexts_genotype) -> Path:
    return all_contexts_genotype


def _context(name: str, genotype_file: Path) -> dict:
    if name == "search":
        return {"context": "search", "mode": "search"}
    return {"context": "atrc", "context.genotype": str(genotype_file)}


# ------------------------------------------------------------------------------------ host reads


@pytest.mark.parametrize("context", ["atrc", "search"])
def test_ten_steps_read_nothing_from_the_device_between_log_steps(
    context, genotype_file, tiny_data_dir, tmp_path, monkeypatch
):
    reads: list[list[str]] = []
    real = trainer_mod.train_step

    def counted(*args, **kwargs):
        with HostReads() as r:
            out = real(*args, **kwargs)
        reads.append(r.reads)
        return out

    monkeypatch.setattr(trainer_mod, "train_step", counted)
    over = {
        **_context(context, genotype_file),
        "trainer.max_steps": 10,
        "trainer.log_interval": 5,
        "trainer.val_interval": 10,
        "trainer.checkpoint_interval": 10,
    }
    fit(compose_cfg(tiny_overrides(tiny_data_dir, **over)), tmp_path)
    assert len(reads) == 10 and reads == [[]] * 10, reads
    logged = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logged == [5, 10]  # the reads happen there


def test_nonfinite_step_caught_at_the_next_log_step_naming_step_and_term(
    tiny_data_dir, tmp_path, monkeypatch
):
    """A NaN loss at step 2 of a run that logs and checkpoints every 3 steps: the run stops at step 3
    naming step 2 and its term, before step 3's checkpoint is written."""
    monkeypatch.setenv("ATRC_FAULT_INJECT", "nan:depth@2")
    over = {
        "trainer.max_steps": 6,
        "trainer.log_interval": 3,
        "trainer.val_interval": 3,
        "trainer.checkpoint_interval": 3,
    }
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss at step 2 \(terms: loss/depth\).*last good checkpoint: none"
    ):
        fit(compose_cfg(tiny_overrides(tiny_data_dir, **over)), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step_*"))


# ------------------------------------------------------------------------------ whole-step compile


def _compiled_step_runs(overrides: dict, tiny_data_dir) -> None:
    """Build the trainer's step function with ``trainer.compile`` (eager backend, fullgraph: a
    graph break raises) and run forward, loss and backward once."""
    import torch._dynamo

    from atrc_exp.engine.fast_paths import apply_fast_paths, compile_step
    from atrc_exp.engine.step import make_forward_loss
    from atrc_exp.models import build_model

    cfg = compose_cfg(
        tiny_overrides(
            tiny_data_dir,
            **overrides,
            **{
                "trainer.compile.enabled": "true",
                "trainer.compile.backend": "eager",
                "trainer.compile.fullgraph": "true",
            },
        )
    )
    torch.manual_seed(0)
    model = apply_fast_paths(build_model(cfg), cfg).train()  # as the trainer (mode.recompute, ...)
    cent = torch.nn.functional.normalize(torch.randn(40, 3), dim=1)
    criterion = paper_loss(list(cfg.tasks.names), 0.8, cent)
    g = torch.Generator().manual_seed(0)
    B, H, W = 2, 48, 64
    batch = {
        "image": torch.randn(B, 3, H, W, generator=g),
        "semseg": torch.randint(0, 7, (B, H, W), generator=g),
        "depth": torch.rand(B, 1, H, W, generator=g) + 1,
        "normals": torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1),
        "edge": (torch.rand(B, 1, H, W, generator=g) > 0.9).float(),
    }
    torch._dynamo.reset()
    try:
        step = compile_step(make_forward_loss(model, criterion), cfg)
        loss, _ = step(batch["image"], batch)
        loss.backward()
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("context", ["none", "atrc"])
def test_the_distillation_step_compiles_without_a_graph_break(context, genotype_file, tiny_data_dir):
    over = {"context": "none"} if context == "none" else _context("atrc", genotype_file)
    _compiled_step_runs(over, tiny_data_dir)


def test_the_search_step_without_recomputation_compiles_without_a_graph_break(tiny_data_dir):
    _compiled_step_runs({"context": "search", "mode": "search", "mode.recompute": "false"}, tiny_data_dir)


@pytest.mark.slow
def test_the_search_step_breaks_only_at_the_recomputed_rows(tiny_data_dir):
    """With ``mode.recompute`` (activation checkpointing of each target's ops) the graph breaks
    there: the checkpoint's function counts its calls (the recomputation keeps the batch norms'
    running statistics), a side effect dynamo does not trace into a checkpoint."""
    import torch._dynamo

    from atrc_exp.engine.step import make_forward_loss
    from atrc_exp.models import build_model

    cfg = compose_cfg(tiny_overrides(tiny_data_dir, context="search", mode="search"))
    model = build_model(cfg).train()
    criterion = paper_loss(
        list(cfg.tasks.names), 0.8, torch.nn.functional.normalize(torch.randn(40, 3), dim=1)
    )
    B, H, W = 1, 48, 64
    batch = {
        "image": torch.randn(B, 3, H, W),
        "semseg": torch.randint(0, 7, (B, H, W)),
        "depth": torch.rand(B, 1, H, W) + 1,
        "normals": torch.nn.functional.normalize(torch.randn(B, 3, H, W), dim=1),
        "edge": (torch.rand(B, 1, H, W) > 0.9).float(),
    }
    torch._dynamo.reset()
    try:
        explain = torch._dynamo.explain(make_forward_loss(model, criterion))(batch["image"], batch)
    finally:
        torch._dynamo.reset()
    assert explain.graph_break_count > 0
    for r in explain.break_reasons:
        assert any("relational_head.py" in f.filename for f in r.user_stack), r.reason
        assert "side effect" in r.reason or "checkpoint" in r.reason, r.reason


# ------------------------------------------------------------------------------------ checkpoints


def test_incomplete_checkpoint_folders_are_never_resumed_from(tiny_data_dir, tmp_path, caplog):
    over = {"trainer.max_steps": 2, "trainer.checkpoint_interval": 1, "trainer.keep_checkpoints": 5}
    fit(compose_cfg(tiny_overrides(tiny_data_dir, **over)), tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002"]
    # a kill while saving step 3 leaves .tmp_step_3; a folder without meta.json is incomplete too
    (ckpts / ".tmp_step_00000003").mkdir()
    (ckpts / ".tmp_step_00000003" / "meta.json").write_text(json.dumps({"step": 3}))
    (ckpts / "step_00000004").mkdir()
    (ckpts / "step_00000004" / "pytorch_model.bin").write_bytes(b"partial")
    over = {**over, "trainer.max_steps": 3}
    with caplog.at_level("INFO", logger="atrc_exp.engine.trainer"):
        fit(compose_cfg(tiny_overrides(tiny_data_dir, **over)), tmp_path)
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].endswith("step_00000002 at step 2"), resumed
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # resumed from step 2, trained step 3
    assert (ckpts / "step_00000003" / "meta.json").is_file()


def test_rotation_keeps_exactly_the_newest_checkpoints(tiny_data_dir, tmp_path):
    over = {"trainer.max_steps": 5, "trainer.checkpoint_interval": 1, "trainer.keep_checkpoints": 2}
    fit(compose_cfg(tiny_overrides(tiny_data_dir, **over)), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000005"]


# -------------------------------------------------------------------------------- two processes


def test_batchnorm_becomes_syncbatchnorm_with_several_cuda_processes():
    from types import SimpleNamespace

    from atrc_exp.engine.trainer import convert_batchnorm

    def model():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    two_gpus = SimpleNamespace(num_processes=2, device=torch.device("cuda", 0))
    assert isinstance(convert_batchnorm(model(), two_gpus)[1], torch.nn.SyncBatchNorm)
    for acc in (
        SimpleNamespace(num_processes=1, device=torch.device("cuda", 0)),
        SimpleNamespace(num_processes=2, device=torch.device("cpu")),
    ):
        assert type(convert_batchnorm(model(), acc)[1]) is torch.nn.BatchNorm2d  # (SyncBN needs CUDA)


def test_two_processes_follow_the_poly_schedule(tiny_data_dir, tmp_path):
    """torchrun, 2 gloo processes, 4 steps: the logged learning rate at step k (after k scheduler
    steps) is lr·(1 − k/max_steps)^0.9, and the log names both processes and the BatchNorm mode."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lr, max_steps = 0.01, 4
    over = tiny_overrides(
        tiny_data_dir,
        **{
            "trainer.max_steps": max_steps,
            "trainer.cpu": "true",
            "trainer.lr": lr,
            "trainer.val_interval": 4,
        },
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "atrc_exp.train", f"hydra.run.dir={tmp_path}", *over,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for x in lines:
        k = x["step"]
        assert x["train/lr"] == pytest.approx(lr * (1 - k / max_steps) ** 0.9, rel=1e-9, abs=1e-12), k
    log = (tmp_path / "train.log").read_text()
    assert "2 process(es)" in log and "BatchNorm statistics are per process" in log
