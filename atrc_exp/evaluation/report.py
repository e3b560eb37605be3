"""Tables over many runs: one row per configuration, mean ± std over seeds, and Δm.

A run is a folder with ``metrics.json`` (``{"step": N, "metrics": {...}}``) and its config in
``.hydra/config.yaml`` (Hydra's run-dir layout; ``config_resolved.yaml`` is the fallback). Folders
are searched recursively, so a multirun folder (``<sweep>/0``, ``<sweep>/1``, …) or a folder of
many runs can be given as well.

Δm (the multi-task performance of Maninis et al. / Vandenhende et al., as the ATRC paper uses it)::

    Δm = (1/T) · Σ_t (−1)^{l_t} · (M_t − B_t) / B_t · 100

over the T tasks of the row, with M_t the row's main metric of task t (mean over seeds), B_t the
single-task baseline's (the mean over seeds of the single-task ``context=none`` runs of the same
dataset and backbone, or a number from ``--baselines``), and l_t = 1 where lower is better
(``depth/rmse``, ``normals/mean_angle``), else 0. Positive Δm = better than the single-task
baselines on average. A row with a task that has no baseline gets no Δm.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..task_kinds import PAPER_TASK_SPECS, TaskSpecError, make_task

log = logging.getLogger(__name__)

#: Task specs of the tasks met so far (each run's config says its tasks' kinds, :func:`load_run`
#: adds them); the paper's named tasks to begin with.
TASK_SPECS: dict[str, dict] = {k: dict(v) for k, v in PAPER_TASK_SPECS.items()}


def task_of(name: str):
    """The :class:`~atrc_exp.task_kinds.Task` named ``name`` (from :data:`TASK_SPECS`)."""
    if name not in TASK_SPECS:
        raise KeyError(f"task {name!r}: no run config seen names its kind")
    return make_task(name, TASK_SPECS[name])


def main_metric(task: str) -> str:
    """The key of the metric ``task`` is judged by in tables and Δm (its kind's main metric), e.g.
    ``semseg/mIoU``."""
    return task_of(task).main_metric


#: Prefixes of the overrides that do not make a different configuration.
_IGNORED_OVERRIDES = tuple(
    "seed paths. hydra. hydra/ trainer.resume trainer.num_workers trainer.progress trainer.log_interval "
    "trainer.edge_eval_workers logger dataset= backbone= backbone._target_= tasks= tasks.names= context= "
    "mode= experiment= run_name".split()
)


def lower_is_better(task: str) -> bool:
    """Whether a lower main metric is better for ``task`` (its kind says: rmse, angles)."""
    return not task_of(task).kind.metrics[0][1]


def delta_m(metrics: Mapping[str, float], baselines: Mapping[str, float], tasks: Sequence[str]) -> float:
    """Δm in percent of ``metrics`` (main metric per task, or keyed by metric name) vs ``baselines``."""
    terms = []
    for t in tasks:
        key = main_metric(t)
        m = metrics[key] if key in metrics else metrics[t]
        b = baselines[key] if key in baselines else baselines[t]
        if b == 0:
            raise ValueError(f"baseline of {t} is 0: Δm is undefined")
        sign = -1.0 if lower_is_better(t) else 1.0
        terms.append(sign * (m - b) / b * 100.0)
    if not terms:
        raise ValueError("Δm needs at least one task")
    return sum(terms) / len(terms)


@dataclass
class Run:
    path: Path
    dataset: str
    backbone: str
    tasks: tuple[str, ...]
    context: str
    mode: str
    seed: int
    step: int
    metrics: dict[str, float]
    overrides: tuple[str, ...] = ()


@dataclass
class Row:
    dataset: str
    backbone: str
    tasks: tuple[str, ...]
    context: str
    mode: str
    extra: str
    runs: list[Run] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    delta_m: float | None = None
    delta_m_std: float | None = None
    baseline_source: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    def key(self) -> tuple:
        return (self.dataset, self.backbone, self.tasks, self.context, self.mode, self.extra)


def _config_path(run_dir: Path) -> Path | None:
    for rel in (".hydra/config.yaml", "config_resolved.yaml"):
        if (run_dir / rel).is_file():
            return run_dir / rel
    return None


def _is_pipeline_job(config: Path) -> bool:
    """A ``mode=pipeline`` job's folder: its ``metrics.json`` repeats its distillation stage's, and
    its stages (sub-folders) are the runs."""
    try:
        return OmegaConf.select(OmegaConf.load(config), "mode.name") == "pipeline"
    except Exception:  # noqa: BLE001 - unreadable: load_run reports it
        return False


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders under ``paths``: a ``metrics.json`` next to a config (recursively); a pipeline
    job counts once, by its stages."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such run or multirun folder")
        cands = [p / "metrics.json"] if (p / "metrics.json").is_file() else []
        cands += sorted(q for q in p.rglob("metrics.json") if q.parent != p)
        for m in cands:
            config = _config_path(m.parent)
            if config is None:
                log.debug("skipping %s: no .hydra/config.yaml or config_resolved.yaml", m.parent)
                continue
            if _is_pipeline_job(config):
                continue
            if m.parent not in found:
                found.append(m.parent)
    return found


def _select(cfg, key: str, default=None):
    try:
        v = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation elsewhere in the file
        v = default
    return default if v is None else v


def _register_specs(cfg, run_dir: Path) -> None:
    """Add the run's task specs to :data:`TASK_SPECS` (``config_resolved.yaml`` holds them
    resolved; a folder dataset's ``.hydra/config.yaml`` only names its folder)."""
    specs = None
    resolved = run_dir / "config_resolved.yaml"
    if resolved.is_file():
        specs = _select(OmegaConf.load(resolved), "dataset.task_specs")
    if specs is None:
        specs = _select(cfg, "dataset.task_specs")
    if specs is None:
        return
    if not isinstance(specs, dict):
        specs = OmegaConf.to_container(specs, resolve=True)
    for name, spec in specs.items():
        try:
            make_task(name, spec)
        except (TaskSpecError, TypeError):
            continue
        TASK_SPECS[str(name)] = dict(spec)


def load_run(run_dir: str | Path) -> Run:
    """Read one run's ``metrics.json``, config (dataset, backbone, tasks, context, mode, seed) and
    Hydra overrides (``.hydra/overrides.yaml`` when present)."""
    run_dir = Path(run_dir)
    data = json.loads((run_dir / "metrics.json").read_text())
    cfg_path = _config_path(run_dir)
    if cfg_path is None:
        raise FileNotFoundError(f"{run_dir}: no .hydra/config.yaml or config_resolved.yaml")
    cfg = OmegaConf.load(cfg_path)
    _register_specs(cfg, run_dir)
    tasks = _select(cfg, "tasks.names") or _select(cfg, "dataset.tasks") or []
    tasks = tuple(str(t) for t in tasks)
    if not tasks:  # fall back on the metric names
        tasks = tuple(
            dict.fromkeys(k.split("/", 1)[0] for k in data["metrics"] if k.split("/", 1)[0] in TASK_SPECS)
        )
    overrides: tuple[str, ...] = ()
    ov = run_dir / ".hydra" / "overrides.yaml"
    if ov.is_file():
        overrides = tuple(str(o) for o in (OmegaConf.load(ov) or []))
    return Run(
        path=run_dir,
        dataset=str(_select(cfg, "dataset.name", "?")),
        backbone=str(_select(cfg, "backbone._target_", "?")).rsplit(".", 1)[-1],  # e.g. hrnet18
        tasks=tasks,
        context=str(_select(cfg, "context.name", "?")),
        mode=str(_select(cfg, "mode.name", "?")),
        seed=int(cfg.seed),
        step=int(data.get("step", -1)),
        metrics={k: float(v) for k, v in data["metrics"].items()},
        overrides=overrides,
    )


def _relevant_overrides(runs: Sequence[Run]) -> dict[Path, str]:
    """Per run, the overrides that distinguish configurations (not seed/paths/…, not shared by all)."""
    keep = {
        r.path: [o.lstrip("+~") for o in r.overrides if not o.lstrip("+~").startswith(_IGNORED_OVERRIDES)]
        for r in runs
    }
    common = set.intersection(*(set(v) for v in keep.values())) if keep else set()
    return {p: " ".join(sorted(o for o in v if o not in common)) for p, v in keep.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def load_baselines(path: str | Path) -> dict:
    """A YAML of baseline numbers: either flat (``semseg/mIoU: 36.4`` or ``semseg: 36.4``, used for
    every row) or nested by dataset and backbone (``nyud: {hrnet18: {semseg/mIoU: 36.4, ...}}``)."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of baseline metrics")
    return data


def _baseline_for(baselines: dict, dataset: str, backbone: str) -> dict[str, float]:
    sub = baselines.get(dataset)
    if isinstance(sub, dict):
        baselines = sub[backbone] if isinstance(sub.get(backbone), dict) else sub
    return {k: float(v) for k, v in baselines.items() if not isinstance(v, dict)}


def build_rows(runs: Sequence[Run], baselines: dict | None = None) -> list[Row]:
    """Group runs into configurations, average over seeds and compute Δm for every row."""
    extra = _relevant_overrides(runs)
    rows: dict[tuple, Row] = {}
    for r in runs:
        row = Row(r.dataset, r.backbone, r.tasks, r.context, r.mode, extra[r.path])
        rows.setdefault(row.key(), row).runs.append(r)
    out = sorted(
        rows.values(), key=lambda w: (w.dataset, w.backbone, -len(w.tasks), w.tasks, w.context, w.extra)
    )
    for row in out:
        for k in sorted({k for r in row.runs for k in r.metrics}):
            row.mean[k], row.std[k] = _mean_std([r.metrics.get(k, math.nan) for r in row.runs])
    for row in out:
        if baselines is not None:
            base = _baseline_for(baselines, row.dataset, row.backbone)
            source = "baselines file"
        else:
            base, source = single_task_baselines(out, row)
        missing = [t for t in row.tasks if main_metric(t) not in base and t not in base]
        row.baseline_source = source
        if missing or any(not math.isfinite(row.mean.get(main_metric(t), math.nan)) for t in row.tasks):
            continue
        row.delta_m = delta_m(row.mean, base, row.tasks)
        per_seed = []
        for r in row.runs:
            try:
                per_seed.append(delta_m(r.metrics, base, row.tasks))
            except KeyError:
                pass
        row.delta_m_std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return out


def single_task_baselines(rows: Sequence[Row], row: Row) -> tuple[dict[str, float], str]:
    """B_t from the single-task ``context=none`` rows of the same dataset and backbone (same extra
    overrides preferred)."""
    base: dict[str, float] = {}
    for t in row.tasks:
        cands = [
            w
            for w in rows
            if w.dataset == row.dataset
            and w.backbone == row.backbone
            and w.tasks == (t,)
            and w.context == "none"
            and math.isfinite(w.mean.get(main_metric(t), math.nan))
        ]
        same = [w for w in cands if w.extra == row.extra]
        pick = (same or cands or [None])[0]
        if pick is not None:
            base[main_metric(t)] = pick.mean[main_metric(t)]
    return base, "single-task runs"


def _fmt(mean: float, std: float, n: int) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _columns(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(t for r in rows for t in r.tasks))


def sign_convention_note(rows: Sequence[Row]) -> str:
    tasks = _columns(rows)
    up = [main_metric(t) for t in tasks if not lower_is_better(t)]
    down = [main_metric(t) for t in tasks if lower_is_better(t)]
    src = sorted({r.baseline_source for r in rows if r.baseline_source})
    lines = [
        "Values: mean ± std (sample std) over seeds; n = number of seeds.",
        "Δm = (1/T)·Σ_t (−1)^l_t·(M_t − B_t)/B_t·100 over the row's T tasks, B_t = single-task baseline "
        f"({', '.join(src) or 'none found'}); l_t = 1 for lower-is-better metrics.",
    ]
    if up:
        lines.append(f"Higher is better (↑, l_t = 0): {', '.join(up)}.")
    if down:
        lines.append(f"Lower is better (↓, l_t = 1, sign flipped in Δm): {', '.join(down)}.")
    lines.append("Δm > 0: better than the single-task baselines on average; – : no baseline for some task.")
    return "\n".join(lines)


def table_records(rows: Sequence[Row]) -> list[dict]:
    """Flat records (one per row) for CSV / JSON / W&B."""
    recs = []
    for r in rows:
        rec = {
            "dataset": r.dataset,
            "backbone": r.backbone,
            "tasks": "+".join(r.tasks),
            "context": r.context,
            "mode": r.mode,
            "overrides": r.extra,
            "n_seeds": len(r.runs),
            "seeds": " ".join(str(s) for s in r.seeds),
        }
        for t in _columns(rows):
            k = main_metric(t)
            rec[f"{k} mean"] = r.mean.get(k) if t in r.tasks else None
            rec[f"{k} std"] = r.std.get(k) if t in r.tasks else None
        rec["delta_m"] = r.delta_m
        rec["delta_m std"] = r.delta_m_std
        recs.append(rec)
    return recs


def to_markdown(rows: Sequence[Row]) -> str:
    cols = _columns(rows)
    show_extra = any(r.extra for r in rows)
    head = ["dataset", "backbone", "tasks", "context", "mode"] + (["overrides"] if show_extra else []) + ["n"]
    arrows = {t: "↓" if lower_is_better(t) else "↑" for t in cols}
    head += [f"{main_metric(t)} {arrows[t]}" for t in cols] + ["Δm % ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        n = len(r.runs)
        cells = [r.dataset, r.backbone, "+".join(r.tasks), r.context, r.mode] + (
            [r.extra] if show_extra else []
        )
        cells.append(str(n))
        for t in cols:
            k = main_metric(t)
            cells.append(_fmt(r.mean.get(k), r.std.get(k, 0.0), n) if t in r.tasks else "")
        cells.append(
            "–"
            if r.delta_m is None
            else (f"{r.delta_m:+.2f} ± {r.delta_m_std:.2f}" if n > 1 else f"{r.delta_m:+.2f}")
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: Sequence[Row], out_dir: str | Path) -> dict[str, Path]:
    """``report.md``, ``report.csv`` and ``report.json`` (the JSON also lists every run and all its
    metrics) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = table_records(rows)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
    paths["md"].write_text(to_markdown(rows) + "\n\n" + sign_convention_note(rows) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]) if recs else ["dataset"])
        w.writeheader()
        w.writerows(recs)
    full = [
        {
            **rec,
            "mean": r.mean,
            "std": r.std,
            "baseline_source": r.baseline_source,
            "runs": [
                {"path": str(x.path), "seed": x.seed, "step": x.step, "metrics": x.metrics} for x in r.runs
            ],
        }
        for r, rec in zip(rows, recs)
    ]

    def _clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: _clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [_clean(v) for v in o]
        return o

    paths["json"].write_text(
        json.dumps(_clean({"rows": full, "note": sign_convention_note(rows)}), indent=2) + "\n"
    )
    return paths


def log_wandb_table(
    rows: Sequence[Row], project: str = "atrc_exp", mode: str | None = None, name: str | None = None
):
    """Log the table as a W&B table (``report`` key) in a run of its own (``job_type=report``)."""
    import wandb

    recs = table_records(rows)
    cols = list(recs[0]) if recs else []
    run = wandb.init(project=project, mode=mode, job_type="report", name=name, reinit=True)
    try:
        table = wandb.Table(columns=cols, data=[[rec[c] for c in cols] for rec in recs])
        run.log({"report": table})
        run.summary["report_note"] = sign_convention_note(rows)
        return run.dir
    finally:
        run.finish()
