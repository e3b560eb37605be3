"""``atrc-eval``: evaluate a trained model on a split and write ``metrics.json``.

    atrc-eval <run_dir>                          # newest checkpoint of the run, its val split
    atrc-eval <run_dir>/checkpoints/step_N       # that checkpoint
    atrc-eval <run_dir> --split train paths.data_dir=/data trainer.val_batch_size=4
    atrc-eval original.ckpt --config <run_dir or config.yaml>   # weights of the original code
    atrc-eval original.ckpt experiment=nyud_hrnet18_atrc context.genotype=g.json paths.data_dir=/data
    atrc-eval <run_dir> --export-edges out/edges    # also the edge maps as SEISM-readable PNGs

The model is rebuilt from the run's config (``<run>/.hydra/config.yaml``, else
``config_resolved.yaml``) with the ``key=value`` overrides. For weights of the original
implementation (a Lightning ``.ckpt`` or a plain state-dict file) the config comes from ``--config``
or is composed from ``conf/`` with the overrides (Hydra syntax, groups allowed); they load weights
only unless ``--trust-checkpoint``. A file that is not a checkpoint is a one-line error (exit code 2).

Evaluation runs in one process (CUDA when available, unless ``--cpu``) with the validation of
training, so a checkpoint's numbers reproduce the ``metrics.json`` of the run that saved it.
Output: ``<out>/metrics.json`` (default ``<run>/eval/``) and a table on screen.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger("atrc_exp.eval")

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.pt")
TRUST_HELP = (
    "load original weights with a full unpickle, which can run code from the file: only for files you "
    "trust (default: weights only; a file that needs more is refused)"
)


class EvalError(Exception):
    """A user-facing error (bad path, missing checkpoint, ...)."""


def resolve_target(target: str | Path) -> tuple[Path | None, Path | None, Path | None]:
    """``(run_dir, checkpoint_dir, original_weights_file)`` for a run dir, a checkpoint dir or a file."""
    from ..engine.checkpoint import list_checkpoints

    p = Path(target).expanduser()
    if not p.exists():
        raise EvalError(f"{p}: no such run folder, checkpoint folder or weights file")
    if p.is_file():
        return None, None, p
    if (p / "meta.json").is_file():  # a checkpoint folder
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        return run, p, None
    ckpts = list_checkpoints(p / "checkpoints")
    if not ckpts:
        raise EvalError(
            f"{p}: no checkpoint in {p / 'checkpoints'} (expected step_N/ folders with meta.json)"
        )
    return p, ckpts[-1], None


def load_run_config(run_dir: Path | None, overrides: list[str], config: str | None = None):
    """The run's config with ``key=value`` overrides; composed from ``conf/`` when there is no run."""
    from omegaconf import OmegaConf

    from ..config import compose

    src = Path(config).expanduser() if config else run_dir
    if src is None:
        return compose(overrides)
    if src.is_dir():
        found = [c for c in (src / ".hydra/config.yaml", src / "config_resolved.yaml") if c.is_file()]
        if not found:
            raise EvalError(f"{src}: no .hydra/config.yaml or config_resolved.yaml")
        src = found[0]
    cfg = OmegaConf.load(src)
    bad = [o for o in overrides if "=" not in o or "/" in o.split("=", 1)[0]]
    if bad:
        raise EvalError(f"overrides of a saved config must be key=value (no group changes): {bad}")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    return cfg


def load_weights(model, ckpt_dir: Path | None, weights_file: Path | None, trust: bool = False) -> int:
    """Load our Accelerate checkpoint or original-implementation weights; returns the step (or -1).

    Original weights load with ``weights_only=True`` unless ``trust`` (``--trust-checkpoint``: a full
    unpickle, which can run code from the file). Any file that is not a fitting checkpoint is an
    :class:`EvalError` (one line naming the file and what was expected).
    """
    from ..models.state_dict import WeightsError, read_checkpoint

    if ckpt_dir is not None:
        f = next((ckpt_dir / n for n in WEIGHT_FILES if (ckpt_dir / n).is_file()), None)
        if f is None:
            raise EvalError(f"{ckpt_dir}: no model weights ({' / '.join(WEIGHT_FILES)})")
        try:
            sd = read_checkpoint(f, "the model weights of an atrc-train checkpoint")
            if not isinstance(sd, dict):
                raise WeightsError(f"{f}: not a state dict (got {type(sd).__name__})")
            model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, strict=True)
        except WeightsError as e:
            raise EvalError(str(e)) from e
        except RuntimeError as e:
            raise EvalError(f"{f}: does not fit the configured model: {' '.join(str(e).split())}") from e
        return int(json.loads((ckpt_dir / "meta.json").read_text()).get("step", -1))
    from ..models.original import load_original_state_dict

    try:
        load_original_state_dict(model, weights_file, weights_only=not trust)
    except WeightsError as e:
        raise EvalError(f"not loadable as original-implementation weights: {e}") from e
    except (ValueError, KeyError, RuntimeError) as e:
        raise EvalError(f"{weights_file}: not loadable as original-implementation weights: {e}") from e
    return -1


def build_eval_model(
    args_target: str, overrides: list[str], config: str | None, cpu: bool = False, trust: bool = False
):
    """``(model in eval mode, cfg, run_dir, ckpt_dir, weights_file, step, device)``; ``trust``: load
    original weights with a full unpickle (see :func:`load_weights`)."""
    import torch
    from omegaconf import open_dict

    from ..models import build_model

    run_dir, ckpt_dir, wfile = resolve_target(args_target)
    cfg = load_run_config(run_dir, overrides, config)
    with open_dict(cfg):
        if "backbone" in cfg and cfg.backbone.get("pretrained") not in (None, False):
            cfg.backbone.pretrained = False  # the checkpoint has all weights: never fetch ImageNet ones
    model = build_model(cfg)
    step = load_weights(model, ckpt_dir, wfile, trust)
    device = torch.device("cuda" if torch.cuda.is_available() and not (cpu or cfg.trainer.cpu) else "cpu")
    model.to(device).eval()
    return model, cfg, run_dir, ckpt_dir, wfile, step, device


