"""Time the training step per context and fast path: ms/step, × none, peak memory, ATen ops/step.

    python benchmarks/bench_train.py                       # CPU table (+ CUDA rows on a GPU)
    python benchmarks/bench_train.py --contexts none atrc --paths fp32 bf16 --steps 4

The step timed is the trainer's own: :func:`atrc_exp.engine.step.train_step` on what the trainer
builds (``make_accelerator``, ``build_training_model``, ``build_step``) from the Hydra config of
``dataset=nyud backbone=hrnet18`` (no pretrained weights) with ``context=...`` (``atrc``: the
published genotype ``genotypes/nyud_hrnet18.json``; ``search``: ``mode=search``), on one synthetic
batch built once (the normals' centroids random unit vectors). Paths: ``fp32`` (the plain step),
``bf16`` (``trainer.mixed_precision=bf16``), ``channels_last``, ``compile``
(``trainer.compile.enabled``: forward and loss as one graph; its first step compiles),
``bf16+cudagraphs`` (CUDA only: bf16 and ``trainer.compile.mode=reduce-overhead``) and
``no_recompute`` (search only: ``mode.recompute=false``).

Every row runs in a fresh process; warm-up steps are excluded, the median of the timed steps is
reported. Columns: ``× none``: this step over the
``context=none`` step of the same path and device; peak memory: on the CPU the growth of the peak
RSS over the RSS before the first step, on CUDA ``torch.cuda.max_memory_allocated``; ATen ops/step
(eager rows): the ops one more step dispatches, views excluded (:func:`dispatched_ops`); on CUDA
also the host time (until the step function returns) and the kernel time (``torch.profiler``).
CPU: batch 2 at 192×256 with ``--threads`` torch threads; CUDA: batch 8 at 425×560 (``--size``
sets another). JSON: ``benchmarks/results-<hostname>.json`` (``--out``), rewritten after every row;
``--markdown`` writes the table in ``benchmarks/RESULTS.md``'s format.

For a short-lived GPU machine (``benchmarks/gpu_checks.sh``): ``--budget`` bounds the whole run
(eager rows first; a row that cannot start is reported as not run), ``--compile-timeout`` each
compile row, ``--parallel-compile N`` compiles up to N compile rows at once and then times them one
at a time (:func:`measure_group`). SIGTERM makes the driver stop and write what it has.
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
DEFAULT_CONTEXTS = ("none", "atrc", "search")
PATHS = {
    "fp32": {},
    "bf16": {"bf16": True},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    # torch.compile mode=reduce-overhead: CUDA graphs (for launch-bound steps on a GPU)
    "bf16+cudagraphs": {"bf16": True, "compile": True, "compile_mode": "reduce-overhead"},
    "no_recompute": {"no_recompute": True},
}
#: timed for context=search only (whatever --fast-contexts says)
SEARCH_ONLY_PATHS = ("no_recompute",)
#: timed on CUDA only
GPU_ONLY_PATHS = ("bf16+cudagraphs",)
SIZES = {"cpu": (2, 192, 256), "cuda": (8, 425, 560)}
GENOTYPE = "genotypes/nyud_hrnet18.json"
#: a row is not started with less than this many seconds of ``--budget`` left
MIN_ROW_S = 15.0
#: seconds a compiled row needs once warm (one more warm-up step, the timed steps, the profile)
TIMING_RESERVE_S = 20.0


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
    """The training config of ``context`` with the fast-path switches of ``spec`` (a PATHS value,
    or a row: its ``device`` sets ``trainer.cpu``)."""
    from atrc_exp.config import compose as compose_config

    def on(key: str) -> str:
        return "true" if spec.get(key) else "false"

    ov = ["dataset=nyud", "backbone=hrnet18", "backbone.pretrained=false", f"context={context}"]
    if context == "search":
        ov += ["mode=search", f"mode.recompute={'false' if spec.get('no_recompute') else 'true'}"]
    if context == "atrc":
        ov.append(f"context.genotype={REPO / GENOTYPE}")
    ov += [
        f"trainer.cpu={'false' if spec.get('device') == 'cuda' else 'true'}",
        f"trainer.channels_last={on('channels_last')}",
        f"trainer.compile.enabled={on('compile')}",
        f"trainer.compile.mode={spec.get('compile_mode', 'default')}",
        f"trainer.mixed_precision={'bf16' if spec.get('bf16') else 'no'}",
    ]
    return compose_config(ov)


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
    """Build what the trainer builds for ``spec``, run its warm-up and timed steps of
    :func:`~atrc_exp.engine.step.train_step`; the row (timings in seconds)."""
    import resource

    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from atrc_exp.config import config_tasks
    from atrc_exp.engine.faults import NonFiniteMonitor
    from atrc_exp.engine.step import train_step
    from atrc_exp.engine.trainer import build_step, build_training_model, check_backend, make_accelerator
    from atrc_exp.losses import MultiTaskLoss

    cfg = compose(spec["context"], spec)
    acc = make_accelerator(cfg)
    cuda = acc.device.type == "cuda"
    check_backend(str(cfg.ops.local_attention.backend), acc.device)
    torch.manual_seed(0)
    model = build_training_model(cfg, acc).train()
    centroids = torch.nn.functional.normalize(torch.randn(40, 3, generator=torch.Generator().manual_seed(1)))
    tasks = [
        t.with_options(centroids=centroids.numpy()) if "centroids" in t.kind.options else t
        for t in config_tasks(cfg)
    ]
    parts = build_step(cfg, acc, model, MultiTaskLoss(tasks).to(acc.device))
    monitor = NonFiniteMonitor(acc.device)
    batch = synthetic_batch(*spec["size"], tasks[0].num_classes, acc.device)
    # CUDA graphs: each step is a new iteration of the graphs, whose outputs the next one overwrites
    cudagraphs = spec.get("compile_mode") == "reduce-overhead" and cuda

    def step(i: int) -> torch.Tensor:
        """One training step; returns the loss without reading it (no synchronisation)."""
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = train_step(parts, batch, i, monitor).loss
        return loss.clone() if cudagraphs else loss

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
    warmup, n_steps = int(spec["warmup"]), int(spec["steps"])
    for i in range(warmup):
        timed_step(i)
    gate_wait = None
    if spec.get("gate"):  # compiled alongside other rows: wait for the machine, warm up again
        gate_wait = wait_gate(Path(spec["gate"]))
        timed_step(warmup)
        warmup += 1
    window = [time.time()]
    for i in range(warmup, warmup + n_steps):
        timed_step(i)
    window.append(time.time())
    if cuda:
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    loss_values = [float(x) for x in losses]
    step_s = statistics.median(times[warmup:])
    result = {
        **spec,
        "step_s": step_s,
        "best_step_s": min(times[warmup:]),
        "host_s": statistics.median(host_times[warmup:]),
        "images_per_s": spec["size"][0] / step_s,
        "step_times_s": times[warmup:],
        "timed_window": window,  # wall-clock start and end of the timed steps
        "first_step_s": times[0],
        "peak_mem_mib": peak_mib,
        "losses": loss_values,
        "finite": all(math.isfinite(x) for x in loss_values),
    }
    if gate_wait is not None:
        result["gate_wait_s"] = gate_wait
    # the timings so far, in case the extras below fail or run past the row's time limit
    print(MARK + json.dumps({**result, "extras": "not finished"}), flush=True)
    n_done = warmup + n_steps
    extra = gpu_kernel_time(step, n_done) if cuda else {}
    if not spec.get("compile"):  # a compiled step would be traced again under the counting mode
        extra.update(dispatched_ops(step, n_done + 2))
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
# driver: workers in their own process groups, with time limits
# ----------------------------------------------------------------------------------------------
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


def measure(spec: dict, timeout: float) -> dict:
    """One configuration in a fresh process, killed (with what it started) after ``timeout`` s."""
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as logdir:
        p = _start_worker(spec, Path(logdir))
        timed_out = None
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = f"timeout ({timeout:.0f} s)"
        _kill(p)  # also what it started and left running
        return _collect(spec, p, Path(logdir), timed_out)


def measure_group(specs: list[dict], deadline: float, reserve_s: float = TIMING_RESERVE_S) -> list[dict]:
    """The rows of ``specs`` compiled concurrently, then timed one at a time: each worker runs
    its warm-up steps (the compilation), says it is ready and waits; once all are ready, or when
    only ``reserve_s`` per ready row (and one more) is left before ``deadline``
    (``time.monotonic()``), the ones still warming up are stopped (a timeout row) and the ready
    ones are timed in turn, with the others idle; each gets at least ``reserve_s`` seconds. Each
    worker compiles with cpu_count / len(specs) inductor compile threads (at least 2) unless
    ``TORCHINDUCTOR_COMPILE_THREADS`` is set."""
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


# ----------------------------------------------------------------------------------------------
# rows and the table
# ----------------------------------------------------------------------------------------------
def plan_rows(args, dev: str) -> list[dict]:
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
    rows = []
    for context, name in plan:
        extra = PATHS[name]
        row = dict(device=dev, context=context, path=name, size=size)
        if name in GPU_ONLY_PATHS and dev != "cuda":
            rows.append(row | {"skipped": f"skipped on {dev}"})
        elif extra.get("compile") and getattr(args, "skip_compile", False):
            rows.append(
                row | {"skipped": f"skipped on {dev}" if dev == "cpu" else "skipped (--skip-compile)"}
            )
        elif extra.get("bf16") and dev == "cuda" and not torch.cuda.is_bf16_supported():
            rows.append(row | {"skipped": "skipped: no bf16 on this GPU"})
        else:
            warmup = args.warmup + (1 if extra.get("compile") else 0)
            rows.append(row | dict(threads=threads, steps=steps, warmup=warmup) | extra)
    return rows


def row_status(r: dict) -> str | None:
    """What a row without timings shows instead (``None`` for a measured row): why it was
    skipped, ``timeout (N s)``, or its error."""
    if "skipped" in r:
        return r["skipped"]
    if "error" in r:
        return r["error"][:160] if r.get("timed_out") else f"error: {r['error'][:160]}"
    return None


def _fmt(x, fmt: str) -> str:
    return "-" if x is None else fmt % x


def _kernel_cell(r: dict) -> str:
    if "gpu_kernel_s" in r:
        return f"{r['gpu_kernel_s'] * 1e3:.1f} ({r['gpu_kernels_per_step']:.0f})"
    if r["device"] != "cuda":
        return f"n/a on {r['device']}"
    return r.get("gpu_kernel_error", "-")[:60]


#: the columns of the table (one row per device, context and path)
MD_COLUMNS = tuple(
    "context|path|device|B×H×W|step ms (median)|best ms|images/s|× none|speed-up vs fp32|peak MiB|"
    "ATen ops/step|host ms/step|kernel ms/step (kernels)|first step s".split("|")
)
#: what "host ms/step" is (the Markdown notes repeat it)
HOST_TIME_DEF = (
    "median wall time from a step's start until the step function returns, before "
    "`torch.cuda.synchronize()` (the host dispatching the step; the step itself reads nothing from "
    "the device; on the CPU it is the step time)"
)


def table(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table (:data:`MD_COLUMNS`; ratios from the same run), a row without
    timings saying why (skipped, ``timeout (N s)``, error)."""
    ok = [r for r in rows if row_status(r) is None]
    none = {(r["device"], r["path"]): r["step_s"] for r in ok if r["context"] == "none"}
    fp32 = {(r["device"], r["context"]): r["step_s"] for r in ok if r["path"] == "fp32"}
    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for r in rows:
        head = f"| {r['context']} | {r['path']} | {r['device']} | {'×'.join(map(str, r['size']))} "
        status = row_status(r)
        if status is not None:
            lines.append(head + f"| {status} |" + " |" * (len(MD_COLUMNS) - 5))
            continue
        t = r["step_s"]
        nb = none.get((r["device"], r["path"]))
        f32 = fp32.get((r["device"], r["context"])) if r["path"] != "fp32" else None
        host = r.get("host_s")
        lines.append(
            head + f"| {t * 1e3:.1f} | {r['best_step_s'] * 1e3:.1f} | {r['images_per_s']:.2f} "
            f"| {_fmt(t / nb if nb else None, '%.2f×')} | {_fmt(f32 / t if f32 else None, '%.2f×')} "
            f"| {r['peak_mem_mib']:.0f} | {_fmt(r.get('aten_ops_per_step'), '%d')} "
            f"| {_fmt(host * 1e3 if host is not None else None, '%.1f')} | {_kernel_cell(r)} "
            f"| {r['first_step_s']:.1f} |"
        )
    return lines


