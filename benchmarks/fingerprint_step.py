"""Fingerprint one float64 training forward + backward, to check that two versions of the code
compute the same function (a refactor, a removed fast path).

    python benchmarks/fingerprint_step.py atrc > new.json
    PYTHONPATH=/path/to/old/checkout python benchmarks/fingerprint_step.py atrc > old.json
    python benchmarks/fingerprint_step.py --compare old.json new.json     # worst relative difference
    python benchmarks/fingerprint_step.py atrc --time 5     # ms of a float32 step (A/B the same way)

HRNet18 with ``context`` (``atrc``: the published NYUD genotype; ``search``; any other context
name), NYUD's four tasks, batch 2 at 64×96, float64, the BN scales randomised (``out_proj`` starts
at zero otherwise), the local attention on its PyTorch backend, fixed seeds for the weights, the
batch, dropout and Gumbel noise. Prints the loss, every loss term and the summed absolute gradient
of a few parameters across the network (backbone, aux head, a CP block, ``out_proj``, final
logits, α) and of every batch norm's running statistics after the step, as JSON. Needs only what every version has: ``atrc_exp.config.compose``,
``atrc_exp.models.build_model`` and ``atrc_exp.losses.MultiTaskLoss``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBES = (
    "backbone.conv1",
    "aux_conv.depth.conv",
    "cp_blocks.semseg.depth.query_project.0.conv",
    "out_proj.normals.conv",
    "final_logits.edge",
    "arch_param",
)


def setup(context: str, dtype, b: int, h: int, w: int, threads: int = 1):
    """(model in train mode, batch, criterion) of ``context`` in ``dtype``, seeded."""
    import torch

    from atrc_exp.config import compose
    from atrc_exp.losses import MultiTaskLoss
    from atrc_exp.models import build_model
    from atrc_exp.task_kinds import paper_tasks

    torch.set_num_threads(threads)
    over = ["dataset=nyud", "backbone.pretrained=false", f"context={context}"]
    if context == "search":
        over.append("mode=search")
    elif context == "atrc":
        over.append(f"context.genotype={REPO / 'genotypes' / 'nyud_hrnet18.json'}")
    cfg = compose(over)
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    g = torch.Generator().manual_seed(0)
    normals = torch.randn(b, 3, h, w, generator=g, dtype=dtype)
    batch = {
        "image": torch.randn(b, 3, h, w, generator=g, dtype=dtype),
        "semseg": torch.randint(0, 40, (b, h, w), generator=g),
        "depth": torch.rand(b, 1, h, w, generator=g, dtype=dtype) * 9 + 0.5,
        "normals": normals / normals.norm(dim=1, keepdim=True),
        "edge": (torch.rand(b, 1, h, w, generator=g, dtype=dtype) > 0.9).to(dtype),
    }
    centroids = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    centroids = (centroids / centroids.norm(dim=1, keepdim=True)).numpy()
    tasks = paper_tasks(
        list(cfg.tasks.names),
        edge={"edge_pos_weight": 0.8},
        semseg={"classes": 40},
        normals={"centroids": centroids},
    )
    return model, batch, MultiTaskLoss(tasks)


def fingerprint(context: str) -> dict[str, float]:
    import torch

    import atrc_exp.ops as ops

    model, batch, criterion = setup(context, torch.float64, 2, 64, 96)
    ops.set_backend("torch")
    torch.manual_seed(1)
    loss, terms = criterion(model(batch["image"]), batch)
    loss.backward()
    out = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
    for name, p in model.named_parameters():
        if p.grad is not None and any(k in name for k in PROBES):
            out[f"grad:{name}"] = float(p.grad.abs().sum())
    for name, b in model.named_buffers():  # batch-norm running statistics after the step
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out[f"buffer:{name}"] = float(b.double().abs().sum())
    return out


def compare(a: dict, b: dict) -> float:
    """The worst relative difference over the keys both have (and the keys only one has: an error)."""
    if a.keys() != b.keys():
        raise SystemExit(f"different keys: {sorted(a.keys() ^ b.keys())}")
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-300) for k in a)


def time_step(context: str, repeats: int, compiled: bool = False) -> str:
    """Milliseconds of one float32 forward + backward (batch 8 at 120×160, 2 threads, the
    local-attention op's default backend; ``compiled``: the model under ``torch.compile``, its
    compilation in the first step): the minimum and the median of ``repeats``."""
    import statistics
    import time

    import torch

    model, batch, criterion = setup(context, torch.float32, 8, 120, 160, threads=2)
    forward = torch.compile(model) if compiled else model
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = criterion(forward(batch["image"]), batch)
        loss.backward()
        times.append((time.perf_counter() - start) * 1000)
    return f"{context}{' compiled' if compiled else ''}: min {min(times[1:]):.0f} ms, median {statistics.median(times[1:]):.0f} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("context", nargs="?", default="atrc")
    p.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="two fingerprints: print the worst relative difference"
    )
    p.add_argument("--time", type=int, metavar="N", help="time N float32 forward+backward steps instead")
    p.add_argument("--compile", action="store_true", help="with --time: the model under torch.compile")
    args = p.parse_args(argv)
    if args.time:
        print(time_step(args.context, args.time, args.compile))
        return 0
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        print(f"{len(a)} values, worst relative difference {compare(a, b):.3g}")
        return 0
    print(json.dumps(fingerprint(args.context)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
