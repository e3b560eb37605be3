"""Numeric faults, preemption signals, bad input (one line, exit 2) and failing sweep jobs."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_cfg, tiny_overrides

from atrc_exp.config import ConfigError
from atrc_exp.engine import fit
from atrc_exp.engine.faults import FaultInjector, NonFiniteError, PreemptionGuard

# ---------------------------------------------------------------- numeric faults


def _ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def test_nonfinite_loss_stops_naming_step_and_term(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATRC_FAULT_INJECT", "nan:depth@3")
    cfg = compose_cfg(
        tiny_overrides(tiny_data_dir, **{"trainer.max_steps": 4, "trainer.checkpoint_interval": 1})
    )
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss at step 3 \(terms: loss/depth\).*step_00000002"
    ):
        fit(cfg, tmp_path)
    assert _ckpts(tmp_path) == ["step_00000001", "step_00000002"]  # the last good one stays


def test_nonfinite_gradient_stops_naming_parameters(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATRC_FAULT_INJECT", "nan_grad@2")
    cfg = compose_cfg(tiny_overrides(tiny_data_dir, **{"trainer.max_steps": 3}))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 2 \(parameters: backbone\."):
        fit(cfg, tmp_path)


def test_skip_mode_drops_the_update_and_counts_it(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATRC_FAULT_INJECT", "nan:image@2,nan_grad@3")
    cfg = compose_cfg(
        tiny_overrides(tiny_data_dir, **{"trainer.max_steps": 4, "trainer.on_nonfinite": "skip"})
    )
    metrics = fit(cfg, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["skipped_steps"] == 2 and saved["step"] == 4
    assert all(np.isfinite(v) for v in metrics.values())
    state = torch.load(tmp_path / "checkpoints" / "step_00000004" / "pytorch_model.bin", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    logged = [
        json.loads(x)["train/skipped_steps"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()
    ]
    assert logged == [0, 1, 2, 2]


def test_skip_mode_gives_up_after_max_skipped_steps(tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ATRC_FAULT_INJECT", "nan:image@1,nan:image@2")
    cfg = compose_cfg(
        tiny_overrides(
            tiny_data_dir,
            **{"trainer.max_steps": 4, "trainer.on_nonfinite": "skip", "trainer.max_skipped_steps": 1},
        )
    )
    with pytest.raises(NonFiniteError, match="2 steps skipped, more than trainer.max_skipped_steps=1"):
        fit(cfg, tmp_path)


def test_fault_injection_spec_is_checked():
    assert FaultInjector("").faults == []
    assert FaultInjector("sigkill@5, nan:depth@2").faults == [("sigkill", 5), ("nan:depth", 2)]
    with pytest.raises(ValueError, match="<fault>@<step>"):
        FaultInjector("sigkill")


# ---------------------------------------------------------------- preemption signals


def test_preemption_guard_defers_signals_and_hands_over():
    seen = []
    prev = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.requested() and guard.signum == signal.SIGUSR1
            assert seen == []  # not passed on before the checkpoint
            guard.hand_over()  # e.g. submitit's handler, which re-queues the job
            assert seen == [signal.SIGUSR1]
        assert (
            signal.getsignal(signal.SIGUSR1) is not None and signal.getsignal(signal.SIGUSR1) != guard._handle
        )
    finally:
        signal.signal(signal.SIGUSR1, prev)


# ---------------------------------------------------------------- bad input: one line, exit 2


def _run_main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run ``atrc-train`` in-process; returns (exit code, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from atrc_exp import train

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["atrc-train", *argv])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as e:
        train.main()
    GlobalHydra.instance().clear()
    return int(e.value.code), capsys.readouterr().err


def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    root = dst / "NYUD_MT"
    name = (root / "gt_sets" / "train.txt").read_text().split()[0]
    if how == "missing":
        (root / "depth" / f"{name}.npy").unlink()
    elif how == "missized":
        np.save(root / "depth" / f"{name}.npy", np.ones((5, 5), np.float32))
    elif how == "unreadable":
        (root / "depth" / f"{name}.npy").write_bytes(b"not a numpy file")
    return dst


def _file_as_folder(tmp_path: Path) -> Path:
    """A log dir whose parent is a regular file (unwritable even for root)."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "logs"


def _bad_weights(tmp_path: Path) -> Path:
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {"model.backbone.nope.weight": torch.zeros(3)}}, path)
    return path


