"""Shared fixtures: offline W&B, few threads, tiny synthetic configs composed with Hydra."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from atrc_exp.config import CONF_DIR  # noqa: E402  (importing atrc_exp registers its resolvers)

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]


_G = REPO / "genotypes"
#: our overrides of each of the original's nine configurations (state_dict_keys.json, the oracles' cases)
ORIGINAL_CONFIGS: dict[str, list[str]] = {
    "nyud18_mt": ["dataset=nyud", "context=none"],
    "nyud18_atrc": ["dataset=nyud", "context=atrc", f"context.genotype={_G / 'nyud_hrnet18.json'}"],
    "nyud18_global": ["dataset=nyud", "context=global"],
    "nyud18_local": ["dataset=nyud", "context=local"],
    "nyud18_tlabel": ["dataset=nyud", "context=tlabel"],
    "nyud18_slabel": ["dataset=nyud", "context=slabel"],
    "pascal18_atrc": [
        "dataset=pascal_context",
        "context=atrc",
        f"context.genotype={_G / 'pascal_hrnet18.json'}",
    ],
    "nyud48_atrc": [
        "dataset=nyud",
        "backbone=hrnet48",
        "context=atrc",
        f"context.genotype={_G / 'nyud_hrnet48.json'}",
    ],
    "nyud18_search_argmax": ["dataset=nyud", "context=search", "mode=search"],
}


def tiny_overrides(data_dir: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long run on a tiny synthetic dataset in ``data_dir``."""
    base = {
        "paths.data_dir": str(data_dir),
        "dataset.generator.n_train": 8,
        "dataset.generator.n_val": 4,
        "dataset.generator.height": 48,
        "dataset.generator.width": 64,
        "dataset.crop_size": "[48,64]",
        "trainer.batch_size": 2,
        "trainer.max_steps": 4,
        "trainer.val_interval": 2,
        "trainer.num_workers": 0,
        "trainer.progress": "false",
        "trainer.log_interval": 1,
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def compose_cfg(overrides: list[str] | None = None):
    """Compose ``conf/train.yaml`` with ``overrides`` (Hydra's compose API)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


class HostReads:
    """Counts the tensor reads on the host — each one makes the host wait for a GPU — while
    active: ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``int()``, ``float()``) and
    ``aten.equal`` through a dispatch mode, and ``tolist()`` / ``numpy()`` (which read CPU memory
    without dispatching). ``reads`` lists them by name."""

    OPS = ("aten::_local_scalar_dense", "aten::equal")

    def __init__(self):
        self.reads: list[str] = []

    def __enter__(self) -> HostReads:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._schema.name in HostReads.OPS:
                    outer.reads.append(func._schema.name)
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        self._saved = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy")}
        for name, real in self._saved.items():

            def counted(t, *a, real=real, name=name, **k):
                self.reads.append(name)
                return real(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._mode.__exit__(*exc)


#: A genotype with every context type (0 none, 1 global, 2 local, 3 t-label, 4 s-label) on the
#: NYUD tasks, each at least three times.
ALL_CONTEXTS = {
    "semseg": {"semseg": 1, "depth": 2, "normals": 3, "edge": 4},
    "depth": {"semseg": 2, "depth": 3, "normals": 4, "edge": 1},
    "normals": {"semseg": 3, "depth": 4, "normals": 1, "edge": 2},
    "edge": {"semseg": 4, "depth": 1, "normals": 2, "edge": 0},
}


@pytest.fixture(scope="session")
def all_contexts_genotype(tmp_path_factory) -> Path:
    """:data:`ALL_CONTEXTS` as a genotype file in the original format."""
    import json

    path = tmp_path_factory.mktemp("genotype") / "all_contexts.json"
    path.write_text(json.dumps({"data": ALL_CONTEXTS, "step": 0}))
    return path


def randomise_head(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial affine BN parameters (``out_proj`` starts at zero, which would make every CP
    block's gradient zero and let a broken context head pass) and larger logits weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, torch.nn.Conv2d) and "logits" in name:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (generated once per test session)."""
    from atrc_exp.data.layouts import ensure_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    ensure_synthetic_dataset(root, n_train=8, n_val=4, height=48, width=64, seed=0, progress=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests (faster, much faster on a loaded
    machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def torch_local_attention():
    """The pure-PyTorch local attention (no extension build in the test)."""
    from atrc_exp.ops import get_backend, set_backend

    old = get_backend()
    set_backend("torch")
    yield
    set_backend(old)


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    # an in-process wandb.init leaves $WANDB_SERVICE (its service's socket) in the environment; a
    # subprocess would join that service, where a run killed with the subprocess stays "in use"
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    (tmp_path / "wandb").mkdir()


def paper_loss(tasks, edge_pos_weight: float = 0.8, normal_centroids=None, num_classes: int = 40):
    """``MultiTaskLoss`` of the paper's named tasks ``tasks`` with a dataset's numbers (edge
    ``pos_weight``, normals aux centroids K×3, semseg classes)."""
    from atrc_exp.losses import MultiTaskLoss
    from atrc_exp.task_kinds import paper_tasks

    opts = {"edge": {"edge_pos_weight": edge_pos_weight}, "semseg": {"classes": num_classes}}
    if normal_centroids is not None:
        opts["normals"] = {"centroids": torch.as_tensor(normal_centroids).float().numpy()}
    return MultiTaskLoss(paper_tasks(tasks, **opts))


def paper_metrics(
    tasks, num_semseg_classes: int = 40, edge_pos_weight: float = 0.8, edge_max_dist=0.011, **settings
):
    """``MultiTaskMetrics`` of the paper's named tasks ``tasks`` (``settings``: ``edge_thresholds``,
    ``edge_eval_workers``, ``edge_nms``, ``edge_odsf``)."""
    from atrc_exp.metrics import MultiTaskMetrics
    from atrc_exp.task_kinds import MeterSettings, paper_tasks

    opts = {
        "edge": {"edge_pos_weight": edge_pos_weight, "edge_max_dist": edge_max_dist},
        "semseg": {"classes": num_semseg_classes},
    }
    return MultiTaskMetrics(paper_tasks(tasks, **opts), MeterSettings(**settings))
