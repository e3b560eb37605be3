"""Time the fused CPU label-context attention (``atrc_exp.ops.label_attention``) against the
PyTorch formulation of ``LabelContextBlock.attend``.

    python benchmarks/bench_label_attention.py [--threads 2] [--repeat 50]

For ATRC's shapes (batch 2, a 48×64 feature map, d = 33 or 67 channels, K = 2 or 40 classes),
float32: forward (under ``torch.no_grad``) and forward + backward (gradients of query, key and
value) per call, median milliseconds. The reference and the kernel are timed alternately, call by
call, in one process, so both see the same machine; ratios are reference / kernel.

As in training (``trainer.keep_freed_memory``, on by default), glibc keeps freed memory for reuse;
``--return-freed-memory`` leaves glibc's default, under which calls may page-fault their output
and gradient tensors in afresh (slower and noisier timings for either implementation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [  # B, d, K, H, W
    (2, 33, 2, 48, 64),
    (2, 33, 40, 48, 64),
    (2, 67, 40, 48, 64),
]


def interleaved(fns: dict, repeat: int, warmup: int = 3) -> dict:
    """Median seconds per call of each function, calling them in turn ``repeat`` times (also used
    by ``bench_upsample_cross_entropy.py`` and ``bench_upsample_add.py``)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def with_backend(op, name: str, fn):
    """``fn`` run with ``op``'s backend set to ``name`` (the op module's ``set_backend``), the
    previous backend restored after each call; returns what ``fn`` returns."""

    def run():
        before = op.get_backend()
        op.set_backend(name)
        try:
            return fn()
        finally:
            op.set_backend(before)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeat", type=int, default=50, help="timed calls per case (default 50)")
    p.add_argument(
        "--return-freed-memory", action="store_true", help="glibc's default instead of keep_freed_memory()"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from atrc_exp.engine.fast_paths import keep_freed_memory

    kept = False if args.return_freed_memory else keep_freed_memory()
    from atrc_exp.ops import label_attention as laop

    laop.set_backend("cpp")  # fail loudly if the kernel cannot be built
    kernel, reference = laop.label_attention, laop.label_attention_reference
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, median ms per call of {args.repeat}, "
        f"freed memory {'kept' if kept else 'returned to the OS'}"
    )
    print("| B×d×K×H×W | ref fwd | kernel fwd | × | ref fwd+bwd | kernel fwd+bwd | × |")
    print("|---|---|---|---|---|---|---|")
    for B, d, K, H, W in SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, d, H, W, generator=g).relu_().requires_grad_()  # ReLU outputs in the model
        k = torch.randn(B, d, K, 1, generator=g).relu_().requires_grad_()
        v = torch.randn(B, d, K, 1, generator=g).relu_().requires_grad_()
        grad = torch.randn(B, d, H, W, generator=g)

        def fwd(fn, q=q, k=k, v=v):
            def run():
                with torch.no_grad():
                    fn(q, k, v)

            return run

        def fwd_bwd(fn, q=q, k=k, v=v, grad=grad):
            return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

        f = interleaved({"ref": fwd(reference), "kernel": fwd(kernel)}, args.repeat)
        fb = interleaved({"ref": fwd_bwd(reference), "kernel": fwd_bwd(kernel)}, args.repeat)
        ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
        print(
            f"| {B}×{d}×{K}×{H}×{W} | {ms(f['ref'])} | {ms(f['kernel'])} | {f['ref'] / f['kernel']:.1f} "
            f"| {ms(fb['ref'])} | {ms(fb['kernel'])} | {fb['ref'] / fb['kernel']:.1f} |"
        )


if __name__ == "__main__":
    main()
