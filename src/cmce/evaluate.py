"""Evaluation of every configuration on the test split, and rejection by uncertainty.

Queries and gallery are the same test images (leave-one-out): a query's own image is excluded. Under the
cross_vendor protocol (dataset column `domain`) a query's whole domain is excluded: only the same emoji
drawn by another vendor counts as a match, and other vendors' drawings of other emoji are the distractors.
Configurations (metrics.json keys):
  sym_query               query model → query model
  sym_gallery/<m>         gallery model m → itself
  asym/<m>                query model → T_m(gallery model m)
  asym_ensemble/<n>       query model → mean of the first n transformed gallery models
  kd/<m>                  distilled query-sized student of m → gallery model m
  rejection/uncertainty   asym_ensemble/N with the most uncertain gallery items removed
  rejection/random        the same number of gallery items removed at random (mean of repeats)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from cmce.checkpoint import EmbeddingModel, load_embedding_model
from cmce.config import EvaluateConfig
from cmce.data import dataset_info, read_domains
from cmce.embed import embed_split
from cmce.ensemble import normalize
from cmce.index import rejection_mask
from cmce.metrics import retrieval_metrics
from cmce.storage import atomic_dir, check_replaceable, origin
from cmce.tables import (
    TableError,
    check_unique_ids,
    embedding_array,
    embedding_column,
    float_column,
    id_rows,
    int_column,
    read_metadata,
    read_table,
    rows_of,
    string_column,
    with_metadata,
    write_table,
)
from cmce.transform import load_transformation

log = logging.getLogger(__name__)
# what evaluate writes: query.parquet here, the rest by cmce.report.write_reports
EVAL_FILES = ("query.parquet", "metrics.json", "versions.json", "results.md", "recall.png", "rejection.png")
Metrics = dict[str, dict[str, float]]


@dataclass
class EvalInputs:
    dataset: Path
    query_model: Path
    gallery: Path
    transformations: list[Path]  # one per gallery member, any order: matched by gallery model sha256
    kd_students: list[Path] = field(default_factory=list)  # any order: matched by their teacher's sha256


Domains = tuple[np.ndarray, np.ndarray]  # domain code of each query, of each gallery item


def self_columns(query_ids: list[str], gallery_ids: list[str]) -> np.ndarray:
    """For each query, the gallery column holding the same image (-1 if none): the pair score_matrix excludes."""
    return id_rows(gallery_ids, query_ids)


def score_matrix(queries: np.ndarray, gallery: np.ndarray, self_cols: np.ndarray,
                 domains: Domains | None = None) -> np.ndarray:
    """Cosine scores; the pair (query i, gallery self_cols[i]) is excluded (-inf) when self_cols[i] ≥ 0,
    and with `domains` every pair within one domain is."""
    scores = normalize(queries) @ normalize(gallery).T
    rows = np.flatnonzero(self_cols >= 0)
    scores[rows, self_cols[rows]] = -np.inf
    if domains is not None:
        scores[domains[0][:, None] == domains[1][None, :]] = -np.inf
    return scores


def cross_domains(dataset: Path, query_ids: list[str], gallery_ids: list[str]) -> Domains | None:
    """Domain codes of queries and gallery items when the dataset's protocol is cross_vendor, else None."""
    if dataset_info(dataset).get("protocol") != "cross_vendor":
        return None
    domain = read_domains(dataset)
    codes = {d: n for n, d in enumerate(sorted(set(domain.values())))}

    def encode(ids: list[str], what: str) -> np.ndarray:
        missing = [i for i in ids if i not in domain]
        if missing:
            raise TableError(f"{dataset}: no domain for {len(missing)} {what} ids, e.g. {missing[0]!r}")
        return np.array([codes[domain[i]] for i in ids])

    return encode(query_ids, "query"), encode(gallery_ids, "gallery")


def kept_gallery_errors(scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, keep: np.ndarray,
                        far: float) -> tuple[float, float]:
    """(retrieval error 1 − R@1, verification error 1 − TAR@`far`) with only the `keep` gallery columns indexed;
    the verification threshold is set on the kept gallery's impostor pairs. As for lone queries, a query whose
    every match was rejected leaves the R@1 denominator: the error is over the queries the kept gallery can answer."""
    m = retrieval_metrics(scores[:, keep], query_labels, gallery_labels[keep], ks=[1], fars=[far], with_map=False)
    return 1.0 - m["R@1"], 1.0 - m[f"TAR@FAR={far:g}"]


