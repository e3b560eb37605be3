"""Time the CPU loss kernels (``atrc_exp.ops.upsample_cross_entropy``) against PyTorch's path.

    python benchmarks/bench_upsample_cross_entropy.py [--threads 2] [--repeat 30]

* the cross-entropy of low-resolution class logits (batch 2, 48×64 → 192×256, K = 40 classes as
  NYUD's semseg and aux depth/normals, K = 2 as the aux edge/sal): PyTorch's path is what the loss
  did before (``resize_prediction`` — a channels-last bilinear upsampling — then
  ``cross_entropy_loss``), the kernel upsamples inside the loss; forward (under
  ``torch.no_grad``) and forward + backward, median ms per call;
* the aux normals target (``normals_to_centroid_index``, 40 centroids, 2×3×192×256): the
  similarity matmul + channel argmax against the kernel.

Both sides are timed alternately, call by call, in one process (ratios = PyTorch / kernel); freed
memory is kept as in training (``trainer.keep_freed_memory``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_label_attention import interleaved, with_backend

CE_SHAPES = [(2, 40, 48, 64, 192, 256), (2, 2, 48, 64, 192, 256)]  # B, K, h, w, H, W


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per case (default 30)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from atrc_exp.engine.fast_paths import keep_freed_memory
    from atrc_exp.losses import cross_entropy_loss, normals_to_centroid_index
    from atrc_exp.ops import upsample_cross_entropy as op

    keep_freed_memory()
    op.set_backend("cpp")  # fail loudly if the kernel cannot be built
    op.kernel_applies(torch.zeros(1, 2, 1, 1))
    op.set_backend("auto")
    print(f"torch {torch.__version__}, {args.threads} threads, float32, median ms per call of {args.repeat}")
    print("| case | PyTorch fwd | kernel fwd | × | PyTorch fwd+bwd | kernel fwd+bwd | × |")
    print("|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    for B, K, h, w, H, W in CE_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, K, h, w, generator=g, requires_grad=True)
        y = torch.randint(0, K, (B, 1, H, W), generator=g)

        def fwd(x=x, y=y):
            with torch.no_grad():
                cross_entropy_loss(x, y)

        def both(x=x, y=y):
            torch.autograd.grad(cross_entropy_loss(x, y), x)

        f = interleaved({"torch": with_backend(op, "torch", fwd), "kernel": fwd}, args.repeat)
        fb = interleaved({"torch": with_backend(op, "torch", both), "kernel": both}, args.repeat)
        print(
            f"| CE {B}×{K}×{h}×{w} → {H}×{W} | {ms(f['torch'])} | {ms(f['kernel'])} | "
            f"{f['torch'] / f['kernel']:.1f} | {ms(fb['torch'])} | {ms(fb['kernel'])} | "
            f"{fb['torch'] / fb['kernel']:.1f} |"
        )
    g = torch.Generator().manual_seed(1)
    normals = F.normalize(torch.randn(2, 3, 192, 256, generator=g), dim=1)
    centroids = F.normalize(torch.randn(40, 3, generator=g), dim=1)
    nc = interleaved(
        {
            "torch": with_backend(op, "torch", lambda: normals_to_centroid_index(normals, centroids)),
            "kernel": lambda: normals_to_centroid_index(normals, centroids),
        },
        args.repeat,
    )
    print(
        f"| normals → nearest of 40 centroids, 2×3×192×256 | {ms(nc['torch'])} | {ms(nc['kernel'])} | "
        f"{nc['torch'] / nc['kernel']:.1f} | - | - | - |"
    )


if __name__ == "__main__":
    main()
