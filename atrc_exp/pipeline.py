"""``atrc-pipeline``: the ATRC pipeline in one command (what ``make train`` runs).

1. search   (``mode=search context=search``) → ``atrc_genotype.json``
2. distill  (``context=atrc context.genotype=<search run dir>``)
3. baseline (``context=none``, the multi-task FCN baseline) for comparison

Prints the found genotype as a T×T table and the final metrics of ATRC next to the baseline's.
Runs go to ``<paths.log_dir>/pipeline/<stamp>/{search,distill,baseline}``.

    atrc-pipeline                                 # synthetic defaults, ~9 minutes on 2 CPU cores
    atrc-pipeline --search-steps 2000 --distill-steps 4000 dataset=nyud paths.data_dir=/data
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import CONF_DIR, ConfigError, register_resolvers, run_stamp
from .train import format_metrics_table

log = logging.getLogger("atrc_exp")


def compose(overrides: list[str]):
    """Compose ``conf/train.yaml`` with ``overrides`` outside a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def genotype_table(genotype: dict, tasks: list[str]) -> str:
    """The genotype as text: target rows, source columns, context names in the cells."""
    from .models.genotype import CONTEXT_DISPLAY_NAMES

    w = max(len(t) for t in tasks + ["target \\ source"]) + 2
    lines = ["target \\ source".ljust(w) + "".join(s.ljust(w) for s in tasks)]
    for t in tasks:
        lines.append(t.ljust(w) + "".join(CONTEXT_DISPLAY_NAMES[genotype[t][s]].ljust(w) for s in tasks))
    return "\n".join(lines)


def comparison_table(atrc: dict[str, float], baseline: dict[str, float]) -> str:
    """Metrics of ATRC and the baseline side by side."""
    keys = [k for k in atrc if k in baseline]
    w = max(len(k) for k in keys) + 2
    lines = [f"{'metric'.ljust(w)}{'ATRC':>12}{'MT baseline':>14}", "-" * (w + 26)]
    lines += [f"{k.ljust(w)}{atrc[k]:>12.4f}{baseline[k]:>14.4f}" for k in keys]
    return "\n".join(lines)


def _run(stage: str, overrides: list[str], run_dir: Path) -> dict[str, float]:
    from .engine import fit

    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        print(f"\n=== {stage}: {run_dir}", flush=True)
        return fit(compose(overrides), run_dir)
    finally:
        logging.getLogger().removeHandler(handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="atrc-pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--search-steps", type=int, default=80)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--no-baseline", action="store_true", help="skip the multi-task baseline run")
    p.add_argument("--out", type=Path, default=None, help="folder of the three runs")
    p.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage (key=value)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    register_resolvers()
    try:
        base_cfg = compose(a.overrides)
        out = a.out or Path(str(base_cfg.paths.log_dir)) / "pipeline" / run_stamp()
        tasks = list(base_cfg.tasks.names)

        def steps(n: int) -> list[str]:
            return [f"trainer.max_steps={n}", f"trainer.val_interval={n}"]

        _run(
            "search", [*a.overrides, "mode=search", "context=search", *steps(a.search_steps)], out / "search"
        )
        from .models.genotype import load_genotype

        genotype = load_genotype(out / "search", tasks)
        atrc = _run(
            "distill",
            [*a.overrides, "mode=distill", "context=atrc", f"context.genotype={out / 'search'}",
             *steps(a.distill_steps)],
            out / "distill",
        )  # fmt: skip
        baseline = None
        if not a.no_baseline:
            baseline = _run(
                "baseline",
                [*a.overrides, "mode=distill", "context=none", *steps(a.distill_steps)],
                out / "baseline",
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\ngenotype found by the search (target rows, source columns):")
    print(genotype_table(genotype, tasks))
    print()
    print(comparison_table(atrc, baseline) if baseline else format_metrics_table(atrc, "ATRC final metrics"))
    print(f"\nruns: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
