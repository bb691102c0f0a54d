"""The method's claims measured over seeds, with the paper's ablations.

    python -m benchmarks.method [--config params.yaml] [--seeds 0,1,2]
                                [--ablations size,diversity,lambda,tune,levers,query,query_member,degraded]
                                [--val-fraction 0.25]
                                [--out runs/bench_method] [--grow-from RUN] [--set KEY=VALUE ...] [--no-write]

For every seed: the whole method (`cmce run`: every configuration sym_query, sym_gallery/*, asym/*,
asym_ensemble/1..N, kd/*, rejection curves) with that seed added to every model and transformation seed.
Reported as mean ± std over seeds; a difference is called real only when it exceeds the two spreads
combined (|Δmean| > std_a + std_b). Rejection of 10 % is also reported at FAR 0.1 to 1e-4 (the target's
1e-3 among them): how much it can lower the verification error depends on how much error is left.
Ablations (seed 0's trained models reused where possible):
  size       accuracy vs ensemble size N (the asym_ensemble/n rows)
  diversity  N transformations of ONE gallery model (different T seeds) vs N gallery models of one
             architecture (different seeds) vs the config's different architectures
  lambda     the transformation loss with λ = 0 (alignment only) vs λ tuned without the test split: seed 0's
             train split carved into a validation dataset (--val-fraction), every model retrained on the
             rest, λ picked from LAMBDA_GRID by validation R@1 + MAP@R of asym_ensemble/N; both measured on test
  tune       as lambda, for every transformation setting of TUNE_GRID (λ, depth, hidden width, epochs), one
             after the other; test measured for the config's settings, the tuned ones and those with λ = 0
  levers     what else was tried to lift the ensemble: λ grid, T epochs/depth/width, CE temperature,
             augmented views for T, query-model width (off by default: about as long as one seed)
  query      the ensemble's lift over the query model alone vs query-model width (¼, ½, 1, 2 × the config's;
             off by default)
  query_member  the config's ensemble with the query model's own embedding of each gallery image added as one
             more member (identity transformation; off by default)
  degraded   rejection where there is something to reject: 10 % of the test images degraded on the gallery
             side only (benchmarks/degraded.py), the gallery rebuilt by seed 0's models; off by default
--grow-from RUN takes the query model and the first gallery members (with their transformations, embeddings
and KD students) from RUN's seed{k} folders, a finished run of the same config with fewer members, and
trains only the members it lacks (benchmarks/grow.py).
Writes its section of BENCHMARKS.md (replacing the previous one of that dataset): command, commit, hardware,
config, wall time, tables, targets.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.ablations import (
    diversity_ablation,
    levers_ablation,
    levers_table,
    query_member_ablation,
    query_member_table,
    query_quality_table,
)
from benchmarks.args import comma_list, config_or_error, fraction, one_of, random_seed
from benchmarks.degraded import DEGRADED, NOISE, SCALE, degraded_table
from benchmarks.diagnostics import compatibility_table, costs_table, residual_table, stored_embeddings
from benchmarks.grow import grow_run, reusable_members
from benchmarks.references import operating_point_rows, operating_points, references_table, served
from benchmarks.report import (
    LOG_FORMAT,
    ROOT,
    add_config_options,
    config_shown,
    fmt,
    mean_std,
    write_section,
)
from benchmarks.tuning import LAMBDA_GRID, TUNE_GRID, Validation, tuning_table
from cmce.config import Config, ModelSpec, to_yaml
from cmce.layout import RunLayout
from cmce.report import configurations
from cmce.stages import run_all

log = logging.getLogger("bench")
ABLATIONS = ("size", "diversity", "lambda", "tune", "levers", "query", "query_member", "degraded")
METRICS = ["R@1", "R@2", "R@4", "R@8", "MAP@R", "TAR@FAR=0.001"]
Runs = list[dict[str, dict[str, float]]]


def seeded(cfg: Config, seed: int, out: Path) -> Config:
    """The config with `seed` added to the global and every model seed, writing under `out`."""
    def shift(m: ModelSpec) -> ModelSpec:
        return replace(m, seed=m.seed + seed)

    return replace(cfg, seed=cfg.seed + seed, output_dir=str(out), query_model=shift(cfg.query_model),
                   gallery_models=[shift(m) for m in cfg.gallery_models])


def results_table(runs: Runs) -> list[str]:
    configs = configurations(runs[0])
    rows = ["| configuration | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for c in configs:
        rows.append(f"| {c} | " + " | ".join(fmt([r[c][m] for r in runs]) for m in METRICS) + " |")
    return rows


def rejection_table(runs: Runs) -> list[str]:
    unc = runs[0]["rejection/uncertainty"]
    rates = [k.split("@", 1)[1] for k in unc if k.startswith("verification_error@")]
    rows = ["| rejected | verification error (uncertainty) | (random) | retrieval error (uncertainty) | (random) |",
            "|---|---|---|---|---|"]
    for r in rates:
        cells = [fmt([run[f"rejection/{how}"][f"{kind}_error@{r}"] for run in runs])
                 for kind in ("verification", "retrieval") for how in ("uncertainty", "random")]
        rows.append(f"| {100 * float(r):g}% | " + " | ".join(cells) + " |")
    return rows


def _diff(runs: Runs, a: str, b: str, metric: str) -> tuple[list[float], bool, bool]:
    """a − b per seed for one metric; whether the mean difference exceeds the two spreads combined (unpaired:
    std_a + std_b); and whether it exceeds the spread of the per-seed differences (paired: each seed's a and b
    share its models and, under class-disjoint protocols, its class split, which moves both sides together)."""
    (_, sa), (_, sb) = mean_std([r[a][metric] for r in runs]), mean_std([r[b][metric] for r in runs])
    per_seed = [r[a][metric] - r[b][metric] for r in runs]
    d, sd = mean_std(per_seed)
    return per_seed, abs(d) > sa + sb, abs(d) > sd


def targets(runs: Runs, n: int) -> list[str]:
    ens = f"asym_ensemble/{n}"
    best = lambda prefix, metric: max((k for k in runs[0] if k.startswith(prefix)),  # noqa: E731
                                      key=lambda k: statistics.fmean(r[k][metric] for r in runs))
    rows = ["| target | measured Δ (points) | per seed | needed | met | beyond the spread (unpaired / paired) |",
            "|---|---|---|---|---|---|"]

    def row(text: str, a: str, b: str, metric: str, needed: float) -> None:
        per_seed, unpaired, paired = _diff(runs, a, b, metric)
        d = statistics.fmean(per_seed)
        spread = " / ".join("yes" if x else "no" for x in (unpaired, paired)) if len(runs) > 1 else "n/a (one seed)"
        seeds = ", ".join(f"{100 * x:+.2f}" for x in per_seed)
        rows.append(f"| {text} ({a} − {b}, {metric}) | {100 * d:+.2f} | {seeds} | ≥ {needed:+.0f} | "
                    f"{'yes' if 100 * d >= needed else 'no'} | {spread} |")

    row("ensemble vs best single transformation", ens, best("asym/", "R@1"), "R@1", 1)
    row("ensemble vs best single transformation", ens, best("asym/", "MAP@R"), "MAP@R", 4)
    row("ensemble vs the query model alone", ens, "sym_query", "TAR@FAR=0.001", 5)
    row("ensemble vs the query model alone", ens, "sym_query", "MAP@R", 5)
    row("ensemble vs the query model alone", ens, "sym_query", "R@1", 0)
    row("ensemble vs best KD student", ens, best("kd/", "R@1"), "R@1", 5)
    unc, rnd = "rejection/uncertainty", "rejection/random"
    base = [r[unc]["verification_error@0"] for r in runs]
    at10 = [r[unc].get("verification_error@0.1", float("nan")) for r in runs]
    rand10 = [r[rnd].get("verification_error@0.1", float("nan")) for r in runs]
    rel = [(b - a) / b for a, b in zip(at10, base, strict=True)]
    rel_rand = [(b - a) / b for a, b in zip(rand10, base, strict=True)]
    per_seed = ", ".join(f"{100 * x:.2f} %" for x in rel)
    rows.append(f"| rejecting 10% most uncertain lowers verification error (relative) | {fmt(rel)} % | {per_seed} | "
                f"≥ 15 % | {'yes' if statistics.fmean(rel) >= 0.15 else 'no'} | random rejection: {fmt(rel_rand)} % |")
    return rows


def recorded_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command line as run, without options left at their defaults, quoted as a shell needs it (so it
    runs as written, e.g. an empty --ablations '')."""
    given = {"config": config_shown(args.config), "seeds": ",".join(map(str, args.seeds)),
             "ablations": ",".join(args.ablations), "val-fraction": f"{args.val_fraction:g}"}
    defaults = {"config": "params.yaml", "seeds": ",".join(map(str, seed_list(parser.get_default("seeds")))),
                "ablations": ",".join(ablation_list(parser.get_default("ablations"))),
                "val-fraction": f"{parser.get_default('val_fraction'):g}"}
    command = "python -m benchmarks.method" + "".join(f" --{k} {shlex.quote(v)}" for k, v in given.items()
                                                      if v != defaults[k])
    if args.grow_from:
        command += f" --grow-from {shlex.quote(args.grow_from)}"
    return command + "".join(f" --set {shlex.quote(s)}" for s in args.set)


