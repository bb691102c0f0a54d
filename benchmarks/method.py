"""The method's claims measured over seeds, with the paper's ablations.

    python -m benchmarks.method [--config params.yaml] [--seeds 0,1,2]
                                [--ablations size,diversity,lambda,tune,levers,query,query_member,degraded]
                                [--val-fraction 0.25]
                                [--out runs/bench_method] [--set KEY=VALUE ...] [--no-write]

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
Appends a dated section to BENCHMARKS.md: command, commit, hardware, config, wall time, tables, targets.
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

import numpy as np

from benchmarks.degraded import DEGRADED, NOISE, SCALE, degraded_table
from benchmarks.references import operating_point_rows, operating_points, references_table, served
from benchmarks.report import ROOT, SHOWN, append_section, fmt, mean_std, shown
from cmce.checkpoint import load_embedding_model
from cmce.config import Config, ModelSpec, load_config, to_yaml
from cmce.data import carve_validation, dataset_info
from cmce.ensemble import normalize
from cmce.evaluate import EvalInputs
from cmce.metrics import linear_cka
from cmce.models import count_flops, count_parameters
from cmce.steps import (
    RunLayout,
    run_all,
    step_combine,
    step_embed_member,
    step_evaluate,
    step_fit_transform,
    step_train,
)
from cmce.tables import embedding_column, read_table, rows_of, string_column
from cmce.transform import Transformation, build_mlp, load_transformation, save_transformation

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
    configs = [k for k in runs[0] if not k.startswith("rejection/")]
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


def _diff(runs: Runs, a: str, b: str, metric: str) -> tuple[float, bool]:
    """mean(a) − mean(b) for one metric, and whether it exceeds the combined spread."""
    (ma, sa), (mb, sb) = mean_std([r[a][metric] for r in runs]), mean_std([r[b][metric] for r in runs])
    return ma - mb, abs(ma - mb) > sa + sb


def targets(runs: Runs, n: int) -> list[str]:
    ens = f"asym_ensemble/{n}"
    best = lambda prefix, metric: max((k for k in runs[0] if k.startswith(prefix)),  # noqa: E731
                                      key=lambda k: statistics.fmean(r[k][metric] for r in runs))
    rows = ["| target | measured Δ (points) | per seed | needed | met | beyond the spread |",
            "|---|---|---|---|---|---|"]

    def row(text: str, a: str, b: str, metric: str, needed: float) -> None:
        d, real = _diff(runs, a, b, metric)
        spread = ("yes" if real else "no") if len(runs) > 1 else "n/a (one seed)"
        # paired by seed: under class-disjoint protocols a seed's split moves both sides together
        per_seed = ", ".join(f"{100 * (r[a][metric] - r[b][metric]):+.2f}" for r in runs)
        rows.append(f"| {text} ({a} − {b}, {metric}) | {100 * d:+.2f} | {per_seed} | ≥ {needed:+.0f} | "
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


def refit(cfg: Config, lay: RunLayout, root: Path, transform: dict | None = None, query: Path | None = None) -> dict:
    """Refit every transformation on seed 0's frozen gallery models (with other transformation settings,
    or for another query model), rebuild the gallery and evaluate every configuration."""
    alt = replace(cfg, transform=replace(cfg.transform, **(transform or {})))
    q = query or lay.model(cfg.query_model.name)
    members, transforms = [], []
    for g in lay.gallery_names:
        t = step_fit_transform(alt, lay.dataset, q, lay.model(g), root / f"T_{g}.pt", None)
        members.append(step_embed_member(lay.dataset, q, lay.model(g), t, root / f"member_{g}.parquet",
                                         cfg.batch_size))
        transforms.append(t)
    gallery = step_combine(members, root / "gallery.parquet")
    return step_evaluate(alt, EvalInputs(lay.dataset, q, gallery, transforms), root / "eval")


# the levers the issue asks about when the ensemble falls short; each refits T on seed 0's frozen models
TRANSFORM_LEVERS: dict[str, dict] = {
    "λ = 0.1": {"lam": 0.1},
    "λ = 0.3": {"lam": 0.3},
    "λ = 1": {"lam": 1.0},
    "10 epochs": {"epochs": 10},
    "100 epochs": {"epochs": 100},
    "linear T (depth 1)": {"depth": 1},
    "depth 3": {"depth": 3},
    "hidden width 1024": {"hidden_dim": 1024},
    "CE temperature: scale s = 8": {"scale": 8.0},
    "CE temperature: scale s = 32": {"scale": 32.0},
    "4 augmented views of each train image": {"augment_views": 4},
}


LAMBDA_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
# the transformation settings searched by the `tune` ablation, one coordinate after the other in this order
TUNE_GRID: dict[str, tuple] = {"lam": LAMBDA_GRID, "depth": (1, 2, 3), "hidden_dim": (256, 512, 1024),
                               "epochs": (10, 30, 100)}
SETTING_NAMES = {"lam": "λ", "depth": "depth", "hidden_dim": "hidden width", "epochs": "epochs"}


class Validation:
    """Transformation settings measured without the test split: seed 0's train split carved into a
    validation dataset (whole classes / class groups under disjoint protocols), every model retrained on
    the rest once, then T refitted per setting on those frozen models. Each setting is also measurable
    on test (T refitted on the run's own models). Results cached by setting, shared by ablations."""

    def __init__(self, cfg: Config, lay: RunLayout, config_run: dict, fraction: float):
        self.cfg, self.lay, self.fraction = cfg, lay, fraction
        self.root = lay.root / "validation"
        self.val_lay = RunLayout(self.root / "run", lay.gallery_names)
        self.val_cfg = replace(cfg, output_dir=str(self.val_lay.root), kd=replace(cfg.kd, enabled=False))
        self.config_settings = {k: getattr(cfg.transform, k) for k in TUNE_GRID}
        self._val: dict[tuple, dict] = {}
        self._test: dict[tuple, dict] = {self._key(self.config_settings): config_run}
        self.ens = f"asym_ensemble/{len(cfg.gallery_models)}"

    @staticmethod
    def _key(settings: dict) -> tuple:
        return tuple(sorted(settings.items()))

    @staticmethod
    def _dirname(settings: dict) -> str:
        return "_".join(f"{k}{v:g}" for k, v in sorted(settings.items()))

    def val(self, settings: dict) -> dict:
        key = self._key(settings)
        if not self._val:  # the carve and the retraining happen once, when first needed
            carve_validation(self.lay.dataset, self.val_lay.dataset, self.fraction, self.cfg.seed)
            self._val[self._key(self.config_settings)] = run_all(self.val_cfg, prepare=False)
        if key not in self._val:
            self._val[key] = refit(self.val_cfg, self.val_lay, self.root / self._dirname(settings), settings)
        return self._val[key]

    def test(self, settings: dict) -> dict:
        key = self._key(settings)
        if key not in self._test:
            self._test[key] = refit(self.cfg, self.lay, self.lay.root / "tuned" / self._dirname(settings), settings)
        return self._test[key]

    def score(self, settings: dict) -> float:
        # λ trades R@1 (falls with λ) against MAP@R (rises): the pick weighs both equally
        m = self.val(settings)[self.ens]
        return m["R@1"] + m["MAP@R"]

    def cell(self, metrics: dict) -> str:
        return shown(metrics[self.ens])

    def carved_by(self) -> str:
        return dataset_info(self.val_lay.dataset)["validation"]["by"]


def describe(settings: dict) -> str:
    linear = settings.get("depth") == 1  # a linear T has no hidden layer: its width means nothing
    return ", ".join(f"{SETTING_NAMES[k]} {v:g}" for k, v in settings.items() if not (linear and k == "hidden_dim"))


def coordinate_search(v: Validation, grid: dict[str, tuple]) -> tuple[dict, list[tuple[str, dict, bool]]]:
    """One pass over the grid's settings in order, each set to its best validation score with the others
    held (ties keep the current value). Returns the chosen settings and, per row, (setting, the settings
    measured, chosen)."""
    current = dict(v.config_settings)
    trail = []
    for name, values in grid.items():
        if name == "hidden_dim" and current["depth"] == 1:
            continue  # a linear T has no hidden layer
        candidates = [current[name]] + [x for x in values if x != current[name]]
        best = max(candidates, key=lambda x: v.score({**current, name: x}))  # max keeps the first of ties
        trail += [(name, {**current, name: x}, x == best) for x in sorted(candidates)]
        current[name] = best
    return current, trail


def tuning_table(v: Validation, grid: dict[str, tuple]) -> list[str]:
    """The validation search over `grid`, then test for the config's settings, the tuned ones and the
    tuned ones with λ = 0 (alignment only): the issue's "λ = 0 vs tuned"."""
    chosen, trail = coordinate_search(v, grid)
    rows = [f"Validation: {100 * v.fraction:g} % of seed {v.cfg.seed}'s train split ({v.carved_by()}), every model "
            "retrained on the rest; settings chosen one after the other by validation R@1 + MAP@R of "
            f"{v.ens} (R@1 / MAP@R / TAR@FAR=0.001 in %).", "",
            "| setting | value | validation |", "|---|---|---|"]
    for name, at, picked in trail:
        tags = [t for t, on in (("chosen", picked), ("config", at[name] == v.config_settings[name])) if on]
        rows.append(f"| {SETTING_NAMES[name]} | {at[name]:g}{' (' + ', '.join(tags) + ')' if tags else ''} | "
                    f"{v.cell(v.val(at))} |")
    finals = {"config": v.config_settings, "tuned": chosen, "tuned with λ = 0": {**chosen, "lam": 0.0}}
    groups: dict[tuple, tuple[dict, list[str]]] = {}  # equal settings share one row, named by all their labels
    for label, settings in finals.items():
        groups.setdefault(v._key(settings), (settings, []))[1].append(label)
    rows += ["", "| T settings | validation | test |", "|---|---|---|"]
    for settings, names in groups.values():
        rows.append(f"| {' and '.join(names)}: {describe(settings)} | {v.cell(v.val(settings))} | "
                    f"{v.cell(v.test(settings))} |")
    return rows


def stored_embeddings(lay: RunLayout, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(φ_g(x), φ_q(x)) of the train and test splits, rows paired, read back from what the run wrote (T's
    train embeddings; the gallery member file and the evaluation's query file) instead of embedding again."""
    paths = lay.train_embeddings(name), lay.member(name), lay.eval_dir / "query.parquet"
    (train, train_at), (member, member_at), (query, query_at) = ((read_table(p), str(p)) for p in paths)
    order = rows_of(string_column(member, "id", member_at), string_column(query, "id", query_at), member_at)
    return {"train": (embedding_column(train, "raw", train_at), embedding_column(train, "query", train_at)),
            "test": (embedding_column(member, "raw", member_at)[order], embedding_column(query, "embedding", query_at))}


Stored = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # gallery model name -> its `stored_embeddings`


def compatibility_table(cfg: Config, lay: RunLayout, config_run: dict, stored: Stored) -> list[str]:
    """How mappable each gallery model's space is onto the query model's: linear CKA of the raw
    embeddings with the query embeddings, and the mean cosine between n(T(φ_g(x))) and n(φ_q(x)), on
    the train split T was fitted on and on the test split it must carry over to."""
    rows = ["| gallery model | linear CKA with φ_q (train / test) | cos(T(φ_g), φ_q) (train / test) | "
            "asym R@1 | sym_gallery R@1 |", "|---|---|---|---|---|"]
    for spec in cfg.gallery_models:
        t = load_transformation(lay.transformation(spec.name))
        cka, cos = [], []
        for g_emb, q_emb in stored[spec.name].values():
            cka.append(linear_cka(g_emb, q_emb))
            cos.append(float((t.apply(g_emb) * normalize(q_emb)).sum(axis=1).mean()))
        r1 = [100 * config_run[f"{c}/{spec.name}"]["R@1"] for c in ("asym", "sym_gallery")]
        rows.append(f"| {spec.name} ({spec.arch}) | {cka[0]:.2f} / {cka[1]:.2f} | {cos[0]:.2f} / {cos[1]:.2f} | "
                    f"{r1[0]:.2f} | {r1[1]:.2f} |")
    return rows


def residual_table(cfg: Config, lay: RunLayout, stored: Stored) -> list[str]:
    """What averaging can remove: each member's residual r_i = n(T_i(φ_gi(x))) − n(φ_q(x)) on the test split, the
    served ensemble's, and the mean pairwise cosine of the members' residuals (averaging removes only the part
    the members do not share)."""
    residuals, transformed = {}, []
    for spec in cfg.gallery_models:
        g_emb, q_emb = stored[spec.name]["test"]  # rows in the query file's order for every member
        transformed.append(load_transformation(lay.transformation(spec.name)).apply(g_emb))
        residuals[spec.name] = transformed[-1] - normalize(q_emb)
    ensemble = normalize(np.mean(transformed, axis=0)) - normalize(q_emb)
    sq = {name: float((r ** 2).sum(axis=1).mean()) for name, r in residuals.items()}
    names = list(residuals)
    cosines = [float((normalize(residuals[a]) * normalize(residuals[b])).sum(axis=1).mean())
               for i, a in enumerate(names) for b in names[i + 1:]]
    rows = ["| gallery side | mean ‖n(T(φ_g(x))) − n(φ_q(x))‖² (test) |", "|---|---|"]
    rows += [f"| {name}'s T | {v:.4f} |" for name, v in sq.items()]
    rows += [f"| the ensemble of {len(names)}, as served | {float((ensemble ** 2).sum(axis=1).mean()):.4f} |",
             f"| the ensemble, were the members' residuals independent (their mean / {len(names)}) | "
             f"{statistics.fmean(sq.values()) / len(names):.4f} |", ""]
    if cosines:
        rows.append(f"Mean pairwise cosine of the members' residuals: {statistics.fmean(cosines):.2f} "
                    f"({', '.join(f'{c:.2f}' for c in cosines)}; 0 = independent, 1 = the same error).")
    return rows


def costs_table(cfg: Config, lay: RunLayout) -> list[str]:
    """Parameters and FLOPs per image of every trained model of the run: the query side (the query model,
    and each KD student as the alternative query model) and the gallery side (each gallery model with its
    T, and the whole ensemble)."""
    ch, size = cfg.data.channels, cfg.data.image_size
    rows = ["| model | side | parameters | FLOPs / image |", "|---|---|---|---|"]

    def cost(path: Path) -> tuple[int, int]:
        net = load_embedding_model(path).net
        return count_parameters(net), count_flops(net, ch, size, size)

    q = cost(lay.model(cfg.query_model.name))
    rows.append(f"| {cfg.query_model.name} ({cfg.query_model.arch}) | query | {q[0]:,} | {q[1]:,} |")
    total = [0, 0]
    for spec in cfg.gallery_models:
        g = cost(lay.model(spec.name))
        t = load_transformation(lay.transformation(spec.name))
        t_cost = count_parameters(t.mlp), count_flops(t.mlp, t.in_dim)
        both = [g[0] + t_cost[0], g[1] + t_cost[1]]
        total = [total[0] + both[0], total[1] + both[1]]
        rows.append(f"| {spec.name} ({spec.arch}) + its T | gallery | {both[0]:,} | {both[1]:,} |")
    rows.append(f"| the ensemble of {len(cfg.gallery_models)} | gallery | {total[0]:,} | {total[1]:,} |")
    if cfg.kd.enabled:
        for spec in cfg.gallery_models:
            k = cost(lay.kd_student(spec.name))
            rows.append(f"| KD student of {spec.name} | query (kd/{spec.name}) | {k[0]:,} | {k[1]:,} |")
    rows.append(f"| **query model / ensemble** | | {q[0] / total[0]:.3f} | {q[1] / total[1]:.3f} |")
    return rows


def levers_ablation(cfg: Config, lay: RunLayout) -> dict[str, dict]:
    out = {name: refit(cfg, lay, lay.root / "levers" / f"t{i}", transform=t)
           for i, (name, t) in enumerate(TRANSFORM_LEVERS.items())}
    w = cfg.query_model.width
    for width, (_, m) in query_width_runs(cfg, lay, [w // 2, w * 2]).items():
        out[f"query model width {width} (config: {w})"] = m
    return out


def query_width_runs(cfg: Config, lay: RunLayout, widths: list[int]) -> dict[int, tuple[Path, dict]]:
    """Query-model quality: the query model retrained at each width (same architecture and seed), every
    transformation refitted for it on the same frozen gallery models, every configuration evaluated.
    width → (query checkpoint, metrics)."""
    out = {}
    for width in widths:
        spec = replace(cfg.query_model, name=f"{cfg.query_model.name}_w{width}", width=width)
        root = lay.root / "levers" / f"query_w{width}"
        query = step_train(replace(cfg, query_model=spec), lay.dataset, spec.name, root / f"{spec.name}.pt")
        out[width] = (query, refit(cfg, lay, root, query=query))
    return out


def query_quality_table(cfg: Config, lay: RunLayout, config_run: dict, n: int) -> list[str]:
    w = cfg.query_model.width
    runs = query_width_runs(cfg, lay, [w // 4, w // 2, w * 2])
    runs[w] = (lay.model(cfg.query_model.name), config_run)
    rows = [f"| query width | query parameters | sym_query | asym_ensemble/{n} | Δ (ensemble − sym_query) |",
            "|---|---|---|---|---|"]
    for width in sorted(runs):
        query, m = runs[width]
        q, e = m["sym_query"], m[f"asym_ensemble/{n}"]
        cells = [shown(r) for r in (q, e)]
        delta = " / ".join(f"{100 * (e[x] - q[x]):+.2f}" for x in SHOWN)
        params = count_parameters(load_embedding_model(query).net)
        rows.append(f"| {width}{' (config)' if width == w else ''} | {params:,} | {cells[0]} | {cells[1]} | {delta} |")
    return rows


def diversity_ablation(cfg: Config, lay: RunLayout) -> dict[str, dict]:
    """asym_ensemble/N for: N T's of one gallery model; N same-architecture gallery models; the config's mix."""
    n = len(cfg.gallery_models)
    q = lay.model(cfg.query_model.name)
    first = cfg.gallery_models[0]
    out: dict[str, dict] = {}
    # N transformations of one gallery model: only the transformation's seed differs
    root = lay.root / "diversity_one_model"
    members = []
    for i in range(n):
        alt = replace(cfg, seed=cfg.seed + 100 + i)
        t = step_fit_transform(alt, lay.dataset, q, lay.model(first.name), root / f"T_{i}.pt", None)
        members.append(step_embed_member(lay.dataset, q, lay.model(first.name), t, root / f"member_{i}.parquet",
                                         cfg.batch_size))
    out[f"{n} transformations of one model ({first.arch})"] = _ensemble_of(cfg, lay, q, members, root)
    # N gallery models of one architecture, different seeds (and the first model's data fraction)
    root = lay.root / "diversity_one_arch"
    members = []
    for i in range(n):
        spec = replace(first, name=f"{first.name}_s{i}", seed=first.seed + 10 * i)
        alt = replace(cfg, gallery_models=[spec])
        model = step_train(alt, lay.dataset, spec.name, root / f"{spec.name}.pt")
        t = step_fit_transform(alt, lay.dataset, q, model, root / f"T_{spec.name}.pt", None)
        members.append(step_embed_member(lay.dataset, q, model, t, root / f"member_{spec.name}.parquet",
                                         cfg.batch_size))
    out[f"{n} {first.arch} models, different seeds"] = _ensemble_of(cfg, lay, q, members, root)
    return out


def query_member_ablation(cfg: Config, lay: RunLayout) -> dict[str, dict]:
    """asym_ensemble/N with the query model's own embedding of each gallery image added as one more member
    (an identity transformation): the gallery side may run the cheap query model too, and its member keeps
    the within-class structure that query→query R@1 relies on."""
    import torch

    q = lay.model(cfg.query_model.name)
    model = load_embedding_model(q)
    mlp = build_mlp(model.embedding_dim, model.embedding_dim, 0, 1)
    with torch.no_grad():
        mlp[0].weight.copy_(torch.eye(model.embedding_dim))
        mlp[0].bias.zero_()
    root = lay.root / "query_member"
    identity = root / "T_identity.pt"
    root.mkdir(parents=True, exist_ok=True)
    save_transformation(Transformation(mlp, model.name, model.sha256, model.sha256, model.embedding_dim,
                                       model.embedding_dim, 0, 1), identity)
    own = step_embed_member(lay.dataset, q, q, identity, root / "member_query.parquet", cfg.batch_size)
    n = len(cfg.gallery_models)
    return {f"the query model + the config's {n} (identity T for the query model)":
            _ensemble_of(cfg, lay, q, [*(lay.member(g) for g in lay.gallery_names), own], root)}


def _ensemble_of(cfg: Config, lay: RunLayout, q: Path, members: list[Path], root: Path) -> dict:
    """asym_ensemble/N of these members, measured as served (query model vs the stored ensemble embedding)."""
    import json

    import pyarrow.parquet as pq

    from cmce.promotion import served_metrics

    named = []
    for i, m in enumerate(members):  # members of one gallery model share its name: make them distinct
        table = pq.read_table(m)
        meta = json.loads(table.schema.metadata[b"cmce"])
        meta["gallery_model"]["name"] = f"m{i}"
        named.append(root / f"named_{i}.parquet")
        pq.write_table(table.replace_schema_metadata({"cmce": json.dumps(meta)}), named[-1])
    gallery = step_combine(named, root / "gallery.parquet")
    metrics = served_metrics(lay.dataset, q, gallery, "test", cfg.evaluate.recall_k, cfg.evaluate.far,
                             cfg.batch_size)
    return {f"asym_ensemble/{len(members)}": metrics}


def levers_table(rows: dict[str, dict], n: int) -> list[str]:
    """One row per lever: the ensemble, the best single transformation (by R@1) and the query model alone."""
    out = [f"| change | asym_ensemble/{n} | best asym/* | sym_query |", "|---|---|---|---|"]
    for name, m in rows.items():
        best = max((k for k in m if k.startswith("asym/")), key=lambda k: m[k]["R@1"])
        out.append(f"| {name} | " + " | ".join(shown(m[c]) for c in (f"asym_ensemble/{n}", best, "sym_query")) + " |")
    return out


def query_member_table(config_run: dict, variants: dict[str, dict], n: int) -> list[str]:
    """The query model alone, the config's ensemble and each query-member variant (one ensemble each)."""
    rows = {"the query model alone (sym_query)": config_run["sym_query"],
            f"the config's {n} (asym_ensemble/{n})": config_run[f"asym_ensemble/{n}"]}
    rows |= {name: next(iter(m.values())) for name, m in variants.items()}
    return ["| gallery side | R@1 / MAP@R / TAR@FAR=0.001 |", "|---|---|",
            *(f"| {name} | {shown(m)} |" for name, m in rows.items())]


def recorded_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command line as run, without options left at their defaults, quoted as a shell needs it (so it
    runs as written, e.g. an empty --ablations '')."""
    config = Path(args.config).resolve()
    given = {"config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else args.config,
             "seeds": args.seeds, "ablations": args.ablations, "val-fraction": f"{args.val_fraction:g}"}
    defaults = {"config": "params.yaml", "seeds": parser.get_default("seeds"),
                "ablations": parser.get_default("ablations"), "val-fraction": f"{parser.get_default('val_fraction'):g}"}
    command = "python -m benchmarks.method" + "".join(f" --{k} {shlex.quote(v)}" for k, v in given.items()
                                                      if v != defaults[k])
    return command + "".join(f" --set {shlex.quote(s)}" for s in args.set)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "params.yaml"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ablations", default="size,diversity,lambda", help="comma-separated; empty for none")
    p.add_argument("--val-fraction", type=float, default=0.25,
                   help="share of the train split (heldout: of each class; else: of the classes) T is tuned on")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_method"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--no-write", action="store_true")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(args.config, {**overrides, "kd.enabled": True})
    seeds = [int(s) for s in args.seeds.split(",")]
    ablations = [a for a in args.ablations.split(",") if a]
    if set(ablations) - set(ABLATIONS):
        p.error(f"unknown ablation(s) {sorted(set(ablations) - set(ABLATIONS))}; valid: {', '.join(ABLATIONS)}")
    started = time.time()
    runs, layouts = [], []
    for seed in seeds:
        run_cfg = seeded(cfg, seed, Path(args.out) / f"seed{seed}")
        t0 = time.time()
        runs.append(run_all(run_cfg))
        layouts.append(RunLayout(Path(run_cfg.output_dir), [m.name for m in run_cfg.gallery_models]))
        log.info("seed %d: %.0f s", seed, time.time() - t0)
    n = len(cfg.gallery_models)
    body = [f"Config `{Path(args.config).name}`{' with ' + ', '.join(args.set) if args.set else ''}: "
            f"{cfg.data.source}, {cfg.data.protocol} protocol; {len(seeds)} seeds ({args.seeds}); values in %, "
            "mean ± std over seeds; leave-one-out on the test split.", "",
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
        append_section(f"Method over seeds: {cfg.data.source} ({cfg.data.protocol})", command, body,
                       time.time() - started)


if __name__ == "__main__":
    main()
