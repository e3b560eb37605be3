"""Benchmark ATRC's relational context on the CPU: step time against the multi-task baseline, and
the search network's peak memory against the distillation network's.

    python benchmarks/bench_context.py                       # the table below, all in one run
    python benchmarks/bench_context.py --repeat 9 --threads 2 --json out.json
    python benchmarks/bench_context.py --skip-memory          # timings only

Step time: one training step (forward, :class:`atrc_exp.losses.MultiTaskLoss`, backward) of
HRNet18 on the four NYUD tasks, float32, batch 2, 192×256 by default, for

* ``baseline``: ``context=none`` (FCN heads, the multi-task baseline);
* ``atrc plain``: ``context=atrc`` with ``genotypes/nyud_hrnet18.json``, the per-block path
  (``set_fused(model, False)``: every CP block called on its own, as the original);
* ``atrc fused``: the same network and weights, batched projections (the default);
* ``baseline (original path)``, ``atrc (original path)``: the same two networks with every
  switchable fast path off — block by block (``set_fused(model, False)``, also the FCN head's task
  bottlenecks), PyTorch's batch norm + ReLU, label attention and cross-entropy (the ``torch``
  backend of each CPU kernel), the model upsampling its outputs to the input size before the loss.
  This is the original implementation's computation as far as this code base can switch to it
  (a few unswitchable tweaks of ours stay on, e.g. in the losses and in the upsampling layout), so
  ``atrc (original path) / atrc fused`` is a lower bound of the speed-up over the original,
  measured in the same run — the issue's "≥ 1.3× faster than the original" without comparing
  against a number taken on another day (the original: 1.0 s ATRC, 0.54 s baseline, 1.85×).
  ``--skip-original`` leaves them out.

The variants run interleaved (one step of each per round, ``--repeat`` rounds after a warm-up)
and the table gives the median and the minimum; the ratios use the medians. Freed memory is kept
for reuse as in training (``trainer.keep_freed_memory``, the default there);
``--return-freed-memory`` times with glibc's default instead (every step page-faults its large
tensors back: what this script measured before 2026-11-30, session 15).

Peak memory: each network runs in a fresh subprocess (glibc malloc set to return freed blocks,
so the resident size follows the live tensors): one warm-up step, then the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) during a second step minus the resident size
before it — activations, gradients and temporaries of one step. ``distill`` is the ATRC
network above, ``search`` is ``mode=search context=search`` (all 16 pairs mixing their ops, no
pair frozen), ``search plain`` the same with the per-op path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NYUD = ["semseg", "depth", "normals", "edge"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from atrc_exp.config import CONF_DIR, register_resolvers

    try:
        register_resolvers()
    except Exception:  # already registered
        pass
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build(context: str, seed: int = 0):
    """The NYUD HRNet18 network of ``context`` (none | atrc | search), train mode."""
    import torch

    import atrc_exp

    over = ["dataset=nyud", "backbone=hrnet18", "backbone.pretrained=false", f"context={context}"]
    if context == "atrc":
        over.append(f"context.genotype={REPO / 'genotypes' / 'nyud_hrnet18.json'}")
    if context == "search":
        over.append("mode=search")
    torch.manual_seed(seed)
    return atrc_exp.build_model(_compose(over)).train()


def set_fused(model, fused: bool) -> None:
    try:
        from atrc_exp.models.relational_head import set_fused as _set
    except ImportError:  # a checkout without the fused path: every variant is the per-block one
        return
    _set(model, fused)


def make_batch(batch: int, height: int, width: int, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, height, width, generator=g)
    shape = (batch, 1, height, width)
    targets = {
        "semseg": torch.randint(0, 40, shape, generator=g),
        "depth": torch.rand(shape, generator=g) * 9 + 0.5,
        "normals": F.normalize(torch.randn(batch, 3, height, width, generator=g), dim=1),
        "edge": (torch.rand(shape, generator=g) > 0.9).float(),
    }
    return image, targets


def make_criterion():
    import torch
    import torch.nn.functional as F

    from atrc_exp.losses import MultiTaskLoss

    g = torch.Generator().manual_seed(1)
    centroids = F.normalize(torch.randn(40, 3, generator=g), dim=1)  # stands in for k-means centroids
    return MultiTaskLoss(NYUD, edge_pos_weight=0.8, normal_centroids=centroids)


def train_step(model, criterion, image, targets, resize: bool = False) -> None:
    try:  # as the trainer: the loss upsamples the outputs
        out = model(image, resize=resize)
    except TypeError:  # a checkout whose model always upsamples
        out = model(image)
    loss, _ = criterion(out, targets)
    model.zero_grad(set_to_none=True)
    loss.backward()


@contextlib.contextmanager
def original_path():
    """Every CPU kernel op (``atrc_exp.engine.trainer.CPU_KERNEL_OPS``) on its ``torch`` backend
    (PyTorch's ops), restored after; a checkout without that table switches the batch norm only."""
    import importlib

    try:
        from atrc_exp.engine.trainer import CPU_KERNEL_OPS as ops
    except ImportError:
        ops = ("batch_norm",)
    saved = []
    for name in ops:
        try:
            mod = importlib.import_module(f"atrc_exp.ops.{name}")
        except ImportError:
            continue
        saved.append((mod, mod.get_backend()))
        mod.set_backend("torch")
    try:
        yield
    finally:
        for mod, backend in saved:
            mod.set_backend(backend)


def _warm_local_attention() -> None:
    """Build/import the local-attention extension outside of any measurement."""
    import torch

    from atrc_exp.ops import local_attention

    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    local_attention(x, x, x, 3).sum().backward()


# -- timing -------------------------------------------------------------------------------------


def bench_time(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if not args.return_freed_memory:
        from atrc_exp.engine.fast_paths import keep_freed_memory

        keep_freed_memory()
    _warm_local_attention()
    image, targets = make_batch(args.batch, *args.size)
    criterion = make_criterion()
    baseline = build("none")
    atrc = build("atrc")
    # name: (model, fused, original path)
    variants = {
        "baseline": (baseline, True, False),
        "atrc plain": (atrc, False, False),
        "atrc fused": (atrc, True, False),
    }
    if not args.skip_original:
        variants["baseline (original path)"] = (baseline, False, True)
        variants["atrc (original path)"] = (atrc, False, True)

    def run(name):
        model, fused, original = variants[name]
        set_fused(model, fused)
        with original_path() if original else contextlib.nullcontext():
            t0 = time.perf_counter()
            train_step(model, criterion, image, targets, resize=original)
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.warmup):
        for name in variants:
            run(name)
    for _ in range(args.repeat):
        for name in variants:
            times[name].append(run(name))
    return {k: {"median": statistics.median(v), "min": min(v), "all": v} for k, v in times.items()}


# -- memory -------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def mem_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    _warm_local_attention()
    image, targets = make_batch(spec["batch"], *spec["size"])
    criterion = make_criterion()
    model = build(spec["context"])
    if spec.get("fused") is not None:
        set_fused(model, spec["fused"])
    train_step(model, criterion, image, targets)  # warm-up: one-time allocations, .grad tensors
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    train_step(model, criterion, image, targets)
    dt = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {"peak_delta_mib": (peak - before) / 1024, "rss_before_mib": before / 1024, "step_s": dt}


def bench_memory(args) -> dict:
    env = dict(os.environ)
    # make freed tensors leave the resident set, so the peak RSS follows the live memory
    env.update({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    runs = {"distill": ("atrc", None), "search plain": ("search", False), "search": ("search", True)}
    out = {}
    for name, (context, fused) in runs.items():
        spec = {
            "context": context,
            "fused": fused,
            "batch": args.mem_batch,
            "size": list(args.mem_size),
            "threads": args.threads,
        }
        proc = subprocess.run(
            [sys.executable, __file__, "--mem-worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {name} failed:\n{proc.stderr[-4000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-batch", type=int, default=2)
    p.add_argument("--mem-size", type=int, nargs=2, default=(212, 280), metavar=("H", "W"))
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-original", action="store_true", help="no original-path variants")
    p.add_argument(
        "--return-freed-memory",
        action="store_true",
        help="time with glibc's default of returning freed memory (not keep_freed_memory as in training)",
    )
    p.add_argument("--json", type=str, default=None, help="also write the numbers here")
    p.add_argument("--mem-worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mem_worker is not None:
        print(json.dumps(mem_worker(json.loads(args.mem_worker))))
        return

    result: dict = {"threads": args.threads}
    if not args.skip_time:
        t = bench_time(args)
        result["time"] = t
        b = t["baseline"]["median"]
        print(
            f"\nstep time, HRNet18 NYUD 4 tasks, fp32, batch {args.batch}, "
            f"{args.size[0]}x{args.size[1]}, {args.threads} threads, {args.repeat} rounds"
        )
        print("| variant | median s | min s | / baseline (median) | / baseline (min) |")
        print("|---|---|---|---|---|")
        for name, v in t.items():
            r = v["median"] / b
            rmin = v["min"] / t["baseline"]["min"]
            print(f"| {name} | {v['median']:.3f} | {v['min']:.3f} | {r:.2f} | {rmin:.2f} |")
        plain, fused = t["atrc plain"]["median"], t["atrc fused"]["median"]
        over_p, over_f = plain - b, fused - b
        print(
            f"context overhead (atrc - baseline, medians): plain {over_p * 1e3:.0f} ms, "
            f"fused {over_f * 1e3:.0f} ms; fused speed-up of the step {plain / fused:.2f}x"
        )
        if "atrc (original path)" in t:
            ob, oa = t["baseline (original path)"]["median"], t["atrc (original path)"]["median"]
            print(
                f"original path: atrc / baseline {oa / ob:.2f}x (the original: 1.85x); "
                f"atrc fused vs atrc original path: {oa / fused:.2f}x faster (target >= 1.3x), "
                f"baseline {ob / b:.2f}x faster"
            )
    if not args.skip_memory:
        m = bench_memory(args)
        result["memory"] = m
        d = m["distill"]["peak_delta_mib"]
        print(
            f"\npeak memory of one training step (RSS delta), batch {args.mem_batch}, "
            f"{args.mem_size[0]}x{args.mem_size[1]}"
        )
        print("| network | peak delta MiB | / distill | step s |")
        print("|---|---|---|---|")
        for name, v in m.items():
            print(
                f"| {name} | {v['peak_delta_mib']:.0f} | {v['peak_delta_mib'] / d:.2f} | {v['step_s']:.2f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
