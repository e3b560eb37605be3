"""Fast training paths (atrc_exp.engine.fast_paths): off by default, switched by the config.

Whether each fast path gives the same numbers as the plain path is checked in float64, to 1e-10,
by ``tests/test_float64.py``. Here: the switches, the loader settings, compile options, and bf16
autocast, which must run and stay finite (a few SGD steps of HRNet18 + the ATRC head, published
NYUD genotype, on a fixed random batch).
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, compose_cfg, paper_loss, tiny_overrides

from atrc_exp.engine.fast_paths import (
    apply_fast_paths,
    compile_options,
    prepare_input,
    train_loader_kwargs,
)
from atrc_exp.models import build_model

GENOTYPE = str(REPO / "genotypes" / "nyud_hrnet18.json")
ATRC = ["dataset=nyud", "backbone.pretrained=false", "context=atrc", f"context.genotype={GENOTYPE}"]
B, H, W = 2, 64, 96
STEPS = 3
LR = 1e-4


def _batch(classes: int = 40) -> dict:
    g = torch.Generator().manual_seed(0)
    normals = torch.randn(B, 3, H, W, generator=g)
    return {
        "image": torch.randn(B, 3, H, W, generator=g),
        "semseg": torch.randint(0, classes, (B, H, W), generator=g),
        "depth": torch.rand(B, 1, H, W, generator=g) * 9.5 + 0.5,
        "normals": normals / normals.norm(dim=1, keepdim=True),
        "edge": (torch.rand(B, 1, H, W, generator=g) > 0.9).float(),
    }


def _params(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone().contiguous() for k, p in model.named_parameters()}


def _train(overrides: list[str], bf16: bool = False, steps: int = STEPS) -> dict:
    """Losses of ``steps`` SGD steps, the parameters before and after the first step, the model."""
    cfg = compose_cfg(ATRC + overrides)
    torch.manual_seed(0)
    model = apply_fast_paths(build_model(cfg), cfg).train()
    cent = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    criterion = paper_loss(list(cfg.tasks.names), 0.8, normal_centroids=cent / cent.norm(dim=1, keepdim=True))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    batch = _batch()
    image = prepare_input(batch["image"], cfg.trainer.channels_last)
    out = {"init": _params(model), "losses": [], "model": model}
    torch.manual_seed(1)  # dropout masks
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = criterion(model(image), batch)
        loss.backward()
        opt.step()
        out["losses"].append(loss.detach())
        if i == 0:
            out["first"] = _params(model)
    out["losses"] = torch.stack(out["losses"])
    out["final"] = _params(model)
    return out


@pytest.fixture(scope="module")
def plain():
    return _train([])


def test_defaults_are_off_and_keep_the_loader_settings():
    cfg = compose_cfg([])
    assert not cfg.trainer.channels_last and compile_options(cfg) is None
    model = build_model(compose_cfg(["backbone.pretrained=false", "context=none"]))
    assert apply_fast_paths(model, cfg) is model
    assert model.backbone._compiled_call_impl is None
    assert next(model.parameters()).is_contiguous()
    tc = cfg.trainer
    assert train_loader_kwargs(tc, torch.device("cpu")) == {
        "num_workers": int(tc.num_workers),
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 2,
    }
    assert train_loader_kwargs(tc, torch.device("cuda"))["pin_memory"] is True
    no_workers = compose_cfg(["trainer.num_workers=0", "trainer.pin_memory=true"]).trainer
    assert train_loader_kwargs(no_workers, torch.device("cpu")) == {"num_workers": 0, "pin_memory": True}


def test_cudnn_benchmark_follows_the_config():
    """trainer.cudnn_benchmark sets torch.backends.cudnn.benchmark both ways (a multirun job with
    it off after one with it on must not inherit it); off by default."""
    model = build_model(compose_cfg(["backbone.pretrained=false", "context=none"]))
    old = torch.backends.cudnn.benchmark
    try:
        apply_fast_paths(model, compose_cfg(["trainer.cudnn_benchmark=true"]))
        assert torch.backends.cudnn.benchmark is True
        apply_fast_paths(model, compose_cfg([]))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = old


def _bench_train():
    """The ``benchmarks/bench_train.py`` module (the benchmarks are scripts, not a package)."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    return bench_train


