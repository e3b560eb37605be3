"""``atrc-predict``: run a trained model on a folder of images of any size.

    atrc-predict --run <run_dir | checkpoint_dir | original.ckpt> --images photos/ --out preds/
    atrc-predict --run original.ckpt --config <run_dir or yaml> --images photos/ --out preds/

Original weights load as ``atrc-eval`` loads them: weights only, unless ``--trust-checkpoint``.

Each image is normalised like the validation data (ImageNet statistics), padded to a multiple of
32 with the image in the centre (with 0 after normalisation, i.e. the mean colour — as validation
pads to the crop size), run through the network, and every output is cropped back from the
centre to the original size: no resizing, so the predictions are pixel-aligned with the input.
Per image ``<stem>`` and task, in ``<out>/<stem>/``:

* ``<task>.npy`` — the prediction in target units, by the task's kind: segmentation class indices
  (H×W int64), depth metres (H×W float32, clamped at 0), normals unit vectors (H×W×3), saliency
  and edge probabilities (H×W float32);
* ``<task>.png`` — segmentation maps as 8-bit PNGs (class indices); saliency and edges as 8-bit
  probability PNGs (``uint8(255·p)``, truncated: the edge PNGs the original wrote for SEISM);
* ``<task>_color.png`` — a coloured rendering (VOC palette, viridis depth, normals as RGB,
  grey-scale saliency and edges), pixel-aligned with the image; a segmentation task whose classes
  have names also gets ``<task>_legend.png`` (colour → class name), shown beside it in the sheet;
* ``sheet.png`` — the image and all renderings side by side, titled with the task names.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from .eval import TRUST_HELP, EvalError, build_eval_model

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
STRIDE = 32


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise EvalError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise EvalError(f"{folder}: no images ({', '.join(IMAGE_EXTS)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise EvalError(f"{path}: not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def predict_image(model, rgb: np.ndarray, device, tasks) -> dict[str, np.ndarray]:
    """Predictions of one H×W×3 uint8 RGB image for ``tasks`` (:class:`~atrc_exp.task_kinds.Task`
    objects), cropped to H×W (see module doc): H×W maps, or H×W×C for multi-channel ones."""
    import torch

    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..tasks import crop_center, pad_offsets

    h, w = rgb.shape[:2]
    img = (rgb.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    top, left = pad_offsets((h, w), (h + ph, w + pw))  # the image in the centre, as validation
    img = np.pad(img, ((top, ph - top), (left, pw - left), (0, 0)))
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].to(device)
    with torch.no_grad():
        out = model(x)["final"]
    preds = {}
    for task in tasks:
        p = task.kind.postprocess(crop_center(out[task.name], (h, w)))[0].cpu().numpy()
        if task.kind.integer_labels and p.ndim == 2:  # class indices
            preds[task.name] = p.astype(np.int64)
        elif p.ndim == 3 and p.shape[0] > 1:  # C×H×W maps
            preds[task.name] = p.transpose(1, 2, 0).astype(np.float32)
        else:
            preds[task.name] = p.reshape(h, w).astype(np.float32)
    return preds


def _title(img: np.ndarray, text: str) -> np.ndarray:
    import cv2

    bar = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


def write_predictions(rgb: np.ndarray, preds: dict[str, np.ndarray], out_dir: Path, tasks) -> dict[str, Path]:
    """Write the files listed in the module doc for one image; returns them by name."""
    import cv2

    from ..visualize import legend

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def write(name: str, img: np.ndarray, from_rgb: bool = True) -> None:
        written[name] = out_dir / name
        cv2.imwrite(str(written[name]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if from_rgb else img)

    panels = [_title(rgb, "image")]
    for task in tasks:
        name, kind, p = task.name, task.kind, preds[task.name]
        written[f"{name}.npy"] = out_dir / f"{name}.npy"
        np.save(written[f"{name}.npy"], p)
        png = kind.prediction_png(p)
        if png is not None:
            write(f"{name}.png", png, from_rgb=False)
        color = kind.colorize(p.transpose(2, 0, 1) if p.ndim == 3 else p)
        write(f"{name}_color.png", color)
        if task.named_classes:  # named classes: a legend beside
            leg = legend(task.named_classes, color.shape[0])
            write(f"{name}_legend.png", leg)
            color = np.pad(color, ((0, leg.shape[0] - color.shape[0]), (0, 0), (0, 0)), constant_values=255)
            color = np.concatenate([color, leg], 1)
        panels.append(_title(color, name))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    write("sheet.png", np.concatenate(panels, 1))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atrc-predict", description="Predict every task for a folder of images.")
    p.add_argument("--run", required=True, help="run folder, checkpoint folder or original weights file")
    p.add_argument("--images", required=True, help="folder of images (any size)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per image)")
    p.add_argument("--config", help="run folder or config YAML (for original weights)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        files = list_images(Path(args.images))
        model, cfg, _, ckpt, wfile, step, device = build_eval_model(
            args.run, args.overrides, args.config, args.cpu, args.trust_checkpoint
        )
        from ..config import config_tasks

        tasks = config_tasks(cfg)
        out = Path(args.out)
        for f in files:
            rgb = read_rgb(f)
            preds = predict_image(model, rgb, device, tasks)
            write_predictions(rgb, preds, out / f.stem, tasks)
            print(f"{f.name}: {rgb.shape[1]}x{rgb.shape[0]} -> {out / f.stem}")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(files)} images, tasks {', '.join(cfg.tasks.names)} ({ckpt or wfile}, step {step}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