def rejection_curves(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    uncertainty: np.ndarray,
    cfg: EvaluateConfig,
    seed: int,
) -> Metrics:
    """Error vs rejection rate under the retrieval (1 − R@1) and verification (1 − TAR) protocols."""
    rng = np.random.default_rng(seed)
    out: Metrics = {"rejection/uncertainty": {}, "rejection/random": {}}

    def errors(keep: np.ndarray) -> tuple[float, float]:
        return kept_gallery_errors(scores, query_labels, gallery_labels, keep, cfg.rejection_far)

    for rate in cfg.rejection_rates:
        reject = rejection_mask(uncertainty, rate)
        ret, ver = errors(~reject)
        out["rejection/uncertainty"] |= {f"retrieval_error@{rate:g}": ret, f"verification_error@{rate:g}": ver}
        n_reject = int(reject.sum())
        rand = []
        for _ in range(cfg.random_repeats if n_reject else 1):
            keep = np.ones(len(uncertainty), bool)
            keep[rng.choice(len(uncertainty), n_reject, replace=False)] = False
            rand.append(errors(keep))
        r_ret, r_ver = np.mean(rand, axis=0)
        out["rejection/random"] |= {
            f"retrieval_error@{rate:g}": float(r_ret),
            f"verification_error@{rate:g}": float(r_ver),
        }
    return out


def _student_embeddings(path: Path, dataset: Path, order: list[str], batch: int) -> tuple[EmbeddingModel, np.ndarray]:
    student = load_embedding_model(path)
    emb = embed_split(student, dataset, "test", batch)
    return student, emb.embeddings[rows_of(emb.ids, order, f"{dataset}: test split as embedded by {path}")]