def test_bench_plans_gpu_only_paths_on_cuda_only():
    import argparse

    bench_train = _bench_train()
    args = argparse.Namespace(
        steps=1, threads=2, contexts=["none", "atrc", "search"], paths=list(bench_train.PATHS),
        fast_contexts=["none", "atrc"], warmup=1,
    )  # fmt: skip
    specs = [r for r in bench_train.plan_rows(args, "cpu") if "skipped" not in r]
    cpu = {s["path"] for s in specs}
    assert cpu == set(bench_train.PATHS) - set(bench_train.GPU_ONLY_PATHS)
    assert "fp32" in cpu and "compile" in cpu and "channels_last" in cpu
    # search: fp32 and the search-only paths, the other paths on the fast contexts only
    assert {s["path"] for s in specs if s["context"] == "search"} == {"fp32", *bench_train.SEARCH_ONLY_PATHS}
    assert {s["context"] for s in specs if s["path"] == "no_recompute"} == {"search"}
    assert bench_train.compose("search", bench_train.PATHS["no_recompute"]).mode.recompute is False
    assert bench_train.compose("search", bench_train.PATHS["fp32"]).mode.recompute is True
    # every path's overrides compose into what it names (GPU rows included: they run nowhere here);
    # compile rows compile the step as the trainer does (trainer.compile.parts=[step])
    for name, spec in bench_train.PATHS.items():
        cfg = bench_train.compose("atrc", spec)
        opts = compile_options(cfg)
        assert (opts is not None) == bool(spec.get("compile")), name
        assert cfg.trainer.mixed_precision == ("bf16" if "bf16" in name else "no"), name
        assert cfg.trainer.channels_last == (name == "channels_last"), name
        if opts is not None:
            assert opts["parts"] == ("step",) and not opts["regional"], name
            assert opts["mode"] == ("reduce-overhead" if "cudagraphs" in name else None), name


def test_bench_counts_the_ops_a_step_dispatches_without_views():
    bench_train = _bench_train()
    x = torch.randn(4, 6, requires_grad=True)

    def step(i):  # mul, sum, ones_like (the backward's seed), mul; views and detach not counted
        (x.view(24) * float(i)).t().sum().backward()

    assert bench_train.dispatched_ops(step, 2) == {"aten_ops_per_step": 4} and x.grad is not None
    assert bench_train.dispatched_ops(lambda i: x.view(24).t().unsqueeze(0) * 2, 0)["aten_ops_per_step"] == 1
    assert "aten_ops_error" in bench_train.dispatched_ops(lambda i: 1 / 0, 0)


