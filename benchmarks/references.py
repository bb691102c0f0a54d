"""What a finished run's query model permits, measured with the test labels: references, not methods.

Two galleries the transformation loss aims at, searched with the run's query embeddings:
  alignment target  each gallery image embedded by the query model itself (the ‖·‖² term's target): sym_query
  CE target         each gallery item placed on its class's query-classifier weight n(W_q[y]) (the CE term's
                    target); only where the test classes are the classifier's (the heldout protocol)
and rejection of 10 % of the gallery ordered with the labels, beside uncertainty and random rejection:
  lowest mean genuine score        the items the query model's same-class queries score lowest
  most false minus true accepts    at the unrejected gallery's threshold for the rejection FAR
Neither ordering is proven optimal; they show how much any gallery-side rejection could plausibly lower the
verification error on this data.

The same rejection at several operating points (OPERATING_FARS): rejecting 10 % of the gallery removes at most
about 10 % of the genuine pairs, so it can lower a large error (a weak operating point) only by a little,
whatever the ordering; the relative drop is only comparable with a setting of the same error.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.report import fmt, mean_std, shown
from cmce.checkpoint import load_embedding_model
from cmce.config import Config
from cmce.data.readers import dataset_info
from cmce.evaluate import cosine_scores, cross_domains, kept_gallery_errors, rejection_curves, self_columns
from cmce.layout import RunLayout
from cmce.method import rejection_mask
from cmce.metrics import far_threshold, retrieval_metrics
from cmce.tables import embedding_column, float_column, int_column, read_table, string_column

REJECTED = 0.1  # the share the rejection target is stated for
OPERATING_FARS = (1e-1, 1e-2, 1e-3, 1e-4)
LABELLED = "(test labels)"  # how the names of the label orderings end
TARGET_DROP = 0.15  # the relative drop the issue asks of rejection by uncertainty


@dataclass
class Served:
    """A run's asym_ensemble/N as evaluated: its whole cosine score matrix (excluded pairs -inf: research on
    test splits of a few thousand images) and what rejection needs."""

    scores: np.ndarray
    gallery_ids: list[str]
    query_embeddings: np.ndarray
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    uncertainty: np.ndarray
    self_cols: np.ndarray
    domains: tuple[np.ndarray, np.ndarray] | None


def served(lay: RunLayout, gallery: Path | None = None) -> Served:
    """Read the run's gallery (or `gallery`, of the same test ids) and its evaluation's query embeddings; score
    them as `cmce evaluate` does."""
    g_path, q_path = gallery or lay.gallery, lay.eval_dir / "query.parquet"
    g, q = read_table(g_path), read_table(q_path)
    g_ids, q_ids = string_column(g, "id", str(g_path)), string_column(q, "id", str(q_path))
    queries = embedding_column(q, "embedding", str(q_path))
    self_cols = self_columns(q_ids, g_ids)
    domains = cross_domains(lay.dataset, q_ids, g_ids)
    # a test split of a few thousand images: the whole matrix is small, and the label orderings need it
    scores = cosine_scores(queries, embedding_column(g, "embedding", str(g_path)), self_cols, domains)
    scores = scores.rows(np.arange(len(q_ids))).cpu().numpy()
    return Served(scores, g_ids, queries, int_column(q, "label", str(q_path)), int_column(g, "label", str(g_path)),
                  float_column(g, "uncertainty", str(g_path)), self_cols, domains)


def classifier_target_metrics(cfg: Config, lay: RunLayout, s: Served) -> dict[str, float] | None:
    """Every gallery item on n(W_q[label]); None when the test classes are not the classifier's."""
    if dataset_info(lay.dataset).get("protocol") != "heldout":
        return None
    w = load_embedding_model(lay.model(cfg.query_model.name)).classifier.numpy()
    if s.gallery_labels.max() >= len(w):
        return None
    scores = cosine_scores(s.query_embeddings, w[s.gallery_labels], s.self_cols, s.domains)
    return retrieval_metrics(scores, s.query_labels, s.gallery_labels, cfg.evaluate.recall_k, cfg.evaluate.far)


def label_orderings(s: Served, far: float) -> dict[str, np.ndarray]:
    """Badness of each gallery item (higher is rejected first) computed with the test labels."""
    allowed = np.isfinite(s.scores)
    same = (s.query_labels[:, None] == s.gallery_labels[None, :]) & allowed
    genuine_sum = np.where(same, s.scores, 0.0).sum(axis=0)
    n_genuine = same.sum(axis=0)
    mean_genuine = np.divide(genuine_sum, n_genuine, out=np.zeros_like(genuine_sum), where=n_genuine > 0)
    threshold = far_threshold(s.scores[allowed & ~same], far)
    accepted = s.scores > threshold
    true_accepts = (accepted & same).sum(axis=0)
    false_accepts = (accepted & allowed & ~same).sum(axis=0)
    return {f"lowest mean genuine score {LABELLED}": -mean_genuine,
            f"most false minus true accepts at FAR={far:g} {LABELLED}": (false_accepts - true_accepts).astype(float)}


