"""Benchmark one training step (forward + loss + backward + SGD step) per context and fast path.

    python benchmarks/bench_train.py                       # CPU table (+ CUDA rows on a GPU)
    python benchmarks/bench_train.py --include data,ops    # + `atrc-data bench` and bench-ops (`make bench`)
    python benchmarks/bench_train.py --contexts none atrc --paths fp32 channels_last --steps 4

Models are built the way training builds them: the Hydra config is composed from ``conf/``
(``dataset=nyud``: semseg/depth/normals/edge with 40 classes; ``backbone=hrnet18`` without
pretrained weights; ``context=...``; ``context=search`` with ``mode=search``), then
``atrc_exp.models.build_model``, ``atrc_exp.engine.fast_paths.apply_fast_paths`` and
``atrc_exp.losses.MultiTaskLoss`` (random unit-vector normal centroids, 40×3). Batches are
synthetic random tensors (no dataset needed), built once. ``context=atrc`` uses the published
NYUD genotype (``genotypes/nyud_hrnet18.json``); ``context=search`` runs the search step (τ
schedule, entropy term, Adam on α, gradient clipping at ``mode.grad_clip``), before any pair freezes.

A step is ``zero_grad → forward → loss → backward → SGD step`` (as in ``atrc_exp.engine.trainer``).
Warm-up steps are excluded; the median of the timed steps is reported. Every configuration runs
in a fresh subprocess. Peak memory: on CPU, the growth of the process's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over its RSS right before the first step, i.e.
gradients + optimizer state + activations + allocator caches (weights and the batch excluded); on
CUDA, ``torch.cuda.max_memory_allocated`` over all steps (weights included).

Fast paths, each timed against the plain float32 step of the same context in the same run:

* ``bf16``: ``torch.autocast(device, dtype=torch.bfloat16)`` around forward + loss
  (what ``trainer.mixed_precision=bf16`` does through Accelerate);
* ``channels_last``: ``trainer.channels_last=true`` (model and input batch in NHWC);
* ``compile``: ``trainer.compile.enabled=true`` (``torch.compile`` of backbone and head); the
  first step (compilation) is reported apart (``--cold-compile``: in round 1 with an empty
  inductor cache, so it is a whole compilation rather than a cache load);
* ``cl+compile``: both;
* ``compile_backbone``: ``trainer.compile.parts=[backbone]`` (the head stays eager, with its CPU
  kernels);
* ``compile_regional``: ``trainer.compile.regional=true`` (HRNet's modules compiled one by one,
  identical ones once: a shorter first step);
* ``cudnn_benchmark``, ``bf16+cudnn_benchmark``: ``trainer.cudnn_benchmark=true`` (cuDNN
  autotuning; meant for the GPU, a no-op on the CPU);
* ``bf16+compile``, ``bf16+cudagraphs``: bf16 autocast with ``torch.compile`` (mode ``default`` /
  ``reduce-overhead``, i.e. CUDA graphs; meant for the GPU); ``bf16+compile_regional``,
  ``bf16+cudagraphs_regional``: the same with the regional compile.

And the exact speed-ups that are on by default, each switched off, against the same fp32 step:

* ``no_fused_bn``: ``ops.batch_norm.backend=torch`` (PyTorch's batch norm, ReLU and softplus
  instead of the CPU kernels of ``atrc_exp.ops.batch_norm``);
* ``no_fused_ce``: ``ops.upsample_cross_entropy.backend=torch`` (the class logits upsampled to
  full resolution before the cross-entropy instead of inside the CPU kernel of
  ``atrc_exp.ops.upsample_cross_entropy``);
* ``no_fused_label``: ``ops.label_attention.backend=torch`` (PyTorch's batched products and
  softmax for the label-context attention instead of the CPU kernel of
  ``atrc_exp.ops.label_attention``);
* ``no_fused_aux``: ``ops.upsample_add.backend=torch`` (the aux heads' first 1×1 convolution on the
  concatenated features instead of at the backbone branches' resolutions with the CPU
  resize-and-add kernel of ``atrc_exp.ops.upsample_add``);
* ``no_keep_freed``: ``trainer.keep_freed_memory=false`` (glibc's default of returning freed
  memory to the OS, page-faulting it back every step);
* ``no_cpu_kernels``: the four above ``ops.*.backend=torch`` at once: PyTorch's ops throughout,
  the code path a GPU runs.

And for ``context=search`` only: ``no_recompute``, ``mode.recompute=false`` (the candidate ops'
activations kept for the backward instead of recomputed: a faster step, about twice the memory).

On CUDA each configuration also reports the GPU kernel time of one step (``torch.profiler``, sum
of the kernels' durations, and their number): a step much longer than its kernel time is bound by
the host (Python, dispatch, launches), which bf16 cannot speed up and CUDA graphs can. The host
time of a step is the wall time until the step function returns, before ``torch.cuda.synchronize()``
(the step reads nothing from the device, as the trainer's ``train_step``). Every
eager configuration reports the ATen ops one step dispatches (views and metadata ops excluded;
counted by a ``TorchDispatchMode`` in one extra step): the host's work, the same on every device
for the same code path (the optimizer aside: a loop per parameter on the CPU, ``foreach`` on
CUDA).

``--include loader`` adds DataLoader rows: the context=none float32 step fed by the trainer's own
train loader (``atrc_exp.engine.trainer.build_train_loader``) over the synthetic dataset (train
transforms at the benchmark crop) per worker setting, against the same step on the in-memory
batch; the mean step time is reported there (stalls waiting for data count). The train loader is
one endless iterator, so ``persistent_workers`` changes nothing there and is not timed;
``pin_memory`` is timed on CUDA only (it has no effect on the CPU).

CPU: batch 2 at 192×256 with ``--threads`` (2) torch threads. CUDA (when present): batch 8 at
425×560 (the paper's NYUD crop); ``--size`` sets another. Results go to
``benchmarks/results-<hostname>.json``, rewritten after every row.

For a short-lived GPU machine (``benchmarks/gpu_checks.sh``): ``--budget`` bounds the whole run
(the eager rows run first, then the compile rows; a row gets at most what is left, one that cannot
start is reported as not run), ``--compile-timeout`` bounds each compile row, ``--parallel-compile
N`` compiles up to N compile rows at once in concurrent processes and then times them one at a time
with the others idle (:func:`measure_group`), ``--markdown`` writes every planned row (skipped and
timed-out ones included, with why) as a ``benchmarks/RESULTS.md`` table (:func:`train_markdown`).
A worker killed at its time limit still gives its timings if it got past them (it prints them
before the profile and the op count); SIGTERM makes the driver stop its workers and write what it
has.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "BENCH_RESULT "
CONTEXTS = ("none", "global", "local", "tlabel", "atrc", "search")
PATHS = {
    "fp32": {},
    "bf16": {"bf16": True},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "cl+compile": {"channels_last": True, "compile": True},
    # trainer.compile.parts=[backbone]: the head stays eager with its CPU kernels
    "compile_backbone": {"compile": True, "compile_parts": ["backbone"]},
    # trainer.compile.regional=true: HRNet's modules one by one (identical ones compiled once)
    "compile_regional": {"compile": True, "compile_regional": True},
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "bf16+cudnn_benchmark": {"bf16": True, "cudnn_benchmark": True},
    "bf16+compile": {"bf16": True, "compile": True},
    # torch.compile mode=reduce-overhead: CUDA graphs (for launch-bound steps on a GPU)
    "bf16+cudagraphs": {"bf16": True, "compile": True, "compile_mode": "reduce-overhead"},
    # the same two with the regional compile (the whole ATRC model's first compile takes minutes)
    "bf16+compile_regional": {"bf16": True, "compile": True, "compile_regional": True},
    "bf16+cudagraphs_regional": {
        "bf16": True,
        "compile": True,
        "compile_mode": "reduce-overhead",
        "compile_regional": True,
    },
    # the always-on exact speed-ups, each switched off (their "speed-up vs fp32" is below 1)
    "no_fused_bn": {"torch_bn": True},
    "no_fused_ce": {"torch_ce": True},
    "no_fused_label": {"torch_label": True},
    "no_fused_aux": {"torch_aux": True},
    "no_keep_freed": {"keep_freed_memory": False},
    # all four CPU kernels off: PyTorch's ops, the code path a GPU runs (its ATen ops/step are the
    # GPU step's, up to the optimizer, which is one loop per parameter on the CPU, foreach on CUDA)
    "no_cpu_kernels": {"torch_bn": True, "torch_ce": True, "torch_label": True, "torch_aux": True},
    # the search without activation recomputation (mode.recompute=false): faster, about twice the
    # memory; timed for context=search only
    "no_recompute": {"no_recompute": True},
}
#: timed for context=search only (whatever --fast-contexts says)
SEARCH_ONLY_PATHS = ("no_recompute",)
#: timed on CUDA only (no-ops on the CPU, or minutes of compilation for a CPU row nobody needs)
GPU_ONLY_PATHS = (
    "cudnn_benchmark",
    "bf16+cudnn_benchmark",
    "bf16+compile",
    "bf16+cudagraphs",
    "bf16+compile_regional",
    "bf16+cudagraphs_regional",
)
#: timed on the CPU only (the fused kernels are CPU kernels)
CPU_ONLY_PATHS = ("no_fused_bn", "no_fused_ce", "no_fused_label", "no_fused_aux", "no_cpu_kernels")
#: DataLoader variants of ``--include loader``: (label, settings); None = the in-memory batch.
LOADERS = (
    ("in-memory batch", None),
    ("workers=0", {"num_workers": 0}),
    ("workers=1", {"num_workers": 1}),
    ("workers=2 (trainer default)", {"num_workers": 2}),
    ("workers=2 prefetch_factor=4", {"num_workers": 2, "prefetch_factor": 4}),
)
SIZES = {"cpu": (2, 192, 256), "cuda": (8, 425, 560)}
GENOTYPE = "genotypes/nyud_hrnet18.json"


# ----------------------------------------------------------------------------------------------
# worker: one configuration in a fresh process
# ----------------------------------------------------------------------------------------------
#: ATen ops that only make a view or read metadata (no kernel on any device): not counted
VIEW_OPS = frozenset(
    "alias as_strided detach empty expand lift_fresh narrow permute reshape select slice split "
    "split_with_sizes squeeze t transpose unbind unsqueeze view _reshape_alias _unsafe_view".split()
)


def dispatched_ops(step, i: int) -> dict:
    """ATen ops dispatched by one more training step (``step(i)``), views and metadata ops
    excluded: the host's share of a step, device-independent (on a GPU, where a step of these
    small layers is launch-bound, each is at least one kernel launch from Python)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEW_OPS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    try:
        with _Count() as c:
            step(i)
        return {"aten_ops_per_step": c.n}
    except Exception as e:  # noqa: BLE001 - an extra, never fail the row for it
        return {"aten_ops_error": f"{type(e).__name__}: {e}"[:200]}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def compose(context: str, spec: dict):
    from hydra import compose as hy_compose
    from hydra import initialize_config_dir

    from atrc_exp.config import CONF_DIR, register_resolvers

    register_resolvers()
    ov = ["dataset=nyud", "backbone=hrnet18", "backbone.pretrained=false", f"context={context}"]
    if context == "search":
        ov.append("mode=search")
        if spec.get("no_recompute"):
            ov.append("mode.recompute=false")
    if context == "atrc":
        ov.append(f"context.genotype={REPO / GENOTYPE}")
    ov.append(f"trainer.channels_last={'true' if spec.get('channels_last') else 'false'}")
    ov.append(f"trainer.compile.enabled={'true' if spec.get('compile') else 'false'}")
    ov.append(f"trainer.compile.mode={spec.get('compile_mode', 'default')}")
    ov.append(f"trainer.compile.parts=[{','.join(spec.get('compile_parts', ['backbone', 'head']))}]")
    ov.append(f"trainer.compile.regional={'true' if spec.get('compile_regional') else 'false'}")
    ov.append(f"trainer.cudnn_benchmark={'true' if spec.get('cudnn_benchmark') else 'false'}")
    ov.append(f"trainer.mixed_precision={'bf16' if spec.get('bf16') else 'no'}")
    ov.append(f"ops.batch_norm.backend={'torch' if spec.get('torch_bn') else 'auto'}")
    ov.append(f"ops.upsample_cross_entropy.backend={'torch' if spec.get('torch_ce') else 'auto'}")
    ov.append(f"ops.label_attention.backend={'torch' if spec.get('torch_label') else 'auto'}")
    ov.append(f"ops.upsample_add.backend={'torch' if spec.get('torch_aux') else 'auto'}")
    ov.append(f"trainer.keep_freed_memory={'false' if spec.get('keep_freed_memory') is False else 'true'}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hy_compose(config_name="train", overrides=ov)


def synthetic_batch(batch: int, h: int, w: int, classes: int, device, seed: int = 0) -> dict:
    """Random inputs and targets in the batch conventions of ``atrc_exp.tasks``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    normals = torch.randn(batch, 3, h, w, generator=g)
    out = {
        "image": torch.randn(batch, 3, h, w, generator=g),
        "semseg": torch.randint(0, classes, (batch, h, w), generator=g),
        "depth": torch.rand(batch, 1, h, w, generator=g) * 9.5 + 0.5,
        "normals": normals / normals.norm(dim=1, keepdim=True),
        "edge": (torch.rand(batch, 1, h, w, generator=g) > 0.95).float(),
    }
    return {k: v.to(device) for k, v in out.items()}


def _loader(spec: dict, device):
    """Batches from the trainer's own train loader (``build_train_loader``: endless step-indexed
    sampler, seeded augmentation) over the synthetic dataset at the benchmark crop."""
    from types import SimpleNamespace

    from hydra import compose as hy_compose
    from hydra import initialize_config_dir

    from atrc_exp.config import CONF_DIR
    from atrc_exp.data import build_datasets, prepare_data
    from atrc_exp.engine.trainer import _to_device, build_train_loader

    b, h, w = spec["size"]
    ov = [f"dataset.crop_size=[{h},{w}]", f"trainer.batch_size={b}"]
    ov += [f"trainer.{k}={str(v).lower()}" for k, v in spec["loader"].items()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = hy_compose(config_name="train", overrides=ov)
    train_ds, _ = build_datasets(dcfg, prepare_data(dcfg, progress=False))
    acc = SimpleNamespace(process_index=0, num_processes=1, device=device)
    it = iter(build_train_loader(train_ds, dcfg, acc))
    return lambda: _to_device(next(it), device)


def gpu_kernel_time(step, i0: int, n: int = 2) -> dict:
    """GPU kernel time and kernel count per step over ``n`` profiled steps (``torch.profiler``)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(n):
                step(i0 + i)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        return {"gpu_kernel_s": busy_us / 1e6 / n, "gpu_kernels_per_step": len(kernels) / n}
    except Exception as e:  # noqa: BLE001 - the profile is an extra, never fail the row for it
        return {"gpu_kernel_error": f"{type(e).__name__}: {e}"[:200]}