def _md_cells(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header cells, body rows' cells) of the one Markdown table in ``lines``."""
    table = [ln for ln in lines if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table]
    return cells[0], cells[1:]


def test_bench_markdown_table_has_one_row_per_context_and_path():
    """``train_markdown``: RESULTS.md's format (heading with what, machine and date; the command;
    the columns defined), one row per (context, path) in order, timings formatted, and rows
    without timings saying why (timeout, not run, error), none dropped."""
    bench_train = _bench_train()

    def timed(context, path, step_ms, host_ms, kernel_ms):
        return dict(
            device="cuda", context=context, path=path, size=(8, 425, 560), step_s=step_ms / 1e3,
            best_step_s=step_ms / 1e3 - 0.002, host_s=host_ms / 1e3, images_per_s=8e3 / step_ms,
            peak_mem_mib=9001.4, first_step_s=1.54, gpu_kernel_s=kernel_ms / 1e3,
            gpu_kernels_per_step=5696.0, peak_mem_kind="cuda max_memory_allocated",
        )  # fmt: skip

    size = dict(device="cuda", size=(8, 425, 560))
    rows = [
        timed("none", "fp32", 93, 60, 60) | {"aten_ops_per_step": 3893},
        timed("atrc", "fp32", 162, 41, 127),
        timed("atrc", "bf16", 81, 40.04, 104),
        {**size, "context": "search", "path": "fp32", "error": "timeout (120 s)", "timed_out": True},
        {**size, "context": "atrc", "path": "compile", "error": "exit 1: RuntimeError: boom"},
        {**size, "context": "search", "path": "bf16+cudagraphs", "skipped": "not run: the time budget (500 s) was spent"},
        {**timed("none", "bf16+cudagraphs", 40, 5, 30), "gpu_kernel_error": "timeout (60 s)"},
    ]  # fmt: skip
    del rows[-1]["gpu_kernel_s"]
    meta = dict(
        machine="NVIDIA H200", date="2026-12-02T10:00:00", torch="2.11.0", python="3.12.3", cpu_count=16,
        steps=10, warmup=3, parallel_compile=6,
    )  # fmt: skip
    lines = bench_train.train_markdown(rows, meta, "python benchmarks/bench_train.py --devices cuda")
    text = "\n".join(lines)
    assert lines[0].startswith("### Training step") and lines[0].endswith("NVIDIA H200, 2026-12-02")
    assert "Command: `python benchmarks/bench_train.py --devices cuda`" in text
    assert "until the step function returns, before `torch.cuda.synchronize()`" in text  # host time defined
    assert "`torch.cuda.max_memory_allocated`" in text and "compiled up to 6 at a time" in text
    header, body = _md_cells(lines)
    assert header == list(bench_train.MD_COLUMNS)
    cols = ("step ms", "images/s", "× none", "peak MiB", "ATen ops/step", "kernel ms/step", "host ms/step")
    for col in cols:
        assert sum(col in c for c in header) == 1, col
    assert [(c[0], c[1]) for c in body] == [(r["context"], r["path"]) for r in rows]
    assert all(len(c) == len(header) for c in body)
    by = {(c[0], c[1]): dict(zip(header[2:], c[2:], strict=True)) for c in body}
    assert list(by["atrc", "bf16"].values()) == [
        "cuda", "8×425×560", "81.0", "79.0", "98.77", "-", "2.00×", "9001", "-", "40.0", "104.0 (5696)", "1.5"
    ]  # fmt: skip
    assert by["atrc", "fp32"]["× none"] == "1.74×"  # 162 / 93: the context's cost, same path
    assert by["none", "fp32"]["speed-up vs fp32"] == "-"  # no speed-up of fp32 against itself
    assert by["none", "fp32"]["ATen ops/step"] == "3893"
    assert list(by["search", "fp32"].values())[2:] == ["timeout (120 s)"] + [""] * 9
    assert by["atrc", "compile"]["step ms (median)"] == "error: exit 1: RuntimeError: boom"
    assert by["search", "bf16+cudagraphs"]["step ms (median)"] == "not run: the time budget (500 s) was spent"
    assert by["none", "bf16+cudagraphs"]["kernel ms/step (kernels)"] == "timeout (60 s)"  # profile cut short


def test_bench_plan_rows_reports_what_is_not_timed():
    """Every (context, path) asked for is planned: the compile rows with ``--skip-compile`` and
    the GPU-only paths on the CPU are rows saying "skipped on cpu", not dropped; ``--size`` sets
    the size; eager rows keep the warm-up, compile rows get one more."""
    import argparse

    bench_train = _bench_train()
    args = argparse.Namespace(
        steps=1, threads=2, contexts=["none", "atrc", "search"], warmup=0, size=(1, 64, 96), skip_compile=True,
        paths=["fp32", "bf16", "compile", "bf16+cudagraphs"], fast_contexts=["none", "atrc", "search"],
    )  # fmt: skip
    rows = bench_train.plan_rows(args, "cpu")
    assert [(r["context"], r["path"]) for r in rows] == [
        (c, p) for p in args.paths for c in args.contexts
    ]  # fmt: skip
    assert all(r["size"] == (1, 64, 96) for r in rows)
    skipped = {(r["context"], r["path"]): r["skipped"] for r in rows if "skipped" in r}
    assert skipped == {
        (c, p): "skipped on cpu" for c in args.contexts for p in ("compile", "bf16+cudagraphs")
    }
    timed = [r for r in rows if "skipped" not in r]
    assert all(r["warmup"] == 0 and r["steps"] == 1 for r in timed) and len(timed) == 6
    args.skip_compile = False
    compiled = [r for r in bench_train.plan_rows(args, "cpu") if r["path"] == "compile"]
    assert all(r["warmup"] == 1 and "skipped" not in r for r in compiled)
    assert bench_train.display_command(
        "benchmarks/bench_train.py", ["--steps", "1", "--markdown", "/tmp/x.md", "--machine", "My GPU", "--out", "o"]
    ) == "python benchmarks/bench_train.py --steps 1 --out o"  # fmt: skip


def _tiny_spec(**extra) -> dict:
    return (
        dict(device="cpu", context="none", path="fp32", size=(1, 64, 96), threads=1, steps=1, warmup=1)
        | extra
    )


def test_bench_worker_past_its_time_limit_is_a_timeout_row():
    """A worker that does not finish within its limit is killed with its process group and
    becomes a "timeout (N s)" row (shown so in the table)."""
    bench_train = _bench_train()
    r = bench_train.measure(_tiny_spec(), timeout=1)
    assert r["error"] == "timeout (1 s)" and r["timed_out"] and r["path"] == "fp32"
    assert bench_train.row_status(r) == "timeout (1 s)" and not bench_train._CHILDREN


def test_bench_group_compiles_concurrently_then_times_one_at_a_time():
    """``measure_group`` (``--parallel-compile``): the workers warm up concurrently, then are timed
    one after the other (their timed steps do not overlap), each having waited at the gate; with
    no time left for them, the rows still warming up are stopped and reported as timeouts."""
    import time

    bench_train = _bench_train()
    specs = [_tiny_spec(), _tiny_spec(context="atrc")]
    a, b = bench_train.measure_group(specs, deadline=time.monotonic() + 600, reserve_s=5)
    assert "error" not in a and "error" not in b, (a, b)
    assert (a["context"], b["context"]) == ("none", "atrc") and "gate" not in a
    assert len(a["step_times_s"]) == 1 and a["gate_wait_s"] >= 0 and b["gate_wait_s"] >= 0
    assert a["timed_window"][1] <= b["timed_window"][0]  # b was timed after a, not during
    late = bench_train.measure_group(specs, deadline=time.monotonic() + 2, reserve_s=1)
    assert [r["error"] for r in late] == [late[0]["error"]] * 2 and late[0]["timed_out"]
    assert late[0]["error"].startswith("timeout (") and "compiled alongside 1 other rows" in late[0]["error"]
    assert not bench_train._CHILDREN


def test_bench_ops_markdown_table():
    """``bench_local_attention.ops_markdown``: RESULTS.md's format, one row per size, backend and
    dtype (the reference named so), speed-ups and the kernel profile."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_local_attention as bla
    finally:
        sys.path.pop(0)
    row = dict(
        size="8x33x107x140", backend="cuda", device="cuda", dtype="bfloat16", fwd_s=3.4e-4, fwd_bwd_s=1.91e-3,
        speedup_fwd_vs_torch=11.04, speedup_fwd_bwd_vs_torch=9.13, x_floor=25.1, peak_mem_mib=190.2,
    )  # fmt: skip
    ref = row | dict(backend="torch", dtype="float32", speedup_fwd_vs_torch=1.0, speedup_fwd_bwd_vs_torch=1.0)
    profiles = {"8x33x107x140 bfloat16": {"la_backward_kernel": 1500.0, "la_forward_kernel": 340.0}}
    lines = bla.ops_markdown(
        [ref, row], profiles, machine="NVIDIA H200", command="python x.py", ks=9,
        gpu_gflops={"torch.float32": 51000.0},
    )  # fmt: skip
    assert (
        lines[0].startswith("### Local-attention op (cuda): NVIDIA H200, ")
        and "Command: `python x.py`" in lines
    )
    assert "(51.0 TFLOP/s on the GPU)" in lines[4]
    header, body = _md_cells(lines)
    assert header[:6] == ["B×C×H×W", "backend", "device", "dtype", "fwd ms", "fwd+bwd ms"] and len(body) == 2
    assert body[0][1] == "torch reference"
    assert body[1] == [
        "8×33×107×140",
        "cuda",
        "cuda",
        "bfloat16",
        "0.34",
        "1.91",
        "11.0× / 9.1×",
        "25.1",
        "190",
    ]
    assert (
        lines[-1]
        == "* 8x33x107x140 bfloat16: total 1840 µs (la_backward_kernel 1500 µs, la_forward_kernel 340 µs)"
    )


def test_gpu_checks_script_is_valid_bash():
    import subprocess

    res = subprocess.run(
        ["bash", "-n", str(REPO / "benchmarks" / "gpu_checks.sh")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_gpu_checks_dry_run_writes_the_results_tables(tmp_path):
    """``DEVICE=cpu bash benchmarks/gpu_checks.sh``: the GPU run's stages and code paths at a tiny
    size on the CPU, ending in ``$OUT/RESULTS_gpu.md`` (also printed): the stage summary, the
    local-attention op table and the training-step table with one row per (context, path), fp32
    and bf16 timed, the compile rows skipped on the CPU."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh")], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=1500,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    md = (out / "RESULTS_gpu.md").read_text()
    assert md in res.stdout  # printed too
    lines = md.splitlines()
    assert lines[0].startswith("## GPU checks, CPU dry run") and "Command: `OUT=$OUT DEVICE=" in md
    for stage in ("env", "build", "ops", "train"):
        assert f"| {stage} | ok |" in md, stage
    train = lines[next(i for i, ln in enumerate(lines) if ln.startswith("### Training step")) :]
    ops = lines[next(i for i, ln in enumerate(lines) if ln.startswith("### Local-attention op")) :]
    assert "--size 1x64x96" in train[2] and "--skip-compile" in train[2]  # the command
    header, body = _md_cells(train)
    assert header == list(_bench_train().MD_COLUMNS)
    contexts, paths = ("none", "atrc", "search"), ("fp32", "bf16", "compile", "bf16+cudagraphs")
    assert sorted((c[0], c[1]) for c in body) == sorted((c, p) for c in contexts for p in paths)
    for c in body:
        cell = dict(zip(header, c, strict=True))
        assert cell["device"] == "cpu" and cell["B×H×W"] == "1×64×96"
        if c[1] in ("compile", "bf16+cudagraphs"):
            assert c[4:] == ["skipped on cpu"] + [""] * 9, c
            continue
        # step ms, images/s, peak MiB, ATen ops, host ms, first step s are numbers; no kernel time on CPU
        for col in ("step ms (median)", "images/s", "ATen ops/step", "host ms/step", "first step s"):
            assert float(cell[col]) > 0, (col, c)
        assert float(cell["peak MiB"]) >= 0 and cell["kernel ms/step (kernels)"] == "n/a on cpu", c
        assert cell["× none"] == "1.00×" if c[0] == "none" else float(cell["× none"].rstrip("×")) > 0, c
    ops_header, ops_body = _md_cells(
        ops[: next(i for i, ln in enumerate(ops) if ln.startswith("### Training"))]
    )
    assert ops_header[:2] == ["B×C×H×W", "backend"] and ops_body
    assert {(c[1], c[2]) for c in ops_body} >= {("torch reference", "cpu")}
    assert (out / "results-train-cpu.json").exists() and (out / "gpu_checks.log").exists()


