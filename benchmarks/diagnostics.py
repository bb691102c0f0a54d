"""Why the ensemble does what it does, from a finished run's files: how mappable each gallery space is onto
the query space, what averaging the members can remove, and what each model costs."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from cmce.checkpoint import load_embedding_model
from cmce.config import Config
from cmce.layout import RunLayout
from cmce.method import RunningEnsemble, normalize
from cmce.metrics import linear_cka
from cmce.models import count_flops, count_parameters
from cmce.tables import embedding_column, read_table, rows_of, string_column
from cmce.transform import load_transformation


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
    served = RunningEnsemble()
    for member in transformed:
        served.add(member)
    ensemble = served.embedding - normalize(q_emb)
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