def run_worker(spec: dict) -> dict:
    import resource

    import torch

    threads = int(spec.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    from atrc_exp.engine.fast_paths import apply_fast_paths, channels_last_enabled, prepare_input
    from atrc_exp.engine.search import SearchController, split_parameters
    from atrc_exp.engine.trainer import check_cpu_kernel_backends
    from atrc_exp.losses import MultiTaskLoss
    from atrc_exp.models import build_model

    device = torch.device(spec["device"])
    context = spec["context"]
    cfg = compose(context, spec)
    check_cpu_kernel_backends(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    model = apply_fast_paths(model.to(device), cfg)
    model.train()
    tasks = list(cfg.tasks.names)
    g = torch.Generator().manual_seed(1)
    centroids = torch.randn(40, 3, generator=g)
    centroids = centroids / centroids.norm(dim=1, keepdim=True)
    criterion = MultiTaskLoss(tasks, float(cfg.dataset.edge_pos_weight), normal_centroids=centroids).to(
        device
    )
    tc = cfg.trainer
    weights, arch = split_parameters(model)
    opt = torch.optim.SGD(weights, lr=0.01, momentum=float(tc.momentum), weight_decay=float(tc.weight_decay))
    search = cfg.mode.name == "search"
    n_total = int(spec["warmup"]) + int(spec["steps"])
    controller = arch_opt = None
    if search:
        controller = SearchController(model, cfg.mode, n_total)
        arch_opt = torch.optim.Adam(
            arch, lr=float(cfg.mode.arch_lr), weight_decay=0.0, fused=True
        )  # as the trainer
    grad_clip = float(cfg.mode.grad_clip) if search else None
    b, h, w = spec["size"]
    cl = channels_last_enabled(cfg)
    fixed = synthetic_batch(b, h, w, int(cfg.dataset.num_semseg_classes), device)
    next_batch = _loader(spec, device) if spec.get("loader") is not None else (lambda: fixed)
    use_bf16 = bool(spec.get("bf16"))
    cuda = device.type == "cuda"
    # CUDA graphs (torch.compile mode=reduce-overhead): each step is a new iteration of the graphs
    mark_step = spec.get("compile_mode") == "reduce-overhead" and cuda

    def step(i: int) -> torch.Tensor:
        """One training step; returns the detached loss without reading it (no synchronisation)."""
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        batch = next_batch()
        image = prepare_input(batch["image"], cl)
        opt.zero_grad(set_to_none=True)
        if search:
            arch_opt.zero_grad(set_to_none=True)
            ent_w = controller.begin_step(i)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(image, resize=False)  # as the trainer: the loss upsamples
            loss, _ = criterion(out, batch)
            if search:
                loss = loss + controller.loss_term(ent_w)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if search:
            arch_opt.step()
        return loss.detach()

    gate = spec.get("gate")
    warmup = int(spec["warmup"])
    times, host_times, losses = [], [], []

    def timed_step(i: int) -> None:
        t0 = time.perf_counter()
        losses.append(step(i))
        t_host = time.perf_counter()  # the step function returned: the host's part
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        host_times.append(t_host - t0)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_kib()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(warmup):
        timed_step(i)
    gate_wait = None
    if gate:  # compiled concurrently with other rows: wait for the GPU to ourselves, warm up again
        gate_wait = wait_gate(Path(gate))
        timed_step(warmup)
        warmup += 1
    window = [time.time()]
    for i in range(warmup, warmup + int(spec["steps"])):
        timed_step(i)
    window.append(time.time())
    n_total = warmup + int(spec["steps"])
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    loss_values = [float(x) for x in losses]
    result = {
        **spec,
        "step_times_s": times[warmup:],
        "host_times_s": host_times[warmup:],
        "timed_window": window,  # wall-clock start and end of the timed steps
        "first_step_s": times[0],
        "peak_mem_mib": peak_mib,
        "peak_mem_kind": "cuda max_memory_allocated" if cuda else "peak RSS growth",
        "rss_before_mib": rss0 / 1024,
        "maxrss_before_mib": maxrss0 / 1024,
        "losses": loss_values,
        "finite": all(math.isfinite(x) for x in loss_values),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if gate_wait is not None:
        result["gate_wait_s"] = gate_wait
    # the timings so far, in case the extras below fail or run past the row's time limit
    print(MARK + json.dumps({**result, "extras": "not finished"}), flush=True)
    extra = gpu_kernel_time(step, n_total) if cuda else {}
    if not spec.get("compile"):  # a compiled step would be traced again under the counting mode
        extra.update(dispatched_ops(step, n_total + 2))
    return {**extra, **result}


def wait_gate(gate: Path, poll_s: float = 0.1, max_wait_s: float = 3600) -> float:
    """Tell the driver this worker is warm (``gate/ready``), wait for ``gate/go``; seconds waited.
    Exits when the driver is gone (re-parented) or after ``max_wait_s``."""
    parent = os.getppid()
    (gate / "ready").write_text(str(os.getpid()))
    t0 = time.perf_counter()
    while not (gate / "go").exists():
        if os.getppid() != parent or time.perf_counter() - t0 > max_wait_s:
            sys.exit("bench_train worker: the driver is gone or never said go")
        time.sleep(poll_s)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _spawn(
    args: list[str], threads: int | None, timeout: float, env_extra: dict | None = None
) -> tuple[int, str, str]:
    env = dict(os.environ) | (env_extra or {})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("WANDB_MODE", "offline")
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


#: worker processes running now (each the leader of its own process group), killed on exit
_CHILDREN: set[subprocess.Popen] = set()


def _start_worker(spec: dict, logdir: Path, env_extra: dict | None = None) -> subprocess.Popen:
    """A worker process for ``spec`` in its own process group (so that a time limit kills its
    inductor compile workers too), stdout/stderr into files in ``logdir``."""
    env = dict(os.environ) | (env_extra or {})
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    env.setdefault("WANDB_MODE", "offline")
    with open(logdir / "stdout", "w") as out, open(logdir / "stderr", "w") as err:
        p = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp,
        )  # fmt: skip
    _CHILDREN.add(p)
    return p


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL ``p``'s process group (the worker and what it started) and reap it."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader while members remain
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)
    _CHILDREN.discard(p)


def kill_workers() -> None:
    for p in list(_CHILDREN):
        _kill(p)


def _collect(spec: dict, p: subprocess.Popen, logdir: Path, timed_out: str | None) -> dict:
    """The worker's last result line (the timings are printed before the profile and the op
    count, so a worker stopped during those still gives them), else an error row; ``timed_out``:
    the text of the time limit it ran into, if it did."""
    _CHILDREN.discard(p)
    out = (logdir / "stdout").read_text(errors="replace")
    err = (logdir / "stderr").read_text(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith(MARK):
            r = json.loads(line[len(MARK) :])
            r.pop("gate", None)
            if r.pop("extras", None):
                r["extras_error"] = timed_out or f"exit {p.returncode} during the profile / op count"
                r.setdefault("gpu_kernel_error", r["extras_error"])
            return r
    base = {k: v for k, v in spec.items() if k != "gate"}
    if timed_out:
        return {**base, "error": timed_out, "timed_out": True}
    lines = [x.strip() for x in (err or out).strip().splitlines() if x.strip()]
    return {**base, "error": f"exit {p.returncode}: " + (lines[-1] if lines else "no output")}


def measure(spec: dict, timeout: float, cold_cache: bool = False) -> dict:
    """One configuration in a fresh process, killed (with what it started) after ``timeout``
    seconds; ``cold_cache``: with an empty inductor cache (its first step is then a whole
    compilation, not a cache load)."""
    cache_dir = tempfile.TemporaryDirectory(prefix="inductor-") if cold_cache else contextlib.nullcontext()
    with cache_dir as cache, tempfile.TemporaryDirectory(prefix="bench-worker-") as logdir:
        p = _start_worker(spec, Path(logdir), {"TORCHINDUCTOR_CACHE_DIR": cache} if cache else None)
        timed_out = None
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = f"timeout ({timeout:.0f} s)"
        _kill(p)  # also what it started and left running
        return _collect(spec, p, Path(logdir), timed_out)


#: a row is not started with less than this many seconds of ``--budget`` left
MIN_ROW_S = 15.0
#: seconds a compiled row needs once warm (one more warm-up step, the timed steps, the profile)
TIMING_RESERVE_S = 20.0


def measure_group(specs: list[dict], deadline: float, reserve_s: float = TIMING_RESERVE_S) -> list[dict]:
    """The rows of ``specs`` compiled concurrently, then timed one at a time: each worker runs
    its warm-up steps (the compilation), says it is ready and waits; once all are ready, or when
    only ``reserve_s`` per ready row (and one more) is left before ``deadline``
    (``time.monotonic()``), the ones still warming up are stopped (a timeout row) and the ready
    ones are timed in turn, with the others idle (their measurements do not overlap); each gets
    at least ``reserve_s`` seconds. Each worker compiles with cpu_count / len(specs) inductor
    compile threads (at least 2) unless ``TORCHINDUCTOR_COMPILE_THREADS`` is set."""
    n = len(specs)
    env = {}
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(2, (os.cpu_count() or 2) // n))
    results: list[dict | None] = [None] * n
    with tempfile.TemporaryDirectory(prefix="bench-group-") as tmp:
        dirs = [Path(tmp) / str(i) for i in range(n)]
        procs = []
        t0 = time.monotonic()
        try:
            for d, spec in zip(dirs, specs, strict=True):
                d.mkdir()
                procs.append(_start_worker({**spec, "gate": str(d)}, d, env))
            ready = [False] * n
            while True:
                for i, p in enumerate(procs):
                    if results[i] is None and not ready[i]:
                        if (dirs[i] / "ready").exists():
                            ready[i] = True
                        elif p.poll() is not None:
                            _kill(p)
                            results[i] = _collect(specs[i], p, dirs[i], None)
                warming = [i for i in range(n) if results[i] is None and not ready[i]]
                # time for the ready rows and one more: a row still compiling then is stopped
                if not warming or time.monotonic() + reserve_s * (sum(ready) + 1) >= deadline:
                    break
                time.sleep(0.25)
            waited = time.monotonic() - t0
            for i in warming:
                _kill(procs[i])
                results[i] = _collect(
                    specs[i],
                    procs[i],
                    dirs[i],
                    f"timeout ({waited:.0f} s, compiled alongside {n - 1} other rows)",
                )
            todo = [i for i in range(n) if results[i] is None]
            for k, i in enumerate(todo):
                (dirs[i] / "go").write_text("")
                limit = max(reserve_s, (deadline - time.monotonic()) / (len(todo) - k))
                timed_out = None
                try:
                    procs[i].wait(limit)
                except subprocess.TimeoutExpired:
                    timed_out = f"timeout ({limit:.0f} s, after its compilation)"
                _kill(procs[i])  # also what it started and left running
                results[i] = _collect(specs[i], procs[i], dirs[i], timed_out)
        finally:
            for p in procs:
                _kill(p)
    return results  # type: ignore[return-value]


def bench_data(n: int, timeout: float) -> list[dict]:
    """``atrc-data bench`` (train transforms, one core per worker) in a fresh process."""
    code = (
        "import json; from atrc_exp.data.bench import bench_transforms, ORIGINAL_SAMPLES_PER_S as o; "
        f"print({MARK!r} + json.dumps({{'rows': bench_transforms({n}), 'original': o}}))"
    )
    try:
        rc, out, err = _spawn([sys.executable, "-c", code], 1, timeout)
    except subprocess.TimeoutExpired:
        return [{"error": "timed out"}]
    for line in out.splitlines():
        if line.startswith(MARK):
            d = json.loads(line[len(MARK) :])
            return [
                {"input": lab, "samples_per_s": r, "vs_original": r / d["original"]} for lab, r in d["rows"]
            ]
    return [{"error": f"exit {rc}: " + " | ".join((err or out).strip().splitlines()[-3:])}]


def bench_ops(threads: int, timeout: float) -> list[dict]:
    """``benchmarks/bench_local_attention.py`` (what ``make bench-ops`` runs); its JSON rows."""
    out_json = REPO / "benchmarks" / f"results-ops-{socket.gethostname()}.json"
    script = str(REPO / "benchmarks" / "bench_local_attention.py")
    try:
        rc, out, err = _spawn(
            [sys.executable, script, "--threads", str(threads), "--out", str(out_json)], threads, timeout
        )
    except subprocess.TimeoutExpired:
        return [{"error": "timed out"}]
    if rc != 0 or not out_json.exists():
        return [{"error": f"exit {rc}: " + " | ".join((err or out).strip().splitlines()[-3:])}]
    return json.loads(out_json.read_text())["rows"]


def _fmt(x, fmt: str) -> str:
    return "-" if x is None else fmt % x


def _kernel_cell(r: dict) -> str:
    if "gpu_kernel_s" in r:
        return f"{r['gpu_kernel_s'] * 1e3:.1f} ({r['gpu_kernels_per_step']:.0f})"
    if r["device"] != "cuda":
        return f"n/a on {r['device']}"
    return r.get("gpu_kernel_error", "-")[:60]


def row_status(r: dict) -> str | None:
    """What a row that has no timings shows instead (``None`` for a measured row): why it was
    skipped, ``timeout (N s)``, or its error."""
    if "skipped" in r:
        return r["skipped"]
    if "error" in r:
        return r["error"][:160] if r.get("timed_out") else f"error: {r['error'][:160]}"
    return None


def train_table(rows: list[dict]) -> list[str]:
    """The training-step rows as a Markdown table (ratios from the same run)."""
    ok = [r for r in rows if row_status(r) is None and not r["path"].startswith("loader:")]
    base = {(r["device"], r["path"]): r["step_s"] for r in ok if r["context"] == "none"}
    fp32 = {(r["device"], r["context"]): r["step_s"] for r in ok if r["path"] == "fp32"}
    mem_kind = {r["device"]: r["peak_mem_kind"] for r in ok}
    lines = [
        "| device | context | path | B×H×W | ms/step (median) | best ms | img/s | × none (same path) "
        "| speed-up vs fp32 | peak MiB | first step s | ATen ops/step | host ms/step | GPU kernel ms/step (kernels) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["path"].startswith("loader:"):
            continue
        b, h, w = r["size"]
        head = f"| {r['device']} | {r['context']} | {r['path']} | {b}×{h}×{w} "
        status = row_status(r)
        if status is not None:
            lines.append(head + f"| {status} |" + " |" * 9)
            continue
        t = r["step_s"]
        nb = base.get((r["device"], r["path"]))
        f32 = fp32.get((r["device"], r["context"])) if r["path"] != "fp32" else None
        host = r.get("host_s")
        lines.append(
            head + f"| {t * 1e3:.0f} | {r['best_step_s'] * 1e3:.0f} | {r['images_per_s']:.2f} "
            f"| {_fmt(t / nb if nb else None, '%.2f×')} | {_fmt(f32 / t if f32 else None, '%.2f×')} "
            f"| {r['peak_mem_mib']:.0f} | {r['first_step_s'][0]:.1f} | {_fmt(r.get('aten_ops_per_step'), '%d')} "
            f"| {_fmt(host * 1e3 if host is not None else None, '%.0f')} | {_kernel_cell(r)} |"
        )
    if mem_kind:
        lines.append("")
        lines.append(
            "peak MiB: " + "; ".join(f"{d}: {k}" for d, k in mem_kind.items()) + ". first step: round 1 "
            "(compile rows: compilation, from an empty inductor cache with --cold-compile; later rounds "
            "hit the cache). ATen ops/step: the ops one step dispatches, views excluded (the host's work; "
            "not counted for compiled steps). host ms/step: " + HOST_TIME_DEF
        )
    return lines


#: what "host ms/step" is (the table notes repeat it)
HOST_TIME_DEF = (
    "median wall time from a step's start until the step function returns, before "
    "`torch.cuda.synchronize()` (the host dispatching the step without waiting for the device, except "
    "where a host that gets a full launch queue ahead of the GPU waits for room; the step itself reads "
    "nothing from the device; on the CPU it is the step time)"
)
#: the columns of the Markdown table of ``--markdown`` (one row per context and path)
MD_COLUMNS = (
    "context",
    "path",
    "B×H×W",
    "step ms (median)",
    "images/s",
    "speed-up vs fp32",
    "peak MiB",
    "kernel ms/step (kernels)",
    "host ms/step (until the step returns, before sync)",
    "first step s",
)


def train_markdown(rows: list[dict], meta: dict, command: str) -> list[str]:
    """The training-step rows in ``benchmarks/RESULTS.md``'s format: a heading naming what, the
    machine and the date, the command, what each column means, and one table row per (context,
    path) in ``rows``' order, a row without timings saying why (skipped, ``timeout (N s)``,
    error)."""
    rows = [r for r in rows if not r["path"].startswith("loader:")]
    ok = [r for r in rows if row_status(r) is None]
    fp32 = {(r["device"], r["context"]): r["step_s"] for r in ok if r["path"] == "fp32"}
    devices = sorted({r["device"] for r in rows})
    sizes = sorted({"×".join(map(str, r["size"])) for r in rows})
    lines = [
        f"### Training step per context and path ({', '.join(devices)}): {meta['machine']}, {meta['date'][:10]}",
        "",
        f"Command: `{command}`",
        "",
        f"torch {meta['torch']}, Python {meta['python']}, {meta['cpu_count']} host cores; HRNet18 (no "
        f"pretrained weights), NYUD tasks (40 classes), batch×height×width {', '.join(sizes)}, synthetic "
        "in-memory batch; a step is zero_grad + forward + loss + backward + SGD step (the search: + Adam on "
        "α, gradient clipping). Every row runs in a fresh process; "
        + f"timed steps: {meta['steps']}, after {meta['warmup']} warm-up steps (compile rows: one more; "
        "the first step compiles). bf16: autocast around forward "
        "and loss; compile: `torch.compile` of backbone and head, default mode; bf16+cudagraphs: the same "
        'with `mode="reduce-overhead"` (CUDA graphs) and bf16 autocast.'
        + (
            f" The compile rows were compiled up to {meta['parallel_compile']} at a time in concurrent "
            "processes, then timed one at a time with the others idle (after one more warm-up step)."
            if meta.get("parallel_compile")
            else ""
        ),
        "",
        "Columns: step ms = median wall time of a step, from its start until `torch.cuda.synchronize()` "
        "returns after it (on the CPU: until it returns); images/s = batch / step time; speed-up vs fp32 = "
        "the fp32 step of the same context / this step; peak MiB = "
        + "; ".join(
            f"{d}: "
            + (
                "`torch.cuda.max_memory_allocated` over all steps (weights included)"
                if d == "cuda"
                else "peak RSS growth over the steps"
            )
            for d in devices
        )  # fmt: skip
        + "; kernel ms/step = sum of the CUDA kernels' durations in one step (`torch.profiler`, mean of "
        "2 steps), their number in brackets; host ms/step = " + HOST_TIME_DEF + "; first step s = the "
        "first step's wall time (compile rows: the compilation).",
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for r in rows:
        b, h, w = r["size"]
        head = f"| {r['context']} | {r['path']} | {b}×{h}×{w} "
        status = row_status(r)
        if status is not None:
            lines.append(head + f"| {status} |" + " |" * (len(MD_COLUMNS) - 4))
            continue
        t = r["step_s"]
        f32 = fp32.get((r["device"], r["context"])) if r["path"] != "fp32" else None
        host = r.get("host_s")
        lines.append(
            head + f"| {t * 1e3:.1f} | {r['images_per_s']:.1f} | {_fmt(f32 / t if f32 else None, '%.2f×')} "
            f"| {r['peak_mem_mib']:.0f} | {_kernel_cell(r)} | {_fmt(host * 1e3 if host is not None else None, '%.1f')} "
            f"| {r['first_step_s'][0]:.1f} |"
        )
    return lines


def loader_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["path"].startswith("loader:")]
    if not rows:
        return []
    ref = {
        r["device"]: r["step_s"]
        for r in rows
        if r["path"] == "loader:in-memory batch" and row_status(r) is None
    }
    lines = [
        "| device | context=none fp32 step fed by | ms/step (mean) | img/s | vs in-memory batch |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["path"].split(":", 1)[1]
        status = row_status(r)
        if status is not None:
            lines.append(f"| {r['device']} | {label} | {status} | | |")
            continue
        base = ref.get(r["device"])
        lines.append(
            f"| {r['device']} | {label} | {r['step_s'] * 1e3:.0f} | {r['images_per_s']:.2f} "
            f"| {_fmt(base / r['step_s'] if base else None, '%.2f×')} |"
        )
    return lines


def data_table(rows: list[dict]) -> list[str]:
    lines = [
        "| train transforms (`atrc-data bench`, one core) | samples/s | vs original 57/s |",
        "|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| error: {r['error'][:120]} | | |")
        else:
            lines.append(f"| {r['input']} | {r['samples_per_s']:.1f} | {r['vs_original']:.2f}× |")
    return lines


def ops_table(rows: list[dict]) -> list[str]:
    lines = [
        "| local attention (`bench-ops`) B×C×H×W | backend | dtype | fwd ms | fwd+bwd ms | × reference (f+b) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| error: {r['error'][:120]} | | | | | |")
        else:
            lines.append(
                f"| {r['size']} | {r['backend']} {r['device']} | {r['dtype']} | {r['fwd_s'] * 1e3:.2f} | {r['fwd_bwd_s'] * 1e3:.2f} "
                f"| {_fmt(r.get('speedup_fwd_bwd_vs_torch'), '%.1f×')} |"
            )
    return lines


def merge(results: list[dict]) -> dict:
    """One row from the rounds of a configuration: all timed steps pooled."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    times = [t for r in ok for t in r["step_times_s"]]
    stat = statistics.mean if ok[0]["path"].startswith("loader:") else statistics.median
    t = stat(times)
    row = {k: v for k, v in ok[0].items() if k not in ("step_times_s", "host_times_s", "losses")}
    hosts = [x for r in ok for x in r.get("host_times_s", [])]
    row.update(
        host_s=stat(hosts) if hosts else None,
        step_s=t,
        step_stat=stat.__name__,
        best_step_s=min(times),
        images_per_s=ok[0]["size"][0] / t,
        step_times_s=[r["step_times_s"] for r in ok],
        host_times_s=[r.get("host_times_s") for r in ok],
        first_step_s=[r["first_step_s"] for r in ok],
        peak_mem_mib=max(r["peak_mem_mib"] for r in ok),
        final_loss=ok[0]["losses"][-1],
        finite=all(r["finite"] for r in ok),
        rounds=len(ok),
    )
    if len(ok) < len(results):
        row["failed_rounds"] = [r["error"] for r in results if "error" in r]
    return row


def plan_rows(args, dev: str, include: set[str]) -> list[dict]:
    """Every (context, path) asked for on ``dev``, in table order: a worker spec each, or a row
    with ``skipped`` (why it is not timed there: a GPU-only path on the CPU, ``--skip-compile``,
    no bf16 on the GPU)."""
    import torch

    steps = args.steps or (6 if dev == "cpu" else 20)
    threads = args.threads if dev == "cpu" else None
    size = tuple(getattr(args, "size", None) or SIZES[dev])
    plan = [(c, "fp32") for c in args.contexts if "fp32" in args.paths]
    for n in args.paths:
        if n != "fp32":
            on = ("search",) if n in SEARCH_ONLY_PATHS else args.fast_contexts
            plan += [(c, n) for c in args.contexts if c in on]
    specs = []
    for context, name in plan:
        extra = PATHS[name]
        row = dict(device=dev, context=context, path=name, size=size)
        if (name in GPU_ONLY_PATHS and dev != "cuda") or (name in CPU_ONLY_PATHS and dev != "cpu"):
            specs.append(row | {"skipped": f"skipped on {dev}"})
            continue
        if extra.get("compile") and getattr(args, "skip_compile", False):
            specs.append(
                row | {"skipped": f"skipped on {dev}" if dev == "cpu" else "skipped (--skip-compile)"}
            )
            continue
        if extra.get("bf16") and dev == "cuda" and not torch.cuda.is_bf16_supported():
            specs.append(row | {"skipped": "skipped: no bf16 on this GPU"})
            continue
        warmup = args.warmup + (1 if extra.get("compile") else 0)
        specs.append(row | dict(threads=threads, steps=steps, warmup=warmup) | extra)
    if "loader" in include:
        loaders = list(LOADERS)
        if dev == "cuda":  # pin_memory=auto pins on CUDA; time it off too
            loaders.append(("workers=2 pin_memory=false", {"num_workers": 2, "pin_memory": False}))
        for label, settings in loaders:
            specs.append(
                dict(
                    device=dev, context="none", path=f"loader:{label}", size=size, threads=threads,
                    steps=2 * steps, warmup=args.warmup, loader=settings,
                )
            )  # fmt: skip
    return specs


def plan_specs(args, dev: str, include: set[str]) -> list[dict]:
    """The worker specs of :func:`plan_rows` (the skipped rows left out)."""
    return [r for r in plan_rows(args, dev, include) if "skipped" not in r]


def display_command(script: str, argv: list[str]) -> str:
    """``python script argv`` for a report, without the options that only name outputs or label
    them (``--markdown``, ``--machine``)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--markdown", "--machine"):
            skip = True
        elif not a.startswith(("--markdown=", "--machine=")):
            shown.append(a)
    return shlex.join(["python", script, *shown])


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        b, h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size wants BxHxW, e.g. 1x64x96; got {text!r}") from None
    return b, h, w


class _Stopped(BaseException):
    """SIGTERM (the caller's time limit): stop measuring, write what there is."""


def _on_sigterm(signum, frame):
    raise _Stopped


def _machine_name(devices: list[str]) -> str:
    import torch

    if "cuda" in devices and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.machine()} CPU ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--contexts", nargs="+", default=list(CONTEXTS), choices=CONTEXTS)
    p.add_argument(
        "--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="fast paths (fp32 = plain)"
    )
    p.add_argument(
        "--fast-contexts", nargs="+", default=["none", "atrc"], choices=CONTEXTS,
        help="contexts on which the non-fp32 paths are timed",
    )  # fmt: skip
    p.add_argument(
        "--devices", nargs="+", default=None, choices=["cpu", "cuda"], help="default: cpu, + cuda if present"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 6 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile: +1)")
    p.add_argument(
        "--rounds", type=int, default=2,
        help="passes over all configurations (interleaved, so machine noise spreads evenly); steps pooled",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--include", default="", help="comma list of: loader, data, ops (`make bench`: all three)")
    p.add_argument(
        "--cold-compile",
        action="store_true",
        help="compile rows' first round with an empty inductor cache (first step = a whole compilation)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration and round")
    p.add_argument(
        "--compile-timeout", type=float, default=None,
        help="seconds per compile row (its compilation included; default --timeout)",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=float, default=None,
        help="seconds for all rows: each gets at most what is left; rows that cannot start are reported "
        "as not run (the eager rows run first, then the compile rows)",
    )  # fmt: skip
    p.add_argument(
        "--parallel-compile", type=int, default=0, metavar="N",
        help="compile up to N compile rows at once in concurrent processes, then time them one at a time "
        "with the others idle (0: one row after the other)",
    )  # fmt: skip
    p.add_argument("--size", type=_parse_size, default=None, help="BxHxW for every device (default: SIZES)")
    p.add_argument(
        "--skip-compile",
        action="store_true",
        help="report the compile rows as skipped instead of timing them",
    )
    p.add_argument(
        "--markdown", default=None,
        help="also write the rows as a RESULTS.md table here (every planned row, skipped ones included)",
    )  # fmt: skip
    p.add_argument("--machine", default=None, help="machine name for --markdown (default: the GPU's / CPU's)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results-<hostname>.json)")
    args = p.parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        sys.stderr.flush()
        os._exit(0)  # no interpreter teardown (inductor's worker pools, CUDA): the driver waits for it

    import signal

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    include = {s.strip() for s in args.include.split(",") if s.strip()}
    unknown = include - {"loader", "data", "ops"}
    if unknown:
        p.error(f"--include: unknown {sorted(unknown)}")
    out_path = Path(args.out or REPO / "benchmarks" / f"results-{socket.gethostname()}.json")
    planned = [r for dev in devices for r in plan_rows(args, dev, include)]
    if not args.markdown:
        planned = [r for r in planned if "skipped" not in r]
    todo = [i for i, r in enumerate(planned) if "skipped" not in r]
    eager = [i for i in todo if not planned[i].get("compile")]
    compiled = [i for i in todo if planned[i].get("compile")]
    results: dict[int, list[dict]] = {i: [] for i in todo}
    t_start = time.perf_counter()
    deadline = time.monotonic() + args.budget if args.budget else math.inf
    compile_timeout = args.compile_timeout or args.timeout
    load = [os.getloadavg()]
    command = display_command("benchmarks/bench_train.py", sys.argv[1:] if argv is None else argv)
    meta = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        host=socket.gethostname(),
        machine=args.machine or _machine_name(devices),
        arch=platform.machine(),
        torch=torch.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        threads=args.threads,
        rounds=args.rounds,
        steps=args.steps or (6 if devices == ["cpu"] else 20),
        warmup=args.warmup,
        budget_s=args.budget,
        parallel_compile=args.parallel_compile if compiled else 0,
        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        sizes={d: args.size or SIZES[d] for d in devices},
        genotype=GENOTYPE,
    )

    def rows_now(missing: str) -> list[dict]:
        return [
            merge(results[i]) if results.get(i) else r if "skipped" in r else {**r, "skipped": missing}
            for i, r in enumerate(planned)
        ]

    def write(missing: str, data_rows=(), ops_rows=()) -> list[dict]:
        """The JSON (and Markdown) of what is measured so far, rewritten after every row."""
        rows = rows_now(missing)
        meta.update(loadavg_1min=[round(x[0], 2) for x in load], wall_s=time.perf_counter() - t_start)
        out_path.write_text(
            json.dumps(
                {"meta": meta, "train": rows, "data": list(data_rows), "ops": list(ops_rows)}, indent=2
            )
        )
        if args.markdown:
            Path(args.markdown).write_text("\n".join(train_markdown(rows, meta, command)) + "\n")
        return rows

    def report(rnd: int, i: int, r: dict) -> None:
        results[i].append(r)
        spec = planned[i]
        status = row_status(r)
        msg = status if status is not None else (
            f"{statistics.median(r['step_times_s']) * 1e3:.0f} ms/step (median), first step "
            f"{r['first_step_s']:.1f} s, peak {r['peak_mem_mib']:.0f} MiB"
        )  # fmt: skip
        print(
            f"[{time.perf_counter() - t_start:6.0f} s] round {rnd + 1} {spec['device']} {spec['context']:>6} "
            f"{spec['path']:<13} {msg}",
            flush=True,
        )
        load.append(os.getloadavg())
        write("not run yet")

    missing = f"not run: the time budget ({args.budget:.0f} s) was spent" if args.budget else "not run"
    stopped = False
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for rnd in range(args.rounds):
            for i in eager:
                left = deadline - time.monotonic()
                if left >= MIN_ROW_S:
                    report(rnd, i, measure(planned[i], min(args.timeout, left)))
            if args.parallel_compile > 0:
                for k in range(0, len(compiled), args.parallel_compile):
                    chunk = compiled[k : k + args.parallel_compile]
                    now = time.monotonic()
                    if deadline - now < MIN_ROW_S + TIMING_RESERVE_S:
                        break
                    group_deadline = min(deadline, now + compile_timeout + TIMING_RESERVE_S * len(chunk))
                    for i, r in zip(
                        chunk, measure_group([planned[i] for i in chunk], group_deadline), strict=True
                    ):
                        report(rnd, i, r)
            else:
                for i in compiled:
                    left = deadline - time.monotonic()
                    if left >= MIN_ROW_S:
                        cold = args.cold_compile and rnd == 0
                        report(rnd, i, measure(planned[i], min(compile_timeout, left), cold_cache=cold))
    except _Stopped:
        stopped = True
        missing = "not run: stopped (SIGTERM, the caller's time limit)"
        print("stopped by SIGTERM: writing what was measured", flush=True)
    finally:
        kill_workers()
        signal.signal(signal.SIGTERM, old_handler)
    rows = write(missing)
    if stopped:
        print("\n".join(train_table(rows)))
        return 143
    data_rows = bench_data(50, args.timeout) if "data" in include else []
    ops_rows = bench_ops(args.threads, args.timeout) if "ops" in include else []
    if data_rows or ops_rows:
        write(missing, data_rows, ops_rows)
    lo, hi = min(x[0] for x in load), max(x[0] for x in load)
    print()
    print(
        f"Training step (zero_grad + forward + loss + backward + SGD step), HRNet18, NYUD tasks (40 classes); "
        f"{meta['host']}, torch {meta['torch']}, {os.cpu_count()} CPUs, {args.threads} torch threads, "
        f"{args.rounds} round(s), 1-min load average {lo:.1f}-{hi:.1f}"
    )
    tables = [
        train_table(rows),
        loader_table(rows),
        data_table(data_rows) if data_rows else [],
        ops_table(ops_rows) if ops_rows else [],
    ]
    for tab in tables:
        if tab:
            print("\n".join(tab))
            print()
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