BAD_INPUTS = {
    "missing data dir": (
        lambda d, t: {"dataset": "nyud", "paths.data_dir": t / "nowhere"},
        r"NYUD_MT.*atrc-data fetch",
    ),
    "empty data dir": (
        lambda d, t: {"dataset": "nyud", "paths.data_dir": (t / "empty").mkdir() or t / "empty"},
        r"NYUD_MT",
    ),
    "partial data dir": (
        lambda d, t: {"paths.data_dir": _damaged_copy(d, t / "partial", "missing")},
        r"missing file .*\.npy.*train",
    ),
    "mis-sized file": (
        lambda d, t: {
            "paths.data_dir": _damaged_copy(d, t / "missized", "missized"),
            "trainer.num_workers": 2,
        },
        r"size.*train",
    ),
    "unreadable file": (
        lambda d, t: {"paths.data_dir": _damaged_copy(d, t / "unreadable", "unreadable")},
        r"\.npy",
    ),
    "genotype for other tasks": (
        lambda d, t: {"context": "atrc", "context.genotype": REPO / "genotypes" / "pascal_hrnet18.json"},
        r"genotype",
    ),
    "task not in the dataset": (lambda d, t: {"tasks": "human_parts"}, r"'human_parts' is not in dataset"),
    "weights with wrong keys": (
        lambda d, t: {"trainer.init_from_original": _bad_weights(t)},
        r"unexpected key.*backbone\.nope\.weight",
    ),
    "search context in distill mode": (
        lambda d, t: {"context": "search"},
        r"context=search goes with mode=search",
    ),
    "non-writable output dir": (
        lambda d, t: {"paths.log_dir": _file_as_folder(t)},
        r"cannot write the run directory",
    ),
    "unknown part to compile": (
        lambda d, t: {"trainer.compile.enabled": "true", "trainer.compile.parts": "[neck]"},
        r"trainer.compile.parts=\['neck'\]: must be list of step\|backbone\|head",
    ),
    "forced CUDA op without CUDA": (
        lambda d, t: {"ops.local_attention.backend": "cuda", "context": "local"},
        r"backend=cuda cannot run on this job's device \(cpu\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_with_exit_2(case, tiny_data_dir, tmp_path, capsys, monkeypatch):
    make, pattern = BAD_INPUTS[case]
    extra = {
        "paths.log_dir": tmp_path / "logs",
        **{k: str(v) for k, v in make(tiny_data_dir, tmp_path).items()},
    }
    over = tiny_overrides(tiny_data_dir, **extra)
    if extra.get("dataset") == "nyud":  # the generator settings exist only for synthetic data
        over = [o for o in over if not o.startswith("dataset.generator.")]
    code, err = _run_main(over, capsys, monkeypatch)
    # no DataLoader worker outlives the failed run (they ignore SIGTERM: a leftover one would hang
    # the interpreter's exit)
    assert not multiprocessing.active_children()
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert __import__("re").search(pattern, lines[0]), lines[0]


def test_batch_not_divisible_by_processes(tiny_data_dir, tmp_path, monkeypatch):
    import accelerate

    from atrc_exp.engine import trainer

    class TwoProcesses(accelerate.Accelerator):
        num_processes = 2

    monkeypatch.setattr(trainer, "Accelerator", TwoProcesses)
    cfg = compose_cfg(tiny_overrides(tiny_data_dir, **{"trainer.batch_size": 3}))
    with pytest.raises(ConfigError, match="batch_size=3 .* not divisible by the 2 processes"):
        fit(cfg, tmp_path)


def test_missing_cuda_toolchain_when_the_cuda_op_is_forced(monkeypatch):
    from atrc_exp.engine.trainer import check_backend
    from atrc_exp.ops import build

    def no_nvcc(kind, verbose=False):
        raise build.ExtensionBuildError("nvcc not found")

    monkeypatch.setattr(build, "get_extension", no_nvcc)
    with pytest.raises(
        ConfigError, match=r"forced but its kernel is unavailable \(nvcc not found\).*CUDA toolkit"
    ):
        check_backend("cuda", torch.device("cuda"))


def test_cli_bad_input_has_no_traceback(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "atrc_exp.train",
            "dataset=nyud",
            f"paths.data_dir={tmp_path}/none",
            f"paths.log_dir={tmp_path}/logs",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "atrc-data fetch" in out.stderr, out.stderr


# ---------------------------------------------------------------- sweeps


def _sweep(tmp_path: Path, data_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        sys.executable,
        "-m",
        "atrc_exp.train",
        "--multirun",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        # job 0 fails after its Accelerator exists; job 1 must start with fresh Accelerate state
        f"trainer.init_from_original={tmp_path / 'missing.ckpt'},null",
        *tiny_overrides(data_dir, **{"trainer.max_steps": 1, "tasks": "depth"}),
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_sweep_goes_on_after_a_failed_job_and_reports_it(tiny_data_dir, tmp_path):
    out = _sweep(tmp_path, tiny_data_dir, [])
    assert out.returncode == 1, out.stderr[-3000:]
    sweep = tmp_path / "sweep"
    failed = json.loads((sweep / "0" / "FAILED.json").read_text())
    assert "missing.ckpt" in failed["error"]
    assert (sweep / "1" / "metrics.json").is_file()
    assert "1 of 2 job(s) failed" in out.stderr and "Traceback" not in out.stderr


def test_sweep_can_stop_at_the_first_failure(tiny_data_dir, tmp_path):
    out = _sweep(tmp_path, tiny_data_dir, ["continue_on_failure=false"])
    assert out.returncode == 2
    assert not (tmp_path / "sweep" / "1").exists()
