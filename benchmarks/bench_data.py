"""Train-transform benchmark: the pipeline of
:func:`~atrc_exp.data.transforms.build_train_transform` against the reference pipeline (the spec
step by step as plain code, ``tests/reference_pipeline.py``, which the fast pipeline equals sample
for sample), interleaved in one run, on NYUD- and PASCAL-sized in-memory samples, one core.

    python benchmarks/bench_data.py [--n N]

prints ms per step, samples/s (wall clock and of thread CPU time) and the ratios to the reference
and to the original's 57 samples/s. ``bench_transforms(n)`` gives ``[(case, samples/s)]`` to other
scripts (``sys.path.insert(0, "<repo>/benchmarks"); from bench_data import bench_transforms``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from atrc_exp.data.transforms import build_train_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_pipeline import fake_sample, reference_train_steps  # noqa: E402

#: Samples/s of the original train pipeline on one core (issue 3), the benchmark's reference.
ORIGINAL_SAMPLES_PER_S = 57.0

#: The benchmark cases: (label, input H×W, crop H×W, tasks, semseg classes).
BENCH_CASES = [
    ("NYUD 480x640 -> 425x560, 4 tasks", (480, 640), (425, 560), ["semseg", "depth", "normals", "edge"], 40),
    ("PASCAL 375x500 -> 512x512, 5 tasks", (375, 500), (512, 512),
     ["semseg", "human_parts", "sal", "normals", "edge"], 21),
]  # fmt: skip


def bench_table(n: int = 100) -> list[dict]:
    """Train-transform cost on one core for NYUD- and PASCAL-sized in-memory inputs: per case a dict
    with ``label``, ``steps``/``ref_steps`` (``[(name, mean ms per sample)]`` of the pipeline and of
    ``reference_train_steps``; wall clock), ``rate``/``ref_rate`` (samples/s, wall clock),
    ``cpu_rate``/``ref_cpu_rate`` (samples/s of thread CPU time: what a core of its own would give
    on a shared machine) and ``speedup`` (of the rates). Samples alternate between the two
    pipelines, so that both see the same machine load."""
    prev = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    try:
        return [_bench_case(case, n, rng) for case in BENCH_CASES]
    finally:
        cv2.setNumThreads(prev[0])
        torch.set_num_threads(prev[1])


def _bench_case(case: tuple, n: int, rng: np.random.Generator) -> dict:
    label, (h, w), crop, tasks, k = case
    samples = [fake_sample(h, w, tasks, k, rng) for _ in range(4)]
    # the reference's own copies (no cache shared between the two)
    ref_samples = [{k: (v if k == "meta" else v.copy()) for k, v in s.items()} for s in samples]
    fast = [(type(t).__name__, t) for t in build_train_transform(crop, ratio_task="semseg").transforms]
    ref = reference_train_steps(crop)
    totals = {"fast": np.zeros(len(fast)), "ref": np.zeros(len(ref))}
    cpu = {"fast": 0.0, "ref": 0.0}

    def run(steps: list, sample: dict, key: str | None) -> None:
        c0 = time.thread_time()
        for j, (_, fn) in enumerate(steps):
            t0 = time.perf_counter()
            sample = fn(sample)
            if key is not None:
                totals[key][j] += time.perf_counter() - t0
        if key is not None:
            cpu[key] += time.thread_time() - c0

    for i in range(len(samples)):  # warm-up
        run(fast, samples[i], None)
        run(ref, ref_samples[i], None)
    for i in range(n):
        run(fast, samples[i % len(samples)], "fast")
        run(ref, ref_samples[i % len(samples)], "ref")
    ms = {key: v * 1e3 / n for key, v in totals.items()}
    rate, ref_rate = 1e3 / ms["fast"].sum(), 1e3 / ms["ref"].sum()
    return {
        "label": label,
        "steps": [(name, float(m)) for (name, _), m in zip(fast, ms["fast"])],
        "ref_steps": [(name, float(m)) for (name, _), m in zip(ref, ms["ref"])],
        "rate": rate,
        "ref_rate": ref_rate,
        "cpu_rate": n / cpu["fast"],
        "ref_cpu_rate": n / cpu["ref"],
        "speedup": rate / ref_rate,
    }


def bench_transforms(n: int = 100) -> list[tuple[str, float]]:
    """Train-transform samples/s on one core for NYUD- and PASCAL-sized in-memory inputs."""
    return [(r["label"], r["rate"]) for r in bench_table(n)]


def format_bench(results: list[dict], n: int) -> str:
    """The table that this script prints."""
    orig = ORIGINAL_SAMPLES_PER_S
    lines = [f"Train transforms, one core (1 cv2/torch thread), in-memory inputs, {n} samples per case;",
             "'reference' = the spec step by step as plain code, timed in the same run, interleaved;",
             "ms per step and samples/s: wall clock; 'of CPU time': thread CPU time (shared machines)."]  # fmt: skip
    for r in results:
        fast, ref = r["steps"], r["ref_steps"]
        lines += ["", r["label"], f"  {'pipeline step':<24}{'ms':>8}    {'reference step':<18}{'ms':>8}"]
        for j in range(max(len(fast), len(ref))):
            a = f"  {fast[j][0]:<24}{fast[j][1]:>8.2f}" if j < len(fast) else " " * 34
            b = f"    {ref[j][0]:<18}{ref[j][1]:>8.2f}" if j < len(ref) else ""
            lines.append(a + b)
        tf, tr = sum(m for _, m in fast), sum(m for _, m in ref)
        lines += [
            f"  {'total':<24}{tf:>8.2f}    {'total':<18}{tr:>8.2f}",
            f"  {'samples/s':<24}{r['rate']:>8.1f}    {'samples/s':<18}{r['ref_rate']:>8.1f}",
            f"  {'samples/s of CPU time':<24}{r['cpu_rate']:>8.1f}    {'of CPU time':<18}{r['ref_cpu_rate']:>8.1f}",
            f"  {f'vs the original {orig:.0f}/s':<24}{r['rate'] / orig:>7.2f}x    "
            f"{'vs the original':<18}{r['ref_rate'] / orig:>7.2f}x",
            f"  speed-up vs the reference: {r['speedup']:.2f}x "
            f"({r['cpu_rate'] / r['ref_cpu_rate']:.2f}x in CPU time)",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="samples per case (and pipeline)")
    a = p.parse_args(argv)
    print(format_bench(bench_table(a.n), a.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
