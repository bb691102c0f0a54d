"""Refitting every transformation on a run's frozen models: the unit the tuning and the ablations repeat."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cmce.config import Config
from cmce.evaluate import EvalInputs
from cmce.steps import RunLayout, step_combine, step_embed_member, step_evaluate, step_fit_transform


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