def test_recompute_switch():
    from atrc_exp.models.relational_head import ATRCModule

    for value in (True, False):
        cfg = compose_cfg(
            ["backbone.pretrained=false", "mode=search", "context=search", f"mode.recompute={value}"]
        )
        model = apply_fast_paths(build_model(cfg), cfg)
        assert [m.recompute for m in model.modules() if isinstance(m, ATRCModule)] == [value]


def test_compile_options_forms():
    assert compile_options(compose_cfg(["trainer.compile.enabled=true"])) == {
        "mode": None,
        "fullgraph": False,
        "dynamic": None,
        "backend": "inductor",
        "parts": ("step",),
        "regional": False,
    }
    cfg = compose_cfg(["trainer.compile.enabled=true", "trainer.compile.mode=max-autotune"])
    assert compile_options(cfg)["mode"] == "max-autotune"
    assert compile_options(compose_cfg(["~trainer.compile", "+trainer.compile=true"]))["fullgraph"] is False
    cfg = compose_cfg(
        ["trainer.compile.enabled=true", "trainer.compile.parts=[backbone]", "trainer.compile.regional=true"]
    )
    assert compile_options(cfg)["parts"] == ("backbone",) and compile_options(cfg)["regional"] is True
    with pytest.raises(
        ValueError, match=r"trainer.compile.parts must be .*'step', 'backbone', 'head'.*got \['neck'\]"
    ):
        compile_options(compose_cfg(["trainer.compile.enabled=true", "trainer.compile.parts=[neck]"]))
    with pytest.raises(ValueError, match=r"\[step\] compiles the whole step"):
        compile_options(compose_cfg(["trainer.compile.enabled=true", "trainer.compile.parts=[step,head]"]))
    with pytest.raises(ValueError, match="trainer.compile must be a bool or a dict"):
        compile_options(compose_cfg(["~trainer.compile", "+trainer.compile=yes_please"]))


