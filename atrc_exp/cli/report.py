"""``atrc-report``: a table over runs and sweeps — mean ± std over seeds, Δm vs single-task runs.

    atrc-report logs/multiruns/2026-11-24_12-00-00 logs/runs/distill_none/...   [--out DIR]
    atrc-report <dirs...> --baselines baselines.yaml      # B_t from a file instead of ST runs
    atrc-report <dirs...> --wandb [--wandb-project P] [--wandb-mode offline]

Prints a markdown table (one row per configuration: dataset, backbone, tasks, context, mode and
any other distinguishing override) with the sign conventions below it; with ``--out`` writes
``report.md``, ``report.csv`` and ``report.json`` there.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..evaluation import report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atrc-report",
        description="Gather metrics.json of runs / multiruns into a table: mean ± std over seeds, Δm.",
    )
    p.add_argument("paths", nargs="+", help="run folders, multirun folders or any folder above them")
    p.add_argument("--out", help="write report.md, report.csv and report.json to this folder")
    p.add_argument(
        "--baselines",
        help="YAML of single-task baseline numbers (flat {metric: value} or {dataset: {backbone: {...}}}); "
        "default: the single-task context=none runs found among the paths",
    )
    p.add_argument("--wandb", action="store_true", help="also log the table as a W&B table")
    p.add_argument("--wandb-project", default="atrc_exp")
    p.add_argument("--wandb-mode", help="online | offline | disabled (default: wandb decides)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        dirs = report.find_runs(args.paths)
        if not dirs:
            where = ", ".join(args.paths)
            raise FileNotFoundError(f"no run folder (metrics.json with .hydra/config.yaml) under {where}")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [report.load_run(d) for d in dirs]
    rows = report.build_rows(runs, report.load_baselines(args.baselines) if args.baselines else None)
    print(f"{report.to_markdown(rows)}\n\n{report.sign_convention_note(rows)}")
    print(f"\n{len(runs)} runs, {len(rows)} configurations")
    if args.out:
        paths = report.write_outputs(rows, args.out)
        print("written: " + ", ".join(str(p) for p in paths.values()))
    if args.wandb:
        where = report.log_wandb_table(rows, project=args.wandb_project, mode=args.wandb_mode)
        print(f"W&B table logged (run files in {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
