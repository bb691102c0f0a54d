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
  index                   the built index as served (when given): share indexed, neighbour recall
                          against exact search, R@1 (cmce.evaluate.index_checks)
  rejection/random        the same number of gallery items removed at random (mean of repeats; each repeat
                          removes the first items of one random order of the gallery, at every rate)
Scores are computed a block of queries at a time on this process's device (cmce.scores, cmce.metrics);
the query embeddings are computed once and shared by every configuration that searches with them.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from cmce import device as devices
from cmce.checkpoint import EmbeddingModel, load_embedding_model
from cmce.config import EvaluateConfig
from cmce.data.loader import split_source
from cmce.data.readers import dataset_info, read_domains
from cmce.embed import embed_split
from cmce.index import LoadedIndex, check_index_rows, load_index
from cmce.method import STORED_TOLERANCE, RunningEnsemble, normalize, rejection_mask
from cmce.metrics import Family, measure, retrieval_metrics
from cmce.scores import BLOCK_MB, InnerProducts, Scores
from cmce.storage import atomic_dir, check_replaceable, file_sha256, origin
from cmce.tables import (
    TableError,
    check_rows_are_split,
    check_unique_ids,
    embedding_array,
    embedding_column,
    float_column,
    id_rows,
    int_column,
    read_table,
    rows_of,
    served_gallery,
    shown_id,
    string_column,
    with_metadata,
    write_table,
)
from cmce.transform import load_transformation

log = logging.getLogger(__name__)
# what evaluate writes: query.parquet here, the rest by cmce.report.write_reports
EVAL_FILES = ("query.parquet", "metrics.json", "summary.json", "versions.json", "results.md", "recall.png",
              "recall.csv", "rejection.png", "rejection.csv")
INDEX_K = 10  # neighbours compared between the built index and exact search
Metrics = dict[str, dict[str, float]]


@dataclass
class EvalInputs:
    dataset: Path
    query_model: Path
    gallery: Path
    transformations: list[Path]  # one per gallery member, any order: matched by gallery model sha256
    kd_students: list[Path] = field(default_factory=list)  # any order: matched by their teacher's sha256
    index: Path | str | None = None  # the built index of this gallery (a folder or s3:// prefix): its checks


Domains = tuple[np.ndarray, np.ndarray]  # domain code of each query, of each gallery item


def self_columns(query_ids: list[str], gallery_ids: list[str]) -> np.ndarray:
    """For each query, the gallery column holding the same image (-1 if none): the pair left out."""
    return id_rows(gallery_ids, query_ids)


def cosine_scores(queries: np.ndarray, gallery: np.ndarray, self_cols: np.ndarray,
                  domains: Domains | None = None) -> InnerProducts:
    """Cosine scores of queries against the gallery, computed a block at a time on this process's device;
    the pair (query i, gallery self_cols[i]) is left out when self_cols[i] ≥ 0, and with `domains` every
    pair within one domain is."""
    return InnerProducts(normalize(queries, "query embeddings"), normalize(gallery, "gallery embeddings"), self_cols,
                         domains, devices.current())


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


def kept_gallery_errors(scores: Scores | np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                        keep: np.ndarray, far: float, block_mb: float = BLOCK_MB) -> tuple[float, float]:
    """(retrieval error 1 − R@1, verification error 1 − TAR@`far`) with only the `keep` gallery items indexed;
    the verification threshold is set on the kept gallery's impostor pairs. As for lone queries, a query whose
    every match was rejected leaves the R@1 denominator: the error is over the queries the kept gallery can answer."""
    m = measure(scores, query_labels, gallery_labels, ks=[1], fars=[], with_map=False,
                families=[Family.of([keep])], keep_far=far, block_mb=block_mb)
    kept = m.subsets[0][0]
    return 1.0 - kept.r1, 1.0 - kept.tar