def train_markdown(rows: list[dict], meta: dict, command: str) -> list[str]:
    """The rows in ``benchmarks/RESULTS.md``'s format: a heading naming what, the machine and the
    date, the command, what each column means, then :func:`table`."""
    devices = sorted({r["device"] for r in rows})
    sizes = sorted({"×".join(map(str, r["size"])) for r in rows})
    mem = {
        "cuda": "`torch.cuda.max_memory_allocated` over all steps (weights included)",
        "cpu": "peak RSS growth over the steps (weights and batch excluded)",
    }
    parallel = (
        f" The compile rows were compiled up to {meta['parallel_compile']} at a time in concurrent "
        "processes, then timed one at a time with the others idle (after one more warm-up step)."
        if meta.get("parallel_compile")
        else ""
    )
    return [
        f"### Training step per context and path ({', '.join(devices)}): {meta['machine']}, {meta['date'][:10]}",
        "",
        f"Command: `{command}`",
        "",
        f"torch {meta['torch']}, Python {meta['python']}, {meta['cpu_count']} host cores; HRNet18 (no "
        f"pretrained weights), NYUD tasks (40 classes), batch×height×width {', '.join(sizes)}, synthetic "
        "in-memory batch; the step is the trainer's (`atrc_exp.engine.step.train_step`: forward, loss, "
        "backward, gradient norm or clipping, SGD, the schedule; the search: + entropy term, Adam on α). "
        f"Every row runs in a fresh process; timed steps: {meta['steps']}, after {meta['warmup']} warm-up "
        "steps (compile rows: one more; their first step compiles). bf16: `trainer.mixed_precision=bf16`; "
        "compile: `torch.compile` of forward + loss as one graph (`trainer.compile.parts=[step]`), "
        'default mode; bf16+cudagraphs: the same with `mode="reduce-overhead"` (CUDA graphs) and bf16.'
        + parallel,
        "",
        "Columns: step ms = median wall time of a step (on CUDA until `torch.cuda.synchronize()` "
        "returns after it); images/s = batch / step time; × none = this step / the `context=none` step "
        "of the same path; speed-up vs fp32 = the fp32 step of the same context / this step; peak MiB = "
        + "; ".join(f"{d}: {mem.get(d, '?')}" for d in devices)
        + "; ATen ops/step = the ops one step dispatches, views excluded (eager rows only); host "
        "ms/step = " + HOST_TIME_DEF + "; kernel ms/step = sum of the CUDA kernels' durations in one "
        "step (`torch.profiler`, mean of 2 steps), their number in brackets; first step s = the first "
        "step's wall time (compile rows: the compilation).",
        "",
        *table(rows),
    ]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--worker", default=None, help=argparse.SUPPRESS)
    add("--contexts", nargs="+", default=list(DEFAULT_CONTEXTS), choices=CONTEXTS)
    add("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="fast paths (fp32 = plain)")
    add(
        "--fast-contexts", nargs="+", default=["none", "atrc"], choices=CONTEXTS,
        help="contexts on which the paths other than fp32 and no_recompute are timed",
    )  # fmt: skip
    add("--devices", nargs="+", default=None, choices=["cpu", "cuda"], help="default: cpu, + cuda if present")
    add("--steps", type=int, default=None, help="timed steps per round (default: 6 CPU, 20 CUDA)")
    add("--warmup", type=int, default=2, help="untimed steps first (compile: +1)")
    add("--threads", type=int, default=2, help="torch threads on the CPU")
    add("--size", type=_parse_size, default=None, help="BxHxW for every device (default: SIZES)")
    add("--skip-compile", action="store_true", help="report the compile rows as skipped")
    add("--timeout", type=float, default=1800, help="seconds per row and round")
    add("--compile-timeout", type=float, default=None, help="seconds per compile row (default --timeout)")
    add(
        "--budget", type=float, default=None,
        help="seconds for all rows (eager rows first); rows that cannot start are reported as not run",
    )  # fmt: skip
    add(
        "--parallel-compile", type=int, default=0, metavar="N",
        help="compile up to N compile rows at once, then time them one at a time (0: one after the other)",
    )  # fmt: skip
    add("--markdown", default=None, help="also write the table in RESULTS.md's format here")
    add("--machine", default=None, help="machine name for --markdown (default: the GPU's / CPU's)")
    add("--out", default=None, help="JSON file (default benchmarks/results-<hostname>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        print(MARK + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        sys.stderr.flush()
        os._exit(0)  # no interpreter teardown (inductor's worker pools, CUDA): the driver waits for it

    import signal

    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    out_path = Path(args.out or REPO / "benchmarks" / f"results-{socket.gethostname()}.json")
    planned = [r for dev in devices for r in plan_rows(args, dev)]
    if not args.markdown:
        planned = [r for r in planned if "skipped" not in r]
    todo = [i for i, r in enumerate(planned) if "skipped" not in r]
    eager = [i for i in todo if not planned[i].get("compile")]
    compiled = [i for i in todo if planned[i].get("compile")]
    results: dict[int, dict] = {}
    t_start = time.perf_counter()
    deadline = time.monotonic() + args.budget if args.budget else math.inf
    compile_timeout = args.compile_timeout or args.timeout
    load = [os.getloadavg()[0]]
    command = display_command("benchmarks/bench_train.py", sys.argv[1:] if argv is None else argv)
    meta = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        host=socket.gethostname(),
        machine=args.machine or _machine_name(devices),
        torch=torch.__version__,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        threads=args.threads,
        steps=args.steps or (6 if devices == ["cpu"] else 20),
        warmup=args.warmup,
        budget_s=args.budget,
        parallel_compile=args.parallel_compile if compiled else 0,
        sizes={d: args.size or SIZES[d] for d in devices},
        genotype=GENOTYPE,
    )
    missing = f"not run: the time budget ({args.budget:.0f} s) was spent" if args.budget else "not run"

    def write() -> list[dict]:
        """The JSON (and Markdown) of what is measured so far, rewritten after every row."""
        rows = [
            results[i] if i in results else r if "skipped" in r else {**r, "skipped": missing}
            for i, r in enumerate(planned)
        ]
        meta.update(loadavg_1min=[round(x, 2) for x in load], wall_s=time.perf_counter() - t_start)
        out_path.write_text(json.dumps({"meta": meta, "train": rows}, indent=2))
        if args.markdown:
            Path(args.markdown).write_text("\n".join(train_markdown(rows, meta, command)) + "\n")
        return rows

    def report(i: int, r: dict) -> None:
        results[i] = r
        s = planned[i]
        msg = row_status(r) or (
            f"{r['step_s'] * 1e3:.0f} ms/step (median), first step "
            f"{r['first_step_s']:.1f} s, peak {r['peak_mem_mib']:.0f} MiB"
        )
        print(
            f"[{time.perf_counter() - t_start:6.0f} s] {s['device']} {s['context']:>6} {s['path']:<15} {msg}",
            flush=True,
        )
        load.append(os.getloadavg()[0])
        write()

    def run_one(i: int, limit: float) -> None:
        left = deadline - time.monotonic()
        if left >= MIN_ROW_S:
            report(i, measure(planned[i], min(limit, left)))

    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for i in eager + (compiled if args.parallel_compile <= 0 else []):
            run_one(i, compile_timeout if planned[i].get("compile") else args.timeout)
        n = args.parallel_compile
        for chunk in [compiled[k : k + n] for k in range(0, len(compiled), n)] if n > 0 else []:
            now = time.monotonic()
            if deadline - now < MIN_ROW_S + TIMING_RESERVE_S:
                break
            group_deadline = min(deadline, now + compile_timeout + TIMING_RESERVE_S * len(chunk))
            for i, r in zip(chunk, measure_group([planned[i] for i in chunk], group_deadline), strict=True):
                report(i, r)
    except _Stopped:
        missing = "not run: stopped (SIGTERM, the caller's time limit)"
        print("stopped by SIGTERM: writing what was measured", flush=True)
        print("\n".join(table(write())))
        return 143
    finally:
        kill_workers()
        signal.signal(signal.SIGTERM, old_handler)
    rows = write()
    print(
        f"\nTraining step (atrc_exp.engine.step.train_step), HRNet18, NYUD tasks (40 classes); {meta['machine']}, torch {meta['torch']}, {args.threads} torch threads on the CPU, "
        f"1-min load average {min(load):.1f}-{max(load):.1f}"
    )
    print("\n".join(table(rows)))
    print(f"\npeak MiB: cpu = peak RSS growth, cuda = max_memory_allocated. wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
