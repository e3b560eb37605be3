"""Float64, our verification mode: whole training steps on the CPU give the same numbers whichever
fast path is on or off.

Three SGD steps (momentum, weight decay, as in training) of HRNet18 with a context head, in
float64 end to end — model ``.double()``, every loss, the local-attention op. Each setting — the
local-attention kernel, channels_last, ``torch.compile``, the search's recomputation — is
compared with the plain model (PyTorch's local attention, no recomputation; its own equality to
the original is ``tests/test_original.py``): losses to 1e-10 and every weight after the three steps to 1e-9 of its scale. Float32 would hide real differences in rounding: on a 48×64 input HRNet's train-mode
batch norm over a few values per channel amplifies a 1e-7 change into percents within three steps;
in float64 rounding stays near 1e-13.

The BN scales are randomised first: ``out_proj``'s BN starts at zero, which makes every CP block's
gradient zero at the first step and would let a broken context head pass.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json

import pytest
import torch
from conftest import compose_cfg, paper_loss, randomise_head

from atrc_exp.engine.fast_paths import apply_fast_paths, compile_step
from atrc_exp.engine.search import entropy_term, search_blocks
from atrc_exp.engine.step import make_forward_loss
from atrc_exp.models import build_model

TASKS = ["semseg", "depth", "normals", "edge"]
B, H, W, STEPS = 2, 48, 64, 3


@pytest.fixture(scope="module")
def genotype_file(all_contexts_genotype):
    return all_contexts_genotype


def _overrides(context: str, genotype_file) -> list[str]:
    base = ["dataset=nyud", "backbone.pretrained=false"]
    if context == "search":
        return base + ["context=search", "mode=search"]
    return base + ["context=atrc", f"context.genotype={genotype_file}"]


def _backends(name: str) -> None:
    """The local attention on ``name``'s backend (``auto``: the C++ kernel, or ``torch``)."""
    importlib.import_module("atrc_exp.ops.local_attention").set_backend(name)


@pytest.fixture(autouse=True)
def _restore_backends():
    yield
    _backends("auto")


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normals = torch.randn(B, 3, H, W, generator=g, dtype=torch.float64)
    semseg = torch.randint(0, 40, (B, H, W), generator=g)
    semseg[:, :4] = 255  # some ignored pixels
    return {
        "image": torch.randn(B, 3, H, W, generator=g, dtype=torch.float64),
        "semseg": semseg,
        "depth": torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) * 9.5 + 0.5,
        "normals": normals / normals.norm(dim=1, keepdim=True),
        "edge": (torch.rand(B, 1, H, W, generator=g, dtype=torch.float64) > 0.9).double(),
    }


def _train(overrides: list[str], fast: bool, extra: list[str] = ()) -> dict:
    """Three float64 SGD steps; ``fast``: with the trainer's step function (the local-attention
    kernel, recomputation in the search), else the plain model with PyTorch's ops. ``extra``: further trainer overrides (fast paths)."""
    cfg = compose_cfg(overrides + list(extra))
    torch.manual_seed(0)
    model = build_model(cfg)
    randomise_head(model)
    model = apply_fast_paths(model.double(), cfg).train()
    _backends("auto" if fast else "torch")
    centroids = torch.tensor(
        json.loads(
            (importlib.resources.files("atrc_exp") / "resources" / "nyud_normal_centroids.json").read_text()
        )["centroids"]
    )
    criterion = paper_loss(TASKS, 0.8, normal_centroids=centroids)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batch = _batch()
    # the trainer's step function: compiled as a whole with trainer.compile (parts [step])
    if fast:
        forward_loss = compile_step(
            make_forward_loss(model, criterion, "trainer.channels_last=true" in extra), cfg
        )
    else:
        if hasattr(model.head, "atrc_module"):
            model.head.atrc_module.recompute = False
        forward_loss = lambda image, batch: criterion(model(image), batch)  # noqa: E731
    blocks = list(search_blocks(model).values()) if "context=search" in overrides else []
    losses, head_grad = [], None
    torch.manual_seed(1)  # dropout masks, Gumbel noise
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss, _ = forward_loss(batch["image"], batch)
        if blocks:
            loss = loss + 0.01 * entropy_term(blocks)
        assert loss.dtype == torch.float64
        loss.backward()
        if step == 0:
            cp = [p.grad for n, p in model.named_parameters() if ".cp_blocks." in n and p.grad is not None]
            head_grad = float(sum(g.abs().sum() for g in cp))
        opt.step()
        losses.append(loss.detach())
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    return {"losses": torch.stack(losses), "params": params, "head_grad": head_grad}


_plain_cache: dict = {}


def _plain(context: str, genotype_file) -> dict:
    if context not in _plain_cache:
        _plain_cache[context] = _train(_overrides(context, genotype_file), fast=False)
    return _plain_cache[context]


def _assert_same(run: dict, ref: dict) -> None:
    torch.testing.assert_close(run["losses"], ref["losses"], rtol=1e-10, atol=0)
    assert run["head_grad"] > 0 and ref["head_grad"] > 0  # the context head did learn
    assert run["head_grad"] == pytest.approx(ref["head_grad"], rel=1e-9)
    for k, p in ref["params"].items():
        scale = max(1.0, float(p.abs().max()))
        torch.testing.assert_close(run["params"][k], p, rtol=0, atol=1e-9 * scale, msg=k)


def _compiled(fn):
    """``fn()`` with dynamo's caches cleared before and after, inductor's random numbers from the
    eager generator (the same dropout masks)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        return fn()
    finally:
        inductor_config.fallback_random = old
        torch._dynamo.reset()


_COMPILE = ["trainer.compile.enabled=true"]


@pytest.mark.parametrize(
    ("context", "extra"),
    [
        pytest.param("atrc", [], id="atrc-kernel"),
        pytest.param("search", [], id="search-kernel+recompute"),
        pytest.param("atrc", ["trainer.channels_last=true"], id="atrc-channels_last"),
        pytest.param("search", ["trainer.channels_last=true"], id="search-channels_last"),
        pytest.param("atrc", [*_COMPILE, "trainer.compile.backend=aot_eager"], id="atrc-traced"),
        pytest.param(
            "atrc", [*_COMPILE, "trainer.compile.fullgraph=true"], id="atrc-inductor", marks=pytest.mark.slow
        ),
        pytest.param(
            "atrc",
            [*_COMPILE, "trainer.compile.regional=true", "trainer.compile.parts=[backbone,head]"],
            id="atrc-inductor-regional",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "search",
            [*_COMPILE, "trainer.compile.backend=aot_eager"],
            id="search-traced",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_float64_training_steps_equal_whatever_the_fast_paths(context, extra, genotype_file):
    ref = _plain(context, genotype_file)
    assert all(p.dtype == torch.float64 for p in ref["params"].values())
    run = _compiled(lambda: _train(_overrides(context, genotype_file), fast=True, extra=extra))
    _assert_same(run, ref)