def test_regional_compile_compiles_each_hrnet_module_once_per_structure():
    """``regional``: HRNet18's 2 stage-1 blocks and 6 high-resolution modules are compiled in place
    one by one, the backbone itself and the head not (``parts=[backbone]``); modules of the same
    code and shapes share a compilation (5 graphs for 8 modules: the bottleneck with and without
    its downsample, one per stage 2/3/4), and the outputs are the eager ones (up to rounding)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from atrc_exp.engine.fast_paths import compile_model, compile_regions
    from atrc_exp.models.hrnet import Bottleneck, HRModule

    cfg = compose_cfg(["dataset=nyud", "backbone.pretrained=false", "context=none"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randn(B, 3, H, W)
    ref = model(x)
    regions = compile_regions(model.backbone)
    assert [type(m) for m in regions] == [Bottleneck] * 2 + [HRModule] * 6
    torch._dynamo.reset()
    counter = CompileCounter()
    try:
        compiled = compile_model(model, parts=("backbone",), regional=True, backend=counter)
        out = model(x)
        sum(v.sum() for o in out.values() for v in o.values()).backward()
    finally:
        torch._dynamo.reset()
    assert compiled == regions and all(m._compiled_call_impl is not None for m in regions)
    assert model.backbone._compiled_call_impl is None and model.head._compiled_call_impl is None
    assert counter.frame_count == 5
    for kind in ref:
        for task in ref[kind]:
            torch.testing.assert_close(out[kind][task], ref[kind][task], rtol=1e-4, atol=1e-5)
    # a module without compile_regions (the head, a timm backbone) is compiled whole
    assert compile_regions(model.head) == [model.head]


def test_bf16_autocast_runs_and_stays_finite(plain):
    run = _train([], bf16=True, steps=2)
    assert torch.isfinite(run["losses"]).all()
    assert all(torch.isfinite(w).all() for w in run["final"].values())
    # same model and data: the first loss agrees to bf16 precision
    torch.testing.assert_close(run["losses"][0], plain["losses"][0], rtol=5e-2, atol=0)


def test_trainer_runs_with_fast_path_settings(tiny_data_dir, tmp_path):
    from atrc_exp.engine import fit

    cfg = compose_cfg(
        tiny_overrides(
            tiny_data_dir,
            **{
                "trainer.max_steps": 2,
                "trainer.channels_last": "true",
                "trainer.num_workers": 1,
                "trainer.persistent_workers": "false",
                "trainer.prefetch_factor": 3,
            },
        )
    )
    metrics = fit(cfg, tmp_path)
    assert metrics and all(v == v for v in metrics.values())


def test_local_attention_op_does_not_break_the_graph():
    """The local-context head (the custom op) traces as one graph (dynamo only, no inductor)."""
    import torch._dynamo

    cfg = compose_cfg(["dataset=nyud", "backbone.pretrained=false", "context=local", "tasks=semseg"])
    head = build_model(cfg).head.train()
    torch._dynamo.reset()
    try:
        explain = torch._dynamo.explain(head)(torch.randn(1, head.in_channels, 8, 12))
    finally:
        torch._dynamo.reset()
    assert explain.graph_break_count == 0, explain.break_reasons
    assert any("local_attention" in str(n.target) for g in explain.graphs for n in g.graph.nodes)
