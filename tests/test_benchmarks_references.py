from dataclasses import replace

import numpy as np

from benchmarks.references import REJECTED, Served, classifier_target_metrics, label_orderings, served
from cmce.checkpoint import load_embedding_model
from cmce.config import load_config
from cmce.ensemble import normalize
from cmce.evaluate import rejection_curves
from tests.conftest import SMOKE


def test_served_scores_reproduce_the_runs_ensemble_metrics(smoke_run):
    from cmce.metrics import retrieval_metrics

    lay, metrics = smoke_run
    s = served(lay)
    m = retrieval_metrics(s.scores, s.query_labels, s.gallery_labels, ks=[1], fars=[1e-3], with_map=False)
    ens = metrics[f"asym_ensemble/{len(lay.gallery_names)}"]
    assert abs(m["R@1"] - ens["R@1"]) < 1e-9 and abs(m["TAR@FAR=0.001"] - ens["TAR@FAR=0.001"]) < 1e-9


def test_classifier_target_is_the_query_models_cosine_classifier_accuracy(smoke_run):
    lay, _ = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    s = served(lay)
    m = classifier_target_metrics(cfg, lay, s)
    w = load_embedding_model(lay.model(cfg.query_model.name)).classifier.numpy()
    predicted = (normalize(s.query_embeddings) @ normalize(w).T).argmax(axis=1)
    # every gallery item of a class sits on one point, so the nearest item's class is the predicted class
    assert abs(m["R@1"] - (predicted == s.query_labels).mean()) < 1e-9


def test_uncertainty_row_matches_the_evaluation_and_label_orderings_find_the_bad_items(smoke_run):
    from benchmarks.references import rejection_references

    lay, metrics = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    s = served(lay)
    rows = rejection_references(cfg, s, cfg.seed)
    unc = metrics["rejection/uncertainty"]
    at = f"verification_error@{REJECTED:g}"
    assert abs(rows["nothing"][0] - unc["verification_error@0"]) < 1e-9
    assert abs(rows["uncertainty (the method)"][0] - unc[at]) < 1e-9
    # each label ordering is rejected exactly as the evaluation rejects by uncertainty
    ev = replace(cfg.evaluate, rejection_rates=[0.0, REJECTED])
    orderings = label_orderings(s, ev.rejection_far)
    assert orderings and set(orderings) < set(rows)
    for name, badness in orderings.items():
        curve = rejection_curves(s.scores, s.query_labels, s.gallery_labels, badness, ev, cfg.seed)
        assert abs(rows[name][0] - curve["rejection/uncertainty"][at]) < 1e-9, name
        assert abs(rows[name][1] - (rows["nothing"][0] - rows[name][0]) / rows["nothing"][0]) < 1e-12, name


def test_label_orderings_put_the_items_that_fail_verification_first():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 10)
    scores = np.where(labels[:, None] == labels[None, :], 0.8, 0.0) + rng.normal(0, 0.05, (200, 200))
    bad = np.arange(0, 200, 10)  # one item per class: low with its own class's queries, high with the next's
    for b in bad:
        own, other = labels == labels[b], labels == (labels[b] + 1) % 20
        scores[own, b] = rng.normal(0, 0.05, own.sum())
        scores[other, b] = 0.9
    np.fill_diagonal(scores, -np.inf)
    s = Served(scores, [str(i) for i in range(200)], np.zeros((200, 2)), labels, labels, np.zeros(200),
               np.arange(200), None)
    for name, badness in label_orderings(s, 1e-2).items():
        assert set(np.argsort(-badness)[: len(bad)]) == set(bad), name
