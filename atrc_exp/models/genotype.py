"""ATRC genotypes: which context each (target, source) pair uses.

File format (the original's, users have these files): ``{"data": {target: {source: code}}, "step": N}``
with the codes of :data:`~atrc_exp.models.context_blocks.CONTEXTS` (0 none, 1 global, 2 local,
3 t-label, 4 s-label). Published genotypes are in ``genotypes/`` at the top of the repository.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..config import ConfigError, resource_dir
from ..files import write_atomic
from .context_blocks import CONTEXTS, context_spec

#: File name of the genotype in a search run directory.
GENOTYPE_FILENAME = "atrc_genotype.json"
#: The folder that holds the shipped ``genotypes/``: the installed package (a wheel), or the repository
#: root (checkout / editable install).
REPO_DIR = resource_dir("genotypes").parent
#: Columns of :func:`genotype_table_rows`.
GENOTYPE_TABLE_COLUMNS: tuple[str, ...] = ("target", "source", "context", "code")

Genotype = dict[str, dict[str, int]]


def resolve_genotype_path(path: str | os.PathLike) -> Path:
    """The genotype JSON file of ``path``: a file, or a run directory holding ``atrc_genotype.json``.

    A relative path is tried against the working directory, then against :data:`REPO_DIR` (where
    ``genotypes/`` is shipped: the installed package or the repository root).
    """
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [p, REPO_DIR / p]
    for c in candidates:
        if c.is_dir():
            f = c / GENOTYPE_FILENAME
            if f.is_file():
                return f
            raise ConfigError(
                f"genotype: directory {c} holds no {GENOTYPE_FILENAME} (is it a search run dir?)"
            )
        if c.is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise ConfigError(f"genotype file not found: {path} (tried {tried})")


def validate_genotype(data: object, tasks: Sequence[str], source: str = "<genotype>") -> Genotype:
    """Check that ``data`` ({target: {source: code}}, read from JSON) covers exactly ``tasks`` ×
    ``tasks`` with codes of :data:`~atrc_exp.models.context_blocks.CONTEXTS`; return it as plain
    ints in ``tasks`` order. Errors name ``source`` (the file) and the pair."""
    tasks = list(tasks)
    known = f"(configured tasks: {', '.join(tasks)})"
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: genotype 'data' must map target -> {{source: code}}, got {type(data).__name__}"
        )
    for t, row in data.items():
        if t not in tasks:
            s0 = next(iter(row), "?") if isinstance(row, Mapping) else "?"
            raise ConfigError(f"{source}: pair (target={t!r}, source={s0!r}): unknown task {t!r} {known}")
        if not isinstance(row, Mapping):
            raise ConfigError(
                f"{source}: target {t!r} must map source -> code, got {type(row).__name__} "
                f"(pair (target={t!r}, source=?))"
            )
        for s in row:
            if s not in tasks:
                raise ConfigError(f"{source}: pair (target={t!r}, source={s!r}): unknown task {s!r} {known}")
    out: Genotype = {}
    for t in tasks:
        if t not in data:
            raise ConfigError(
                f"{source}: missing task {t!r} as a target: pair (target={t!r}, source={tasks[0]!r}) "
                f"and the rest of its row are not given {known}"
            )
        out[t] = {}
        for s in tasks:
            if s not in data[t]:
                raise ConfigError(f"{source}: missing pair (target={t!r}, source={s!r})")
            v = data[t][s]
            if type(v) not in (int, float) or int(v) != v or not 0 <= v < len(CONTEXTS):  # bool is no code
                codes = ", ".join(f"{c.code} {c.display}" for c in CONTEXTS)
                raise ConfigError(
                    f"{source}: pair (target={t!r}, source={s!r}) has context {v!r}; it must be an "
                    f"integer 0-{len(CONTEXTS) - 1} ({codes})"
                )
            out[t][s] = int(v)
    return out


def load_genotype(path: str | os.PathLike | None, tasks: Sequence[str]) -> Genotype:
    """Read and validate a genotype (file or search run dir) for ``tasks`` (``context=atrc``'s
    ``context.genotype``)."""
    if path in (None, ""):
        raise ConfigError(
            "context=atrc needs a genotype: pass context.genotype=<genotype.json> or a search "
            "run directory holding atrc_genotype.json (published ones are in genotypes/)"
        )
    f = resolve_genotype_path(path)
    try:
        obj = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: cannot read genotype JSON ({e})") from e
    if not isinstance(obj, Mapping) or "data" not in obj:
        raise ConfigError(
            f'{f}: not a genotype file: expected {{"data": {{target: {{source: code}}}}, "step": N}}'
        )
    return validate_genotype(obj["data"], tasks, source=str(f))


def save_genotype(genotype: Mapping[str, Mapping[str, int]], path: str | os.PathLike, step: int = 0) -> Path:
    """Write ``{"data": genotype, "step": step}`` (the original format) atomically; returns the path."""
    p = Path(path)
    if p.is_dir():
        p = p / GENOTYPE_FILENAME
    data = {str(t): {str(s): int(c) for s, c in row.items()} for t, row in genotype.items()}
    return write_atomic(p, json.dumps({"data": data, "step": int(step)}, indent=2) + "\n")


def genotype_table_rows(
    genotype: Mapping[str, Mapping[str, int]], tasks: Sequence[str] | None = None
) -> list[list]:
    """One row ``[target, source, context name, code]`` per pair (columns :data:`GENOTYPE_TABLE_COLUMNS`),
    e.g. ``wandb.Table(columns=list(GENOTYPE_TABLE_COLUMNS), data=genotype_table_rows(g, tasks))``."""
    tasks = list(tasks) if tasks is not None else list(genotype)
    return [
        [t, s, context_spec(int(genotype[t][s])).display, int(genotype[t][s])] for t in tasks for s in tasks
    ]


def genotype_heatmap(
    genotype: Mapping[str, Mapping[str, int]],
    tasks: Sequence[str] | None = None,
    cell: tuple[int, int] = (56, 96),
) -> np.ndarray:
    """Render the genotype as a T×T heatmap: an RGB uint8 image (H×W×3) with target rows, source
    columns (task names on the left / top), each cell coloured by its context and labelled with the
    context name. ``cell`` is (height, width) of one cell in pixels."""
    import cv2

    tasks = list(tasks) if tasks is not None else list(genotype)
    n = len(tasks)
    ch, cw = cell
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    label_w = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in tasks) + 16 if tasks else 16
    label_w = max(label_w, cv2.getTextSize("target \\ source", font, 0.35, 1)[0][0] + 8)
    label_h = 28
    img = np.full((label_h + n * ch + 1, label_w + n * cw + 1, 3), 255, np.uint8)

    def put_centered(text: str, x0: int, y0: int, w: int, h: int, colour, s: float = scale) -> None:
        (tw, th), _ = cv2.getTextSize(text, font, s, thick)
        while tw > w - 4 and s > 0.25:
            s -= 0.05
            (tw, th), _ = cv2.getTextSize(text, font, s, thick)
        org = (x0 + max((w - tw) // 2, 2), y0 + (h + th) // 2)
        cv2.putText(img, text, org, font, s, colour, thick, cv2.LINE_AA)

    cv2.putText(img, "target \\ source", (4, 18), font, 0.35, (90, 90, 90), 1, cv2.LINE_AA)
    for j, s in enumerate(tasks):
        put_centered(s, label_w + j * cw, 0, cw, label_h, (0, 0, 0))
    for i, t in enumerate(tasks):
        y0 = label_h + i * ch
        put_centered(t, 0, y0, label_w, ch, (0, 0, 0))
        for j, s in enumerate(tasks):
            code = int(genotype[t][s])
            x0 = label_w + j * cw
            known = 0 <= code < len(CONTEXTS)
            colour = CONTEXTS[code].colour if known else (0, 0, 0)
            cv2.rectangle(img, (x0, y0), (x0 + cw, y0 + ch), colour, thickness=-1)
            cv2.rectangle(img, (x0, y0), (x0 + cw, y0 + ch), (255, 255, 255), thickness=1)
            name = CONTEXTS[code].display if known else str(code)
            text_colour = (0, 0, 0) if code == 0 else (255, 255, 255)
            put_centered(name, x0, y0, cw, ch, text_colour)
    return img
