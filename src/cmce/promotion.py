"""Promotion gate: may a changed gallery (grown ensemble, upgraded query model) replace the served one?

Both sides are measured the way they are served: query-model embeddings of labelled queries searched
against the gallery file's stored ensemble embedding, less the items its index rejects (cosine, a query's
own image excluded, the conventions of cmce.metrics). The candidate is promoted when no gated metric
drops by more than the tolerance: ``candidate[m] >= baseline[m] - tolerance`` for every m. Ties promote
(an equal gallery that carries a new model version is not a regression).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cmce.checkpoint import load_embedding_model
from cmce.config import Config
from cmce.data.loader import split_source
from cmce.embed import embed_split
from cmce.evaluate import cosine_scores, cross_domains, self_columns
from cmce.method import rejection_mask
from cmce.metrics import retrieval_metrics
from cmce.scores import BLOCK_MB
from cmce.tables import (
    check_rows_are_split,
    checked_uncertainty,
    embedding_column,
    int_column,
    read_schema,
    read_table,
    served_gallery,
    string_column,
)

log = logging.getLogger(__name__)


@dataclass
class Decision:
    promoted: bool
    metrics: list[str]
    tolerance: float
    baseline: dict[str, float]
    candidate: dict[str, float]
    delta: dict[str, float]
    regressed: list[str]  # gated metrics that dropped by more than the tolerance

    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict[str, float]:
        """One number per key, for metrics.json / MLflow / KFP (promoted as 1.0 or 0.0)."""
        out = {"promoted": float(self.promoted)}
        for side in ("baseline", "candidate", "delta"):
            out |= {f"{side}/{k}": v for k, v in getattr(self, side).items()}
        return out


def withhold(decision: Path, reason: str) -> None:
    """A decision to promote that cannot be carried out (the served versions are not registered): the written
    decision says not promoted, and why, so that a deploy script waiting for a promotion does not go on."""
    note_in_decision(decision, promoted=False, not_promoted=reason)


def promotes(record: Any) -> bool:
    """A gate's record that passed and names versions whose `production` alias is to move."""
    return bool(record.metrics["promoted"] and record.promote)


def note_unmoved(record: Any, decision: Path, why: str) -> bool:
    """A promoting decision where no alias can move (the gate is not tracked) says so in its file too: a DVC
    metrics table showed `promoted: true` alone. Returns whether it was one."""
    if not promotes(record):
        return False
    note_in_decision(decision, production_alias=f"not moved: {why}")
    return True


def note_in_decision(decision: Path, **fields: Any) -> None:
    """`fields` set in a written decision file (rewritten whole, atomically)."""
    from cmce.storage import write_text

    report = json.loads(decision.read_text())
    write_text(decision, json.dumps({**report, **fields}, indent=2, sort_keys=True) + "\n")


def withhold_unmovable(record: Any, decision: Path, tracking_uri: str) -> str | None:
    """Before a promoting gate's record is published: where a served version has no registered version of its
    sha256, `production` cannot move (all or nothing); where @production has moved since the baseline the gate
    measured (an upgrade promoted after the run the candidate grew from), moving it would roll that back without a
    word. Then the record and the decision file say not promoted, and why (a deploy script read `"promoted": true`
    while nothing moved). Returns the reason; None when the move can go ahead."""
    from cmce.registry import production_elsewhere, unregistered

    if not promotes(record):
        return None
    if missing := unregistered(tracking_uri, record.promote):
        why = f"{missing} have no registered version whose file has the served sha256; @production not moved"
    elif moved := production_elsewhere(tracking_uri, record.promote_from):
        why = (f"{', '.join(moved)} moved since the baseline this gate measured was served; @production not moved "
               "(grow the run production serves now)")
        record.promote, record.promote_along = [], []  # registered all: publishing would move them
        record.params["promotion"] = f"skipped: {why}"
    else:
        return None
    withhold(decision, why)
    record.metrics["promoted"] = 0.0
    log.warning("gate: not promoted: %s", why)
    return why