seed_list = comma_list(random_seed)  # each seed its own run folder: none twice
ablation_list = comma_list(one_of(ABLATIONS), allow_empty=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p)
    p.add_argument("--seeds", type=seed_list, default="0,1,2")
    p.add_argument("--ablations", type=ablation_list, default="size,diversity,lambda",
                   help="comma-separated; empty for none")
    p.add_argument("--val-fraction", type=fraction, default=0.25,
                   help="share of the train split (heldout: of each class; else: of the classes) T is tuned on")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_method"))
    p.add_argument("--grow-from", metavar="RUN",
                   help="a finished run of this benchmark (its seed{k} folders) whose gallery members are the first "
                        "of the config's: they and the query model are copied, not retrained (benchmarks/grow.py)")
    p.add_argument("--no-write", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cfg = config_or_error(p, args.config, {"kd.enabled": True}, args.set)
    seeds, ablations = args.seeds, args.ablations
    kept: dict[int, list[str]] = {}
    if args.grow_from:  # every seed's run checked before any training starts
        try:
            for seed in seeds:
                src = Path(args.grow_from) / f"seed{seed}"
                kept[seed] = reusable_members(seeded(cfg, seed, Path(args.out) / f"seed{seed}"), src)
        except ValueError as e:
            p.error(str(e))
    started = time.time()
    runs, layouts = [], []
    for seed in seeds:
        run_cfg = seeded(cfg, seed, Path(args.out) / f"seed{seed}")
        t0 = time.time()
        runs.append(grow_run(run_cfg, Path(args.grow_from) / f"seed{seed}", kept[seed]) if args.grow_from
                    else run_all(run_cfg))
        layouts.append(RunLayout(Path(run_cfg.output_dir), [m.name for m in run_cfg.gallery_models]))
        log.info("seed %d: %.0f s", seed, time.time() - t0)
    n = len(cfg.gallery_models)
    body = [f"Config `{Path(args.config).name}`{' with ' + ', '.join(args.set) if args.set else ''}: "
            f"{cfg.data.source}, {cfg.data.protocol} protocol; {len(seeds)} seeds ({','.join(map(str, seeds))}); "
            "values in %, mean ± std over seeds; leave-one-out on the test split."
            + (f" The query model and the first gallery members were copied from `{args.grow_from}` (the same "
               "config and seeds make them again bit for bit; checked against the config, `benchmarks/grow.py`)."
               if args.grow_from else ""), "",
            "<details><summary>resolved config (seed 0)</summary>", "", "```yaml", to_yaml(cfg).strip(), "```", "",
            "</details>", "", "### Every configuration", ""]
    body += results_table(runs)
    body += ["", "### Rejection by uncertainty vs at random (error in %)", ""]
    body += rejection_table(runs)
    seed0 = seeded(cfg, seeds[0], layouts[0].root)
    first = served(layouts[0])  # read once: the references table below reuses it
    points = [operating_points(seeded(cfg, seed, lay.root), first if lay is layouts[0] else served(lay))
              for seed, lay in zip(seeds, layouts, strict=True)]
    body += ["", "### Rejecting 10 % by uncertainty at other operating points", "",
             f"The rejection target is stated at FAR={cfg.evaluate.rejection_far:g}. Rejecting 10 % of the gallery "
             "removes about 10 % of the genuine pairs, so the relative drop it can give shrinks as the error left "
             "grows; here the same rejection (each seed's models and gallery, as evaluated) at FAR "
             f"{', '.join(f'{f:g}' for f in points[0])}. Errors and relative drops in %, mean ± std over "
             "seeds; the last drop column takes, per seed, the better of the two orderings that know the test "
             "labels (see below).", ""]
    body += operating_point_rows(points)
    body += ["", "### Targets", ""]
    body += targets(runs, n)
    body += ["", f"### Compatibility of each gallery model with the query model (seed {seeds[0]})", "",
             "Linear CKA near 1: the gallery space is close to a rotation of the query space; low: a map onto it "
             "must be non-linear and, fitted on the train split, may not carry over to the test images "
             "(classes, under disjoint protocols).", ""]
    stored = {spec.name: stored_embeddings(layouts[0], spec.name) for spec in cfg.gallery_models}
    body += compatibility_table(seed0, layouts[0], runs[0], stored)
    body += ["", f"### What averaging the members can remove (seed {seeds[0]})", "",
             "Each member's transformed embedding misses the query model's by a residual; the ensemble's mean "
             "cancels the parts of these residuals the members do not share, and keeps the part they do.", ""]
    body += residual_table(seed0, layouts[0], stored)
    body += ["", f"### What the query model permits (seed {seeds[0]}; references that use the test labels)", "",
             "The loss pulls T(φ_g(x)) towards two galleries: the query model's own embedding of the image (the "
             "alignment term) and its class's query-classifier weight (the CE term); both are searched here with "
             "the same query embeddings. Then the rejection target's 10 % rejected by uncertainty, at random and "
             "by two orderings that know the labels (not proven optimal: they show roughly how far any "
             "gallery-side rejection could lower the verification error here).", ""]
    body += references_table(seed0, layouts[0], runs[0], first, points[0][cfg.evaluate.rejection_far])
    body += ["", f"### Model costs (seed {seeds[0]}'s models, {cfg.data.image_size} px input)", ""]
    body += costs_table(seed0, layouts[0])
    if "size" in ablations:
        body += ["", "### Ablation: ensemble size N", "", "| N | R@1 | MAP@R | TAR@FAR=0.001 |", "|---|---|---|---|"]
        for k in range(1, n + 1):
            c = f"asym_ensemble/{k}"
            body.append(f"| {k} | " + " | ".join(fmt([r[c][m] for r in runs]) for m in ("R@1", "MAP@R",
                                                                                        "TAR@FAR=0.001")) + " |")
    if "diversity" in ablations:
        body += ["", f"### Ablation: diversity (seed {seeds[0]}, ensemble of {n})", "",
                 "| ensemble members | R@1 | MAP@R | TAR@FAR=0.001 |", "|---|---|---|---|"]
        variants = diversity_ablation(seed0, layouts[0])
        variants[f"the config's {n} models ({', '.join(m.arch for m in cfg.gallery_models)})"] = runs[0]
        for name, m in variants.items():
            e = m[f"asym_ensemble/{n}"]
            body.append(f"| {name} | {100 * e['R@1']:.2f} | {100 * e['MAP@R']:.2f} | {100 * e['TAR@FAR=0.001']:.2f} |")
    validation = Validation(seed0, layouts[0], runs[0], args.val_fraction)
    if "lambda" in ablations:
        body += ["", f"### Ablation: λ = 0 vs tuned on a validation split (seed {seeds[0]}, asym_ensemble/{n})", ""]
        body += tuning_table(validation, {"lam": LAMBDA_GRID})
    if "tune" in ablations:
        body += ["", f"### Transformation settings tuned on a validation split (seed {seeds[0]}, "
                 f"asym_ensemble/{n})", ""]
        body += tuning_table(validation, TUNE_GRID)
    if "levers" in ablations:
        body += ["", f"### Levers tried (seed {seeds[0]}): each refits every transformation on the same frozen "
                 "gallery models", "",
                 "Columns: the ensemble, the best single transformation (by R@1) and the query model alone "
                 "(which changes only in the query-width rows); R@1 / MAP@R / TAR@FAR=0.001 in %.", ""]
        body += levers_table({"(the config)": runs[0], **levers_ablation(seed0, layouts[0])}, n)
    if "query_member" in ablations:
        body += ["", f"### Ablation: the query model as one more gallery member (seed {seeds[0]})", "",
                 "The gallery side also embeds each gallery image with the query model (identity transformation) "
                 "and averages it with the transformed members; measured as served (query model vs the stored "
                 "ensemble embedding). R@1 / MAP@R / TAR@FAR=0.001 in %.", ""]
        body += query_member_table(runs[0], query_member_ablation(seed0, layouts[0]), n)
    if "degraded" in ablations:
        body += ["", f"### Rejection with {100 * DEGRADED:g} % of the gallery images degraded (seed {seeds[0]}; "
                 "a reference beside the rejection target)", "",
                 f"On the gallery side only, {100 * DEGRADED:g} % of the test images are downscaled {SCALE}× and "
                 f"back and given Gaussian noise (σ = {NOISE:g}); the queries stay clean. Seed {seeds[0]}'s models "
                 "and transformations embed them unchanged.", ""]
        body += degraded_table(seed0, layouts[0], runs[0], layouts[0].root / "degraded")
    if "query" in ablations:
        body += ["", f"### Ablation: query-model quality (seed {seeds[0]}): the query model retrained at other widths, "
                 "every transformation refitted on the same frozen gallery models", "",
                 "R@1 / MAP@R / TAR@FAR=0.001 in %.", ""]
        body += query_quality_table(seed0, layouts[0], runs[0], n)
    command = recorded_command(args, p)
    if args.no_write:
        sys.stdout.write("\n".join(body) + "\n")
    else:
        write_section(f"Method over seeds: {cfg.data.source} ({cfg.data.protocol})", command, body,
                       time.time() - started)


if __name__ == "__main__":
    main()