def rejection_families(uncertainty: np.ndarray, cfg: EvaluateConfig, seed: int) -> tuple[list[float], list[Family]]:
    """The rejection rates in increasing order, and the kept galleries at those rates: first by uncertainty
    (the most uncertain rejected), then, per random repeat, the same numbers of items in one random order
    of the gallery (so each repeat's galleries nest, as the uncertainty ones do, and a whole curve is
    measured in one pass)."""
    rates = sorted(set(cfg.rejection_rates))
    if not rates:
        return [], []
    rejected = [rejection_mask(uncertainty, rate) for rate in rates]
    families = [Family.of([~r for r in rejected])]
    counts = [int(r.sum()) for r in rejected]
    rng = np.random.default_rng(seed)
    for _ in range(cfg.random_repeats if any(counts) else 1):
        order = rng.permutation(len(uncertainty))
        keeps = []
        for n in counts:
            keep = np.ones(len(uncertainty), bool)
            keep[order[:n]] = False
            keeps.append(keep)
        families.append(Family.of(keeps))
    return rates, families


def measure_with_rejection(scores: Scores | np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                           uncertainty: np.ndarray, cfg: EvaluateConfig, seed: int, with_metrics: bool = True,
                           ) -> tuple[dict[str, float], Metrics]:
    """One configuration's metrics (when `with_metrics`) and, from the same passes over its scores, error vs
    rejection rate under the retrieval (1 − R@1) and verification (1 − TAR@rejection_far) protocols, for
    rejection by uncertainty and at random (mean of the repeats), each with the share of queries left with no
    match in the kept gallery (`unanswerable@rate`; they leave the R@1 denominator, see metrics.Kept)."""
    rates, families = rejection_families(uncertainty, cfg, seed)
    ks, fars = (cfg.recall_k, cfg.far) if with_metrics else ([1], [])
    m = measure(scores, query_labels, gallery_labels, ks, fars, with_metrics, families, cfg.rejection_far,
                cfg.block_mb)
    out: Metrics = {"rejection/uncertainty": {}, "rejection/random": {}}
    for rate in cfg.rejection_rates:  # reported in the config's order
        i = rates.index(rate)
        by_uncertainty, randoms = m.subsets[0][i], [f[i] for f in m.subsets[1:]]
        r_ret, r_ver, r_lost = np.mean([(1.0 - k.r1, 1.0 - k.tar, k.unanswerable) for k in randoms], axis=0)
        for how, (ret, ver, lost) in (("uncertainty", (1.0 - by_uncertainty.r1, 1.0 - by_uncertainty.tar,
                                                       by_uncertainty.unanswerable)),
                                      ("random", (r_ret, r_ver, r_lost))):
            out[f"rejection/{how}"] |= {f"retrieval_error@{rate:g}": float(ret),
                                        f"verification_error@{rate:g}": float(ver),
                                        f"unanswerable@{rate:g}": float(lost)}
    return m.metrics, out


def rejection_curves(scores: Scores | np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                     uncertainty: np.ndarray, cfg: EvaluateConfig, seed: int) -> Metrics:
    """Error vs rejection rate (see measure_with_rejection) alone."""
    return measure_with_rejection(scores, query_labels, gallery_labels, uncertainty, cfg, seed, False)[1]


def _student_embeddings(student: EmbeddingModel, path: Path, dataset: Path, order: list[str], batch: int
                        ) -> np.ndarray:
    emb = embed_split(student, dataset, "test", batch)
    return emb.embeddings[rows_of(emb.ids, order, f"{dataset}: test split as embedded by {path}")]


@dataclass
class EvalData:
    """What every configuration is computed from, loaded and embedded once: the query model's test-split
    embeddings, the gallery's arrays, each member's raw and transformed embeddings, the KD students'."""

    query_ids: list[str]
    query_labels: np.ndarray
    queries: np.ndarray
    gallery_ids: list[str]
    gallery_labels: np.ndarray
    uncertainty: np.ndarray
    raw: dict[str, np.ndarray]  # per member, in ensemble order
    transformed: dict[str, np.ndarray]
    students: dict[str, np.ndarray]  # per member with a KD student: the student's embeddings of the queries
    self_cols: np.ndarray
    domains: Domains | None
    versions: dict
    gallery: np.ndarray | None = None  # the stored ensemble embeddings (exact search, for the index checks)
    index: LoadedIndex | None = None