def decide(baseline: dict[str, float], candidate: dict[str, float], metrics: list[str],
           tolerance: float = 0.0) -> Decision:
    """Pure: compare the gated metrics of two measurements."""
    missing = [m for m in metrics if m not in baseline or m not in candidate]
    if missing:
        raise KeyError(f"gate metrics {missing} not measured; measured: {sorted(baseline)}")
    delta = {m: candidate[m] - baseline[m] for m in metrics}
    # NaN (e.g. no query with a match) never passes: it is not evidence of no regression. A drop of exactly the
    # tolerance passes: 51/3000 - 21/3000 is -0.010000000000000002 in floats, refused at tolerance 0.01 (R@1 moves in
    # steps of 1/queries, so such a drop is common)
    regressed = [m for m in metrics
                 if not (delta[m] >= -tolerance or math.isclose(delta[m], -tolerance, rel_tol=1e-9, abs_tol=1e-12))]
    return Decision(not regressed, list(metrics), tolerance, {m: baseline[m] for m in metrics},
                    {m: candidate[m] for m in metrics}, delta, regressed)


def gate_measures(cfg: Config) -> tuple[list[int], list[float]]:
    """The ranks and FARs the gate measures: the evaluation's, and those its gated metrics name."""
    gate = cfg.lifecycle.gate
    ks = sorted({*cfg.evaluate.recall_k, *(int(m[2:]) for m in gate.metrics if m.startswith("R@"))})
    fars = sorted({*cfg.evaluate.far, *(float(m.split("=")[1]) for m in gate.metrics if m.startswith("TAR@"))})
    return ks, fars


def served_metrics(dataset: Path, query_model: Path, gallery: Path, split: str, recall_k: list[int],
                   fars: list[float], batch_size: int = 256, block_mb: float = BLOCK_MB,
                   reject_fraction: float = 0.0) -> dict[str, float]:
    """Metrics of the query model searching the gallery's stored ensemble embedding, without the items an index
    built at `reject_fraction` leaves out (build-index's rule; a gallery of one member rejects nothing, as it can
    only have been served whole). `rejected` counts them."""
    q_model = load_embedding_model(query_model)
    meta = served_gallery(gallery, q_model.sha256, query_model, "the gate")
    n_members = len(meta.get("members", []))
    rejecting = reject_fraction > 0 and n_members >= 2
    running = [c for c in ("ensemble_sum", "n_models") if rejecting and c in read_schema(gallery).names]
    table = read_table(gallery, ["id", "label", "embedding", *(["uncertainty", *running] if rejecting else [])])
    g_ids = string_column(table, "id", str(gallery))
    g_labels = int_column(table, "label", str(gallery))
    check_rows_are_split(g_ids, split_source(dataset, meta["split"]), str(gallery),
                         f"the '{meta['split']}' split of {dataset}", g_labels)
    emb = embedding_column(table, "embedding", str(gallery), q_model.embedding_dim)  # named before the embedding
    if rejecting:
        keep = ~rejection_mask(checked_uncertainty(table, n_members, str(gallery)), reject_fraction)
        emb, g_labels, g_ids = emb[keep], g_labels[keep], [i for i, k in zip(g_ids, keep, strict=True) if k]
    elif reject_fraction > 0:
        log.warning("%s has %d gallery member(s): measured whole (rejecting by uncertainty needs at least 2)",
                    gallery, n_members)
    rejected = table.num_rows - len(g_ids)
    q = embed_split(q_model, dataset, split, batch_size)
    scores = cosine_scores(q.embeddings, emb, self_columns(q.ids, g_ids), cross_domains(dataset, q.ids, g_ids))
    out = retrieval_metrics(scores, q.labels, g_labels, recall_k, fars, block_mb=block_mb) | {"rejected": rejected}
    log.info("%s with %s (%d rejected): %s", gallery, Path(query_model).name, rejected,
             ", ".join(f"{k} {v:.4f}" for k, v in out.items() if k not in ("lone_queries", "rejected")))
    return out