def evaluate(model, cfg, device, split: str | None = None, export_edges=None):
    """``(metrics, labelled_images, timing)`` of ``model`` over a split of the configured dataset:
    the validation of training (:func:`atrc_exp.engine.trainer.validate`), in one process on
    ``device``; ``export_edges``: a folder for the edge maps as SEISM PNGs."""
    from accelerate import Accelerator
    from omegaconf import open_dict

    from ..config import config_tasks
    from ..data import build_datasets, prepare_data
    from ..engine.trainer import build_metrics, build_val_loader, reset_accelerate_state, validate

    if split:
        with open_dict(cfg):
            cfg.dataset.val_split = split
    _, val_ds = build_datasets(cfg, prepare_data(cfg, progress=False))
    tasks = config_tasks(cfg)
    metrics = build_metrics(cfg, tasks)
    edge_tasks = [t.name for t in tasks if t.kind.name == "edge"] if export_edges is not None else []
    t0 = time.perf_counter()
    loop_end = [t0]

    def after_batch(batch: dict, final: dict) -> None:
        for name in edge_tasks:
            folder = export_edges if len(edge_tasks) == 1 else Path(export_edges) / name
            _export_edges(final[name], batch, folder, name)
        loop_end[0] = time.perf_counter()

    acc = Accelerator(cpu=device.type != "cuda", mixed_precision=str(cfg.trainer.mixed_precision))
    try:
        results = validate(model, build_val_loader(val_ds, cfg, acc), metrics, acc, after_batch)
        timing = {"images": len(val_ds), "seconds_total": time.perf_counter() - t0}
        timing.update(seconds_model_loop=loop_end[0] - t0, **metrics.timings())
        return results, metrics.labelled_images(), timing
    finally:
        metrics.close()
        reset_accelerate_state()


def _export_edges(logits, batch, out_dir, task: str) -> None:
    """The edge maps of a batch as SEISM PNGs: ``uint8(255·sigmoid)`` (truncated), cropped from the
    centre of the padded prediction to each image's size (``meta["size"]``; without it, to the
    valid pixels of the edge target)."""
    from ..evaluation.edge import save_seism_pngs
    from ..metrics import batch_image_sizes

    prob = logits.float().sigmoid().cpu().numpy()
    names = batch["meta"]["name"] if "meta" in batch else [f"{i:06d}" for i in range(len(prob))]
    targets = batch[task].cpu().numpy() if task in batch else None
    save_seism_pngs(prob, names, out_dir, targets=targets, sizes=batch_image_sizes(batch, prob.shape))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atrc-eval",
        description="Evaluate a checkpoint (ours, or original weights) on a split; write metrics.json.",
    )
    p.add_argument(
        "target", help="run folder, checkpoint folder (checkpoints/step_N) or original weights file"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. paths.data_dir=/data)")
    p.add_argument("--split", help="split to evaluate (default: the config's dataset.val_split)")
    p.add_argument("--out", help="output folder (default: <run>/eval, or ./eval)")
    p.add_argument("--config", help="run folder or config YAML (for original weights)")
    p.add_argument("--cpu", action="store_true", help="evaluate on the CPU even when CUDA is present")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument(
        "--edge-workers", type=int, help="edge odsF worker processes (default: trainer.edge_eval_workers)"
    )
    p.add_argument("--export-edges", help="also write edge maps as 8-bit PNGs for SEISM to this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from omegaconf import open_dict

    from ..engine.checkpoint import write_json_atomic
    from ..metrics import format_metrics_table

    try:
        model, cfg, run_dir, ckpt_dir, wfile, step, device = build_eval_model(
            args.target, args.overrides, args.config, args.cpu, args.trust_checkpoint
        )
        if args.edge_workers is not None:
            with open_dict(cfg):
                cfg.trainer.edge_eval_workers = args.edge_workers
        export = Path(args.export_edges) if args.export_edges else None
        metrics, labelled, timing = evaluate(model, cfg, device, args.split, export)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ((run_dir / "eval") if run_dir is not None else Path("eval"))
    out.mkdir(parents=True, exist_ok=True)
    split = args.split or str(cfg.dataset.val_split)
    ckpt = ckpt_dir or wfile
    record = dict(step=step, metrics=metrics, labelled_images=labelled, split=split, checkpoint=str(ckpt))
    write_json_atomic(out / "metrics.json", {**record, "edge_eval": timing})
    print(format_metrics_table(metrics, f"{split} metrics ({ckpt}, step {step}, {device})"))
    for key in [k for k in timing if k.endswith("/images") and timing[k]]:
        t = key[: -len("/images")]
        print(
            f"{t} odsF evaluation: {timing[key]:.0f} images, "
            f"{timing[f'{t}/work_seconds'] / timing[key]:.2f} s/image, "
            f"{timing[f'{t}/workers']:.0f} workers; whole evaluation {timing['seconds_total']:.1f} s"
        )
    print(f"written: {out / 'metrics.json'}")
    if export:
        print(f"edge PNGs for SEISM: {export}")
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        log.warning("non-finite metrics: %s", bad)
    return 0


if __name__ == "__main__":
    sys.exit(main())