def load_evaluation(inputs: EvalInputs, batch_size: int = 256, recall_k: Sequence[int] = ()) -> EvalData:
    """Read and check the inputs (`recall_k` against the gallery's size, once it is known to be a whole split),
    match transformations and students to members by content hash, embed the test split with the query model
    (once) and with the students, apply each T."""
    query_model = load_embedding_model(inputs.query_model)
    gmeta = served_gallery(inputs.gallery, query_model.sha256, inputs.query_model, "evaluate")
    members = gmeta["members"]
    # orchestrators may hand over collected lists in any order: match files to members by content hash
    by_gallery, given = {}, {}
    member_shas = {m["sha256"] for m in members}
    for t_path in inputs.transformations:
        t = load_transformation(t_path, query_sha256=query_model.sha256)
        if t.gallery_model_sha256 not in member_shas:
            # e.g. a stale file of a model since dropped from the config, left in a --transform-dir
            log.warning("%s: transformation for %s is not for a member of %s; skipped", t_path, t.gallery_model,
                        inputs.gallery)
            continue
        seen = by_gallery.get(t.gallery_model_sha256)
        if seen is not None and seen.sha256 != t.sha256:  # which one was meant? the last given silently won
            raise ValueError(f"{t_path}: a second, different transformation for gallery model {t.gallery_model} "
                             f"(another was given too); give one per gallery member")
        by_gallery[t.gallery_model_sha256] = t
        given[t.sha256] = t_path
    missing = [m["name"] for m in members if m["sha256"] not in by_gallery]
    if missing:
        raise ValueError(f"{inputs.gallery}: need one transformation per gallery member; missing for {missing}")
    for m in members:  # another fit of T for the same model: the stored ensemble was refused, naming no file
        if (t := by_gallery[m["sha256"]]).sha256 != m["transformation_sha256"]:
            raise ValueError(f"{given[t.sha256]}: transformation {t.sha256[:12]} of gallery model {m['name']}, but "
                             f"the gallery {inputs.gallery} was made with its transformation "
                             f"{m['transformation_sha256'][:12]}: give that one")
    table = read_table(inputs.gallery)
    g_ids = string_column(table, "id", str(inputs.gallery))
    check_unique_ids(g_ids, str(inputs.gallery))
    split = gmeta["split"]
    check_rows_are_split(g_ids, split_source(inputs.dataset, split), str(inputs.gallery),
                         f"the '{split}' split of {inputs.dataset}")
    # before the queries are embedded; they are the test split's images: from a gallery of that split, leave-one-out
    check_recall_k(recall_k, len(g_ids), str(inputs.gallery), own_image_left_out=split == "test",
                   own_domain_items=smallest_own_domain(inputs.dataset, split))
    raw, transformed = {}, {}
    ensemble = RunningEnsemble()
    for m in members:
        t = by_gallery[m["sha256"]]
        raw[m["name"]] = embedding_column(table, f"raw_{m['name']}", str(inputs.gallery), t.in_dim)
        transformed[m["name"]] = t.apply(raw[m["name"]])
        ensemble.add(transformed[m["name"]], f"{inputs.gallery}: column 'raw_{m['name']}' after its transformation")
    stored = embedding_column(table, "embedding", str(inputs.gallery), query_model.embedding_dim)
    if not np.allclose(ensemble.embedding, stored, atol=1e-4):
        raise TableError(f"{inputs.gallery}: stored ensemble embedding does not match its members' transformations")
    stored_unc = float_column(table, "uncertainty", str(inputs.gallery))
    off = np.abs(ensemble.uncertainty - stored_unc) > STORED_TOLERANCE * max(len(members), 1)
    if off.any():  # the rejection curves read it: an edited column rejected other items without a word
        first = shown_id(g_ids[int(np.flatnonzero(off)[0])])
        raise TableError(f"{inputs.gallery}: column 'uncertainty' of id {first} is "
                         "not the spread of its members' transformed embeddings")
    q = embed_split(query_model, inputs.dataset, "test", batch_size)
    g_labels = int_column(table, "label", str(inputs.gallery))
    if split == "test" and not np.array_equal(g_labels, q.labels):  # the same images: the same classes
        row = int(np.flatnonzero(g_labels != q.labels)[0])
        raise TableError(f"{inputs.gallery}: id {shown_id(g_ids[row])} has label {g_labels[row]}, the dataset "
                         f"{inputs.dataset} says {q.labels[row]}")
    self_cols = self_columns(q.ids, g_ids)
    if (self_cols < 0).all():
        log.warning("no query image is in the gallery: evaluating without self-exclusion")
    member_by_sha = {m["sha256"]: m["name"] for m in members}
    students, student_of = {}, {}
    for s_path in inputs.kd_students:
        student = load_embedding_model(s_path)
        teacher = student.meta.get("teacher_sha256")
        if teacher is None:  # a model given as a student: a wrong argument, not a stale file to skip
            raise ValueError(f"{s_path}: not a KD student (its checkpoint records no teacher)")
        if teacher not in member_by_sha:
            log.warning("%s: KD student's teacher %s is not a member of %s; skipped", s_path, str(teacher)[:12],
                        inputs.gallery)
            continue
        seen = student_of.get(teacher)
        if seen is not None and seen[1] != student.sha256:  # which one was meant? the last given silently won
            raise ValueError(f"{s_path}: a second, different KD student of gallery model {member_by_sha[teacher]} "
                             f"(also {seen[0]}); give one per gallery member")
        student_of[teacher] = (s_path, student.sha256)
        students[member_by_sha[teacher]] = _student_embeddings(student, Path(s_path), inputs.dataset, q.ids,
                                                               batch_size)
    versions = {
        "query_model": {"name": query_model.name, "sha256": query_model.sha256},
        "members": members,
        "gallery": origin(inputs.gallery),  # the s3:// URI when the gallery was downloaded
    }
    index = None
    if inputs.index is not None:
        index = load_index(inputs.index, query_model.sha256, query_dim=query_model.embedding_dim)
        if index.meta.get("gallery_sha256") != file_sha256(inputs.gallery):
            raise TableError(f"{inputs.index}: index was built from another gallery than {inputs.gallery}")
        # the checksums in its meta.json rewritten, edited files passed: the index metrics were of another index
        check_index_rows(index, g_ids, g_labels, stored, inputs.gallery, inputs.index)
        versions["index"] = {k: index.meta.get(k) for k in ("index_type", "reject_fraction", "gallery_sha256")}
    return EvalData(q.ids, q.labels, q.embeddings, g_ids, g_labels,
                    float_column(table, "uncertainty", str(inputs.gallery)), raw, transformed,
                    {m["name"]: students[m["name"]] for m in members if m["name"] in students},  # member order
                    self_cols, cross_domains(inputs.dataset, q.ids, g_ids), versions, stored, index)


