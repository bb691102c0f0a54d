"""The ablations that change the models or transformations of seed 0's run: levers tried to lift the
ensemble, query-model quality, diversity of the members, and the query model as one more member."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.refit import combined, embedded, fitted, refit, trained
from benchmarks.report import SHOWN, shown
from cmce.checkpoint import load_embedding_model
from cmce.config import Config
from cmce.layout import RunLayout
from cmce.models import count_parameters
from cmce.promotion import served_metrics
from cmce.transform import Transformation, build_mlp, save_transformation

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
        query = trained(replace(cfg, query_model=spec), lay.dataset, spec.name, root / f"{spec.name}.pt")
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
        t = fitted(alt, lay.dataset, q, lay.model(first.name), root / f"T_{i}.pt")
        members.append(embedded(lay.dataset, q, lay.model(first.name), t, root / f"member_{i}.parquet",
                                         cfg.batch_size))
    out[f"{n} transformations of one model ({first.arch})"] = _ensemble_of(cfg, lay, q, members, root)
    # N gallery models of one architecture, different seeds (and the first model's data fraction)
    root = lay.root / "diversity_one_arch"
    members = []
    for i in range(n):
        spec = replace(first, name=f"{first.name}_s{i}", seed=first.seed + 10 * i)
        alt = replace(cfg, gallery_models=[spec])
        model = trained(alt, lay.dataset, spec.name, root / f"{spec.name}.pt")
        t = fitted(alt, lay.dataset, q, model, root / f"T_{spec.name}.pt")
        members.append(embedded(lay.dataset, q, model, t, root / f"member_{spec.name}.parquet",
                                         cfg.batch_size))
    out[f"{n} {first.arch} models, different seeds"] = _ensemble_of(cfg, lay, q, members, root)
    return out


def query_member_ablation(cfg: Config, lay: RunLayout) -> dict[str, dict]:
    """asym_ensemble/N with the query model's own embedding of each gallery image added as one more member
    (an identity transformation): the gallery side may run the cheap query model too, and its member keeps
    the within-class structure that query→query R@1 relies on."""
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
    own = embedded(lay.dataset, q, q, identity, root / "member_query.parquet", cfg.batch_size)
    n = len(cfg.gallery_models)
    return {f"the query model + the config's {n} (identity T for the query model)":
            _ensemble_of(cfg, lay, q, [*(lay.member(g) for g in lay.gallery_names), own], root)}


def _ensemble_of(cfg: Config, lay: RunLayout, q: Path, members: list[Path], root: Path) -> dict:
    """asym_ensemble/N of these members, measured as served (query model vs the stored ensemble embedding)."""
    named = []
    for i, m in enumerate(members):  # members of one gallery model share its name: make them distinct
        table = pq.read_table(m)
        meta = json.loads(table.schema.metadata[b"cmce"])
        meta["gallery_model"]["name"] = f"m{i}"
        named.append(root / f"named_{i}.parquet")
        pq.write_table(table.replace_schema_metadata({"cmce": json.dumps(meta)}), named[-1])
    gallery = combined(named, root / "gallery.parquet")
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

