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
        numel = torch.Size(shape).numel()
        for mode in ("warm", "cold"):
            k = 1 if mode == "warm" else max(2, (64 << 20) // (numel * 4 * 2))  # ≥ 64 MiB of x + grad
            xs = [torch.randn(shape).requires_grad_() for _ in range(k)]
            gs = [torch.randn(shape) for _ in range(k)]
            w, b = torch.rand(C) + 0.5, torch.randn(C)
            row = [f"{'×'.join(map(str, shape))}", mode]
            fwd, both = {}, {}
            for backend in ("torch", "cpp"):
                bnop.set_backend(backend)

                def f(xs=xs, w=w, b=b):
                    with torch.no_grad():
                        for x in xs:
                            bnop.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, relu=True)

                def fb(xs=xs, gs=gs, w=w, b=b):
                    for x, g in zip(xs, gs):
                        bnop.batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, relu=True).backward(g)

                fwd[backend] = _time(f, args.reps) / k * 1e3
                both[backend] = _time(fb, args.reps) / k * 1e3
            row += [f"{fwd['torch']:.3f}", f"{fwd['cpp']:.3f}", f"{fwd['torch'] / fwd['cpp']:.1f}"]
            row += [f"{both['torch']:.3f}", f"{both['cpp']:.3f}", f"{both['torch'] / both['cpp']:.1f}"]
            print("| " + " | ".join(row) + " |")
    print()
    print("| softplus of | mode | torch fwd | kernel fwd | × | torch fwd+bwd | kernel fwd+bwd | × |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SOFTPLUS_SHAPES:
        numel = torch.Size(shape).numel()
        for mode in ("warm", "cold"):
            k = 1 if mode == "warm" else max(2, (64 << 20) // (numel * 4 * 2))
            # a 33-channel slice of a 3x wider tensor, as the batched projections give it
            xs = [
                torch.randn(shape[0], 3 * shape[1], *shape[2:])[:, shape[1] : 2 * shape[1]] * 3
                for _ in range(k)
            ]
            gs = [torch.randn(shape) for _ in range(k)]
            row = [f"{'×'.join(map(str, shape))} (slice)", mode]
            fwd, both = {}, {}
            for backend in ("torch", "cpp"):
                bnop.set_backend(backend)

                def f(xs=xs):
                    with torch.no_grad():
                        for x in xs:
                            bnop.softplus(x)

                def fb(xs=xs, gs=gs):
                    for x, g in zip(xs, gs):
                        x.requires_grad_()
                        bnop.softplus(x).backward(g)

                fwd[backend] = _time(f, args.reps) / k * 1e3
                both[backend] = _time(fb, args.reps) / k * 1e3
            row += [f"{fwd['torch']:.3f}", f"{fwd['cpp']:.3f}", f"{fwd['torch'] / fwd['cpp']:.1f}"]
            row += [f"{both['torch']:.3f}", f"{both['cpp']:.3f}", f"{both['torch'] / both['cpp']:.1f}"]
            print("| " + " | ".join(row) + " |")
    bnop.set_backend("auto")


if __name__ == "__main__":
    main()