def configuration_metrics(data: EvalData, cfg: EvaluateConfig, seed: int = 0) -> Metrics:
    """Every configuration's metrics from the arrays alone (see the module docstring), and the served
    ensemble's rejection curves, from the same passes over its scores."""
    metrics: Metrics = {}
    undefined: list[str] = []  # the first configuration whose every query was lone
    g_labels, domains = data.gallery_labels, data.domains

    def pairs(queries: np.ndarray, gallery: np.ndarray, cols: np.ndarray, symmetric: bool = False) -> InnerProducts:
        return cosine_scores(queries, gallery, cols,
                             None if domains is None else (domains[1] if symmetric else domains[0], domains[1]))

    def record(name: str, values: dict[str, float]) -> None:
        metrics[name] = values
        log.info("%-28s R@1 %.4f  MAP@R %.4f", name, values["R@1"], values["MAP@R"])
        if math.isnan(values["R@1"]) and not undefined:
            undefined.append(name)  # said once: a table of dashes, exit 0, said nothing (one test image a class)
            log.warning("%s: every query is lone (no gallery item of its class it may be matched with): R@K and "
                        "MAP@R are undefined; %s", name, "each class needs images from at least 2 domains (vendors)"
                        if domains is not None else "each class needs at least 2 test images (data.max_test_per_class)")

    def run(name: str, scores: InnerProducts, qlab: np.ndarray) -> None:
        record(name, retrieval_metrics(scores, qlab, g_labels, cfg.recall_k, cfg.far, block_mb=cfg.block_mb))

    # for symmetric configurations the queries are the gallery rows themselves
    q_rows = data.self_cols >= 0
    if q_rows.all() and len(data.query_ids) == len(data.gallery_ids):
        q_as_gallery = np.zeros((len(data.gallery_ids), data.queries.shape[1]), np.float32)
        q_as_gallery[data.self_cols] = data.queries
        run("sym_query", pairs(data.queries, q_as_gallery, data.self_cols), data.query_labels)
    g_self = np.arange(len(data.gallery_ids))
    for name, raw in data.raw.items():
        run(f"sym_gallery/{name}", pairs(raw, raw, g_self, symmetric=True), g_labels)
        run(f"asym/{name}", pairs(data.queries, data.transformed[name], data.self_cols), data.query_labels)
    ensemble = RunningEnsemble()
    curves: Metrics = {}
    for n, member_emb in enumerate(data.transformed.values(), start=1):
        ensemble.add(member_emb)
        scores = pairs(data.queries, ensemble.embedding, data.self_cols)
        if n < len(data.transformed):
            run(f"asym_ensemble/{n}", scores, data.query_labels)
        elif n < 2:  # one member: its uncertainty is 0 everywhere, and "the most uncertain" would be file order
            log.warning("one gallery member: no rejection by uncertainty is measured (it needs at least 2)")
            run(f"asym_ensemble/{n}", scores, data.query_labels)
        else:  # the served ensemble: its rejection curves come from the same passes over its scores
            values, curves = measure_with_rejection(scores, data.query_labels, g_labels, data.uncertainty, cfg, seed)
            record(f"asym_ensemble/{n}", values)
    for name, student in data.students.items():
        run(f"kd/{name}", pairs(student, data.raw[name], data.self_cols), data.query_labels)
    if data.index is not None:
        metrics["index"] = index_checks(data)
        log.info("built index: %s", metrics["index"])
    return metrics | curves