def evaluate(inputs: EvalInputs, cfg: EvaluateConfig, out_dir: str | Path, batch_size: int = 256,
             seed: int = 0) -> Metrics:
    """Compute all configurations; write query.parquet, metrics.json, results.md and plots."""
    from cmce.report import write_reports  # matplotlib is only needed here

    out_dir = Path(out_dir)
    check_replaceable(out_dir, EVAL_FILES)  # before the work, not only when swapping the result in
    query_model = load_embedding_model(inputs.query_model)
    gmeta = read_metadata(inputs.gallery)
    if gmeta.get("kind") != "gallery":
        raise TableError(f"{inputs.gallery}: not a gallery file (kind={gmeta.get('kind')!r})")
    if gmeta["query_model_sha256"] != query_model.sha256:
        raise TableError(
            f"{inputs.gallery}: gallery was transformed for query model {gmeta['query_model_sha256'][:12]}, "
            f"not {query_model.sha256[:12]} ({inputs.query_model})"
        )
    members = gmeta["members"]
    # orchestrators may hand over collected lists in any order: match files to members by content hash
    by_gallery = {}
    member_shas = {m["sha256"] for m in members}
    for t_path in inputs.transformations:
        t = load_transformation(t_path, query_sha256=query_model.sha256)
        if t.gallery_model_sha256 not in member_shas:
            # e.g. a stale file of a model since dropped from the config, left in a --transform-dir
            log.warning("%s: transformation for %s is not for a member of %s; skipped", t_path, t.gallery_model,
                        inputs.gallery)
            continue
        by_gallery[t.gallery_model_sha256] = t
    missing = [m["name"] for m in members if m["sha256"] not in by_gallery]
    if missing:
        raise ValueError(f"{inputs.gallery}: need one transformation per gallery member; missing for {missing}")
    table = read_table(inputs.gallery)
    g_ids = string_column(table, "id", str(inputs.gallery))
    check_unique_ids(g_ids, str(inputs.gallery))
    g_labels = int_column(table, "label", str(inputs.gallery))
    stored = embedding_column(table, "embedding", str(inputs.gallery), query_model.embedding_dim)
    uncertainty = float_column(table, "uncertainty", str(inputs.gallery))

    q = embed_split(query_model, inputs.dataset, "test", batch_size)
    self_cols = self_columns(q.ids, g_ids)
    if (self_cols < 0).all():
        log.warning("no query image is in the gallery: evaluating without self-exclusion")
    domains = cross_domains(inputs.dataset, q.ids, g_ids)
    # gallery-side arrays in gallery order; for symmetric configurations queries are the gallery rows
    g_self = np.arange(len(g_ids))
    metrics: Metrics = {}

    def run(name: str, queries: np.ndarray, gallery: np.ndarray, cols: np.ndarray, qlab: np.ndarray,
            symmetric: bool = False) -> np.ndarray:
        pairs = None if domains is None else (domains[1] if symmetric else domains[0], domains[1])
        scores = score_matrix(queries, gallery, cols, pairs)
        metrics[name] = retrieval_metrics(scores, qlab, g_labels, cfg.recall_k, cfg.far)
        log.info("%-28s R@1 %.4f  MAP@R %.4f", name, metrics[name]["R@1"], metrics[name]["MAP@R"])
        return scores

    q_rows = self_cols >= 0
    q_as_gallery = np.zeros((len(g_ids), q.embeddings.shape[1]), np.float32)
    q_as_gallery[self_cols[q_rows]] = q.embeddings[q_rows]
    if q_rows.all() and len(q.ids) == len(g_ids):
        run("sym_query", q.embeddings, q_as_gallery, self_cols, q.labels)

    transformed = []
    for member in members:
        name = member["name"]
        t = by_gallery[member["sha256"]]
        raw = embedding_column(table, f"raw_{name}", str(inputs.gallery), t.in_dim)
        run(f"sym_gallery/{name}", raw, raw, g_self, g_labels, symmetric=True)
        transformed.append(t.apply(raw))
        run(f"asym/{name}", q.embeddings, transformed[-1], self_cols, q.labels)
    running = np.zeros_like(transformed[0], dtype=np.float64)
    scores = None
    for n, member_emb in enumerate(transformed, start=1):
        running += member_emb
        scores = run(f"asym_ensemble/{n}", q.embeddings, running.astype(np.float32), self_cols, q.labels)
    if not np.allclose(normalize(running.astype(np.float32)), stored, atol=1e-4):
        raise TableError(f"{inputs.gallery}: stored ensemble embedding does not match its members' transformations")
    member_by_sha = {m["sha256"]: m["name"] for m in members}
    students = {}
    for s_path in inputs.kd_students:
        student, s_emb = _student_embeddings(Path(s_path), inputs.dataset, q.ids, batch_size)
        teacher = student.meta.get("teacher_sha256")
        if teacher not in member_by_sha:
            log.warning("%s: KD student's teacher %s is not a member of %s; skipped", s_path, str(teacher)[:12],
                        inputs.gallery)
            continue
        students[member_by_sha[teacher]] = s_emb
    for member in members:  # report in member order whatever order the students came in
        if member["name"] in students:
            raw = embedding_column(table, f"raw_{member['name']}", str(inputs.gallery))
            run(f"kd/{member['name']}", students[member["name"]], raw, self_cols, q.labels)

    assert scores is not None
    metrics |= rejection_curves(scores, q.labels, g_labels, uncertainty, cfg, seed)
    versions = {
        "query_model": {"name": query_model.name, "sha256": query_model.sha256},
        "members": members,
        "gallery": origin(inputs.gallery),  # the s3:// URI when the gallery was downloaded
    }
    # written only now, so a failure above leaves a previous evaluation in out_dir untouched; and as
    # one folder swapped in whole, so a kill never leaves new metrics next to an old query.parquet
    with atomic_dir(out_dir, EVAL_FILES) as tmp:
        write_table(
            with_metadata(
                pa.table({"id": q.ids, "label": q.labels.astype(np.int32), "embedding": embedding_array(q.embeddings)}),
                {"kind": "query", "split": "test",
                 "query_model": {"name": query_model.name, "sha256": query_model.sha256}},
            ),
            tmp / "query.parquet",
        )
        write_reports(metrics, versions, tmp)
    return metrics
