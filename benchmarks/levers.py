"""Transformation settings tried on a finished run, without retraining any backbone.

    python -m benchmarks.levers --run runs/bench_method/seed0 [--config params.yaml] [--seed 0]
                                [--set KEY=VALUE ...] --try KEY=VALUE[,KEY=VALUE] [--try ...] [--no-write]

The backbones are most of a run's cost; the transformations are cheap to refit. For each --try (transform
keys, e.g. `weight_decay=0.1` or `lam=0.1,epochs=60`) every transformation is refitted on the run's frozen
models, the gallery rebuilt and every configuration evaluated, under `<run>/levers_tried/`. --config, --set
and --seed must describe the run (as `benchmarks.method` made it: seed k is its `seed{k}` folder); the run's
recorded members are checked against them. One levers table, beside the run's own row, is written to
BENCHMARKS.md (in place of the previous one of that dataset).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import yaml

from benchmarks.ablations import levers_table
from benchmarks.args import one_line, random_seed
from benchmarks.finished_run import check_run
from benchmarks.method import seeded
from benchmarks.refit import refit
from benchmarks.report import LOG_FORMAT, add_config_options, config_shown, write_section
from cmce.config import Config, load_config
from cmce.layout import RunLayout
from cmce.overrides import parse_overrides

log = logging.getLogger("bench")


def parse_try(text: str) -> dict[str, object]:
    """`lam=0.1,epochs=60` → {"lam": 0.1, "epochs": 60} (values read as YAML scalars)."""
    change = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--try {text!r}: expected KEY=VALUE[,KEY=VALUE] of transform settings, "
                             "e.g. weight_decay=0.1")
        try:
            change[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:  # `lam=[1`: a 52-line parser traceback
            raise ValueError(f"--try {text!r}: {key.strip()}: {value!r} is not valid YAML: {err}") from None
    return change


def run_config(config: Path, overrides: dict, seed: int, run: Path, change: dict | None = None) -> Config:
    """The config the run was made with (seed `seed` of `benchmarks.method`), with transform keys changed;
    the typed loader rejects an unknown key, naming the valid ones."""
    transform = {f"transform.{k}": v for k, v in (change or {}).items()}
    return seeded(load_config(config, {**overrides, **transform}), seed, run)


def try_levers(config: Path, overrides: dict, seed: int, run: Path, tries: list[str]) -> dict[str, dict]:
    """The run's own metrics, then one refit per --try: label → every configuration's metrics."""
    changes = {text: parse_try(text) for text in tries}  # all parsed before any refit starts
    cfg = run_config(config, overrides, seed, run)
    lay = RunLayout(run, [m.name for m in cfg.gallery_models])
    check_run(cfg, lay)
    variants = {text: run_config(config, overrides, seed, run, change) for text, change in changes.items()}
    rows = {"(the run)": json.loads((lay.eval_dir / "metrics.json").read_text())}
    for i, (text, alt) in enumerate(variants.items()):
        log.info("refitting every transformation with %s", text)
        rows[text] = refit(alt, lay, run / "levers_tried" / f"t{i}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a seed folder of a finished benchmarks.method run")
    add_config_options(p, "config override of the run")
    p.add_argument("--seed", type=random_seed, default=0, help="the seed the run was made with")
    p.add_argument("--try", dest="tries", action="append", required=True, metavar="KEY=VALUE[,KEY=VALUE]",
                   help="transform settings to refit with (repeatable)")
    p.add_argument("--no-write", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    started = time.time()
    try:
        overrides = parse_overrides(args.set)  # a key given twice
        rows = try_levers(Path(args.config), overrides, args.seed, Path(args.run), args.tries)
    except ValueError as e:  # the config's own errors (ConfigError) are ValueErrors too
        p.error(one_line(e))
    cfg = load_config(args.config, overrides)
    command = (f"python -m benchmarks.levers --run {shlex.quote(args.run)}"
               f" --config {shlex.quote(config_shown(args.config))}"
               + (f" --seed {args.seed}" if args.seed else "")
               + "".join(f" --set {shlex.quote(s)}" for s in args.set)
               + "".join(f" --try {shlex.quote(t)}" for t in args.tries))
    body = [f"Run `{args.run}` (config `{Path(args.config).name}`{' with ' + ', '.join(args.set) if args.set else ''}, "
            f"seed {args.seed}): every transformation refitted on its frozen models for each setting. Columns: "
            "the ensemble, the best single transformation (by R@1) and the query model alone; "
            "R@1 / MAP@R / TAR@FAR=0.001 in %.", ""]
    body += levers_table(rows, len(cfg.gallery_models))
    write_section(f"Transformation levers on a finished run: {cfg.data.source} ({cfg.data.protocol})", command,
                   body, time.time() - started, write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
