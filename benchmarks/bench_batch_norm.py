"""Time the fused CPU batch norm + ReLU (``atrc_exp.ops.batch_norm``) against PyTorch's, and the
extension's softplus against ``F.softplus``.

    python benchmarks/bench_batch_norm.py [--threads 2]

For the batch-norm shapes of HRNet18 and the ATRC head (batch 2, 192×256 input), forward and
forward + backward of ``relu(batch_norm(x))`` in training mode, float32, per call (median):

* ``warm``: the same tensor every call (it stays in the caches: the kernels' best case);
* ``cold``: a different tensor every call, cycling through enough of them to leave the L2 cache
  (closer to a training step, where every batch norm reads an activation written long before).

Ratios are PyTorch / kernel from the same run. The whole-step effect is measured by the
``no_fused_bn`` row of ``benchmarks/bench_train.py`` (it switches the softplus off too).

The softplus table times ``atrc_exp.ops.batch_norm.softplus`` (the global-context blocks'
queries and keys: a 33-channel slice of a batched projection) the same way, backward included
(PyTorch's ``softplus_backward`` in both).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SOFTPLUS_SHAPES = [(2, 33, 48, 64), (8, 33, 107, 140)]
SHAPES = [
    (2, 18, 48, 64),
    (2, 36, 24, 32),
    (2, 64, 96, 128),
    (2, 132, 48, 64),
    (2, 268, 48, 64),
    (2, 1080, 48, 64),
]


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _copies(shape, mode: str) -> int:
    """Inputs per timed call: one (warm), or enough for ≥ 64 MiB of inputs + gradients (cold)."""
    return 1 if mode == "warm" else max(2, (64 << 20) // (torch.Size(shape).numel() * 4 * 2))


def _row(label: str, mode: str, op, xs, gs, reps: int) -> str:
    """One table row: ``op`` (one input → output) on every input of ``xs``, forward under no_grad
    and forward+backward (gradients ``gs``), ms per call with PyTorch's and with the kernel."""
    from atrc_exp.ops import batch_norm as bnop

    fwd, both = {}, {}
    for backend in ("torch", "cpp"):
        bnop.set_backend(backend)

        def f():
            with torch.no_grad():
                for x in xs:
                    op(x)

        def fb():
            for x, g in zip(xs, gs):
                op(x).backward(g)

        fwd[backend] = _time(f, reps) / len(xs) * 1e3
        both[backend] = _time(fb, reps) / len(xs) * 1e3
    cells = [label, mode]
    for t in (fwd, both):
        cells += [f"{t['torch']:.3f}", f"{t['cpp']:.3f}", f"{t['torch'] / t['cpp']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from atrc_exp.ops import batch_norm as bnop

    bnop.set_backend("cpp")  # fail loudly if the kernel cannot be built
    print(f"torch {torch.__version__}, {args.threads} threads, float32, training mode, ms per call")
    print("| shape | mode | torch fwd | kernel fwd | × | torch fwd+bwd | kernel fwd+bwd | × |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        C = shape[1]
        w, b = torch.rand(C) + 0.5, torch.randn(C)

        def bn_relu(x, w=w, b=b):
            return bnop.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, relu=True)

        for mode in ("warm", "cold"):
            k = _copies(shape, mode)
            xs = [torch.randn(shape).requires_grad_() for _ in range(k)]
            gs = [torch.randn(shape) for _ in range(k)]
            print(_row("×".join(map(str, shape)), mode, bn_relu, xs, gs, args.reps))
    print()
    print("| softplus of | mode | torch fwd | kernel fwd | × | torch fwd+bwd | kernel fwd+bwd | × |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SOFTPLUS_SHAPES:
        for mode in ("warm", "cold"):
            k = _copies(shape, mode)
            # a 33-channel slice of a 3x wider tensor, as the batched projections give it
            xs = [
                (
                    torch.randn(shape[0], 3 * shape[1], *shape[2:])[:, shape[1] : 2 * shape[1]] * 3
                ).requires_grad_()
                for _ in range(k)
            ]
            gs = [torch.randn(shape) for _ in range(k)]
            print(_row(f"{'×'.join(map(str, shape))} (slice)", mode, bnop.softplus, xs, gs, args.reps))
    bnop.set_backend("auto")


if __name__ == "__main__":
    main()
