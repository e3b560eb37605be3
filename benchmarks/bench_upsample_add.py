"""Time the aux heads' first 1×1 convolution: on the concatenated features (as before) against
at the backbone branches' resolutions (``atrc_exp.models.layers.pointwise_conv_of_concat``).

    python benchmarks/bench_upsample_add.py [--threads 2] [--repeat 30]

HRNet18's branches at batch 2 and a 192×256 input (18×48×64, 36×24×32, 72×12×16, 144×6×8,
concatenated: 270×48×64), the four NYUD aux heads' 270 → 1080 weight. Variants, each forward
(under ``torch.no_grad``) and forward + backward (the weight's gradient, as in training: the aux
heads read detached features), median ms per call:

* ``concat``: ``F.conv2d`` of the concatenated features (the path before, and with
  ``ops.upsample_add.backend=torch``);
* ``branches, PyTorch``: the branch-wise products, resized with ``F.interpolate`` and added
  (``upsample_add_reference``): fewer multiply-adds, but PyTorch's resize of a 1080-channel map
  is slow, backward above all;
* ``branches, kernel``: the same with the C++ op (``conv1x1_upsample_add``: the first branch's
  product and the resize-and-add in one pass).

The variants run alternately, call by call, in one process (ratios against ``concat``); freed
memory is kept as in training (``trainer.keep_freed_memory``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_label_attention import interleaved, with_backend

BRANCHES = [(18, 48, 64), (36, 24, 32), (72, 12, 16), (144, 6, 8)]  # HRNet18 at 192×256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per case (default 30)")
    p.add_argument("--out-channels", type=int, default=1080, help="C_out (default 1080: 4 aux heads)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from atrc_exp.engine.fast_paths import keep_freed_memory
    from atrc_exp.models.layers import concat_features, pointwise_conv_of_concat
    from atrc_exp.ops import upsample_add as op

    keep_freed_memory()
    op.set_backend("cpp")  # fail loudly if the kernel cannot be built
    g = torch.Generator().manual_seed(0)
    branches = [torch.randn(2, c, h, w, generator=g) for c, h, w in BRANCHES]
    x = concat_features(branches)
    weight = (torch.randn(args.out_channels, x.shape[1], 1, 1, generator=g) * 0.05).requires_grad_()

    def branchwise():
        return pointwise_conv_of_concat(branches, weight)

    variants = {
        "concat": lambda: F.conv2d(x, weight),
        # with the torch backend, pointwise_conv_of_concat resizes with F.interpolate
        "branches, PyTorch": with_backend(op, "torch", branchwise),
        "branches, kernel": branchwise,
    }

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def both(fn):
        return lambda: torch.autograd.grad(fn().square().sum(), weight)

    f = interleaved({k: fwd(v) for k, v in variants.items()}, args.repeat)
    fb = interleaved({k: both(v) for k, v in variants.items()}, args.repeat)
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, 270 → {args.out_channels} 1×1 convolution of "
        f"HRNet18's branches at 2×…×48×64, median ms per call of {args.repeat}"
    )
    print("| variant | fwd | vs concat | fwd+bwd | vs concat |")
    print("|---|---|---|---|---|")
    for k in variants:
        print(
            f"| {k} | {f[k] * 1e3:.2f} | {f['concat'] / f[k]:.2f}× | {fb[k] * 1e3:.2f} | {fb['concat'] / fb[k]:.2f}× |"
        )


if __name__ == "__main__":
    main()