def _top_k(index: Any, ids: list[str], queries: np.ndarray, query_ids: list[str], k: int) -> list[list[str]]:
    """Each query's k nearest ids in `index` (rows of `ids`), its own image left out."""
    _, idx = index.search(np.ascontiguousarray(queries), k + 1)
    return [[ids[j] for j in row if j >= 0 and ids[j] != own][:k] for row, own in zip(idx, query_ids, strict=True)]


def index_checks(data: EvalData) -> dict[str, float]:
    """The built index searched as it is served, so its settings (rejected fraction, type, search parameters)
    show in a metric: the share of the gallery it holds; neighbour_recall@K, the mean share of each query's K
    nearest gallery items by exact search over the whole gallery that the index returns; and, unless queries
    must leave their own domain (cross_vendor), R@1 of its first result (own image and lone queries left out)."""
    assert data.index is not None and data.gallery is not None
    q = normalize(data.queries, "query embeddings")
    k = min(INDEX_K, len(data.gallery_ids) - 1)
    exact = faiss.IndexFlatIP(q.shape[1])
    exact.add(np.ascontiguousarray(normalize(data.gallery, "gallery embeddings")))
    want = _top_k(exact, data.gallery_ids, q, data.query_ids, k)
    got = _top_k(data.index.index, data.index.ids, q, data.query_ids, k)
    out = {"indexed": len(data.index.ids) / len(data.gallery_ids),
           f"neighbour_recall@{k}": float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want, got, strict=True)]))}
    if data.domains is None:  # lone queries left out, as in every configuration: a miss no index could avoid
        label = dict(zip(data.index.ids, data.index.labels.tolist(), strict=True))
        per_label = collections.Counter(label.values())
        hits = [bool(row) and label[row[0]] == y for row, y, q_id in zip(got, data.query_labels.tolist(),
                                                                         data.query_ids, strict=True)
                if per_label[y] > (label.get(q_id) == y)]  # another indexed item of its class than itself
        out["R@1"] = float(np.mean(hits)) if hits else float("nan")  # was 0.00 with every query lone
    return out