def rejection_references(cfg: Config, s: Served, seed: int,
                         known: dict[str, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Verification error with 10 % of the gallery rejected per ordering: (error, relative drop vs none;
    NaN when nothing fails). Nothing, random and uncertainty by `rejection_curves` over the rates 0 and 10 %
    (the run's seed and random repeats), the label orderings and any `known` badness by the error function
    it uses."""
    ev = replace(cfg.evaluate, rejection_rates=[0.0, REJECTED])
    curves = rejection_curves(s.scores, s.query_labels, s.gallery_labels, s.uncertainty, ev, seed)
    at = f"verification_error@{REJECTED:g}"
    base = curves["rejection/uncertainty"]["verification_error@0"]
    errors = {"nothing": base, "at random": curves["rejection/random"][at],
              "uncertainty (the method)": curves["rejection/uncertainty"][at]}
    for name, badness in (label_orderings(s, ev.rejection_far) | (known or {})).items():
        keep = ~rejection_mask(badness, REJECTED)
        errors[name] = kept_gallery_errors(s.scores, s.query_labels, s.gallery_labels, keep, ev.rejection_far)[1]
    return {name: (err, (base - err) / base if base else float("nan")) for name, err in errors.items()}


def references_table(cfg: Config, lay: RunLayout, config_run: dict, s: Served,
                     rejection: dict[str, tuple[float, float]]) -> list[str]:
    """The two loss targets beside the fitted ensemble (`s`: the run's served gallery), then `rejection` (the
    run's `rejection_references` at the rejection FAR) as a table."""
    n = len(cfg.gallery_models)
    target = classifier_target_metrics(cfg, lay, s)
    rows = ["| gallery side, searched with the query model | R@1 / MAP@R / TAR@FAR=0.001 |", "|---|---|",
            f"| alignment target: the query model's own embedding (sym_query) | {shown(config_run['sym_query'])} |",
            "| CE target: each item on its class's query-classifier weight (test labels) | "
            + (shown(target) if target else "n/a: the test classes are not the classifier's") + " |",
            f"| the fitted transformations (asym_ensemble/{n}) | {shown(config_run[f'asym_ensemble/{n}'])} |", ""]
    return rows + rejection_rows(cfg, rejection, "the gallery")


def rejection_rows(cfg: Config, rejection: dict[str, tuple[float, float]], gallery: str) -> list[str]:
    """`rejection_references` (at the rejection FAR) as a table: one row per ordering."""
    rows = [f"| {100 * REJECTED:g} % of {gallery} rejected by | verification error (1 − TAR@FAR="
            f"{cfg.evaluate.rejection_far:g}) | relative drop |", "|---|---|---|"]
    for name, (err, drop) in rejection.items():
        rows.append(f"| {name} | {100 * err:.2f} | {'—' if name == 'nothing' else f'{100 * drop:.2f} %'} |")
    return rows


OperatingPoints = dict[float, dict[str, tuple[float, float]]]


def operating_points(cfg: Config, s: Served, known: dict[str, np.ndarray] | None = None,
                     fars: tuple[float, ...] = OPERATING_FARS) -> OperatingPoints:
    """`rejection_references` at each FAR in `fars` and at the rejection FAR, loosest first (the run's seed)."""
    return {far: rejection_references(replace(cfg, evaluate=replace(cfg.evaluate, rejection_far=far)), s, cfg.seed,
                                      known)
            for far in sorted({*fars, cfg.evaluate.rejection_far}, reverse=True)}


def operating_point_rows(per_seed: list[OperatingPoints]) -> list[str]:
    """`operating_points` of one or more seeds as mean ± std: per FAR the error with nothing rejected, the relative
    drop of each ordering (the label orderings as their best), and whether uncertainty's drop reaches TARGET_DROP
    beyond the spread of random rejection's."""
    first = per_seed[0][next(iter(per_seed[0]))]
    own = ["uncertainty (the method)", "at random"] + [k for k in first if k not in
                                                       ("nothing", "uncertainty (the method)", "at random")
                                                       and not k.endswith(LABELLED)]
    rows = ["| FAR | verification error, nothing rejected | " + " | ".join(f"relative drop: {k}" for k in own)
            + f" | relative drop: best ordering that knows the labels | uncertainty ≥ {100 * TARGET_DROP:g} % "
            "beyond random's spread |", "|---" * (len(own) + 4) + "|"]
    for far in per_seed[0]:
        refs = [seed[far] for seed in per_seed]
        drops = {k: [r[k][1] for r in refs] for k in own}
        best = [max(d for k, (_, d) in r.items() if k.endswith(LABELLED)) for r in refs]
        (unc, unc_sd), (rnd, rnd_sd) = mean_std(drops["uncertainty (the method)"]), mean_std(drops["at random"])
        met = unc >= TARGET_DROP and unc - rnd > unc_sd + rnd_sd
        rows.append(f"| {far:g} | {fmt([r['nothing'][0] for r in refs])} | "
                    + " | ".join(f"{fmt(drops[k])} %" for k in own) + f" | {fmt(best)} % | "
                    + ("yes" if met else "no") + (" (one seed)" if len(refs) == 1 else "") + " |")
    return rows