def write_evaluation(out_dir: Path, data: EvalData, metrics: Metrics, rejection_far: float | None = None) -> None:
    """query.parquet, metrics.json, versions.json, results.md and the plots, swapped into `out_dir` as one folder."""
    from cmce.report import write_reports  # matplotlib is only needed here

    # written last (see evaluate), so a failure while loading or computing leaves a previous evaluation in
    # out_dir untouched; and as one folder swapped in whole, so a kill never leaves new metrics next to an
    # old query.parquet
    with atomic_dir(out_dir, EVAL_FILES) as tmp:
        write_table(
            with_metadata(
                pa.table({"id": data.query_ids, "label": data.query_labels.astype(np.int32),
                          "embedding": embedding_array(data.queries)}),
                {"kind": "query", "split": "test", "query_model": data.versions["query_model"]},
            ),
            tmp / "query.parquet",
        )
        write_reports(metrics, data.versions, tmp, rejection_far)


def items_answered_from(gallery_items: int, *, own_image_left_out: bool, own_domain_items: int = 0) -> int:
    """The gallery items the best-placed query is ranked among: where the queries are the gallery's images
    (leave-one-out), each is answered from the others; under cross_vendor, from the other domains' items only
    (`own_domain_items`: the smallest domain's). An R@K with K at least this many cannot miss for any query (K = 11
    of 12 items scored 1.0 beside an R@1 of 0.33)."""
    return gallery_items - max(own_domain_items, int(own_image_left_out))


def smallest_own_domain(dataset: Path, split: str) -> int:
    """Under the cross_vendor protocol, the items of the split's smallest domain (all left out for a query of that
    domain, which is ranked among the most items); 0 under any other protocol."""
    if dataset_info(dataset).get("protocol") != "cross_vendor":
        return 0
    return min(collections.Counter(read_domains(dataset, split).values()).values(), default=0)


def check_recall_k(recall_k: Sequence[int], gallery_items: int, gallery: str, *, own_image_left_out: bool,
                   own_domain_items: int = 0) -> None:
    """R@K that cannot miss (K ≥ `items_answered_from`) is 1 for every query that has a match: a column that
    measures nothing, refused before the work (as the gate refuses such a metric)."""
    answered_from = items_answered_from(gallery_items, own_image_left_out=own_image_left_out,
                                        own_domain_items=own_domain_items)
    vacuous = [k for k in recall_k if k >= answered_from]
    if vacuous:
        shown = ", ".join(f"R@{k}" for k in vacuous)
        less = (f", less at least the {own_domain_items} items of a query's own domain (cross_vendor)"
                if own_domain_items else ", less each query's own image" if own_image_left_out else "")
        raise ValueError(f"evaluate.recall_k: {shown} is 1 for every query with a match on a gallery of "
                         f"{gallery_items} items{less} ({gallery}); give K below {answered_from}")


def evaluate(inputs: EvalInputs, cfg: EvaluateConfig, out_dir: str | Path, batch_size: int = 256,
             seed: int = 0) -> Metrics:
    """Load → every configuration's metrics → written reports; returns the metrics."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, EVAL_FILES)  # before the work, not only when swapping the result in
    data = load_evaluation(inputs, batch_size, cfg.recall_k)
    metrics = configuration_metrics(data, cfg, seed)
    write_evaluation(out_dir, data, metrics, cfg.rejection_far)
    return metrics
