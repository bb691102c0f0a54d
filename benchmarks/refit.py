"""Refitting every transformation on a run's frozen models: the unit the tuning and the ablations repeat."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cmce import stages
from cmce.config import Config
from cmce.evaluate import EvalInputs, evaluate
from cmce.layout import RunLayout


def trained(cfg: Config, dataset: Path, name: str, out: Path) -> Path:
    stages.train_model(cfg, stages.TrainInputs(dataset, name), stages.ModelOutputs(out))
    return out


def fitted(cfg: Config, dataset: Path, query: Path, gallery_model: Path, out: Path) -> Path:
    stages.fit_transform(cfg, stages.FitInputs(dataset, query, gallery_model), stages.FitOutputs(out))
    return out


def embedded(dataset: Path, query: Path, gallery_model: Path, transform: Path, out: Path, batch_size: int) -> Path:
    stages.embed_member(stages.MemberInputs(dataset, query, gallery_model, transform, batch_size),
                        stages.GalleryOutputs(out))
    return out


def combined(members: list[Path], out: Path) -> Path:
    stages.combine(stages.FilesInputs(members), stages.GalleryOutputs(out))
    return out


def refit(cfg: Config, lay: RunLayout, root: Path, transform: dict | None = None, query: Path | None = None) -> dict:
    """Refit every transformation on seed 0's frozen gallery models (with other transformation settings,
    or for another query model), rebuild the gallery and evaluate every configuration."""
    alt = replace(cfg, transform=replace(cfg.transform, **(transform or {})))
    q = query or lay.model(cfg.query_model.name)
    members, transforms = [], []
    for g in lay.gallery_names:
        t = fitted(alt, lay.dataset, q, lay.model(g), root / f"T_{g}.pt")
        members.append(embedded(lay.dataset, q, lay.model(g), t, root / f"member_{g}.parquet", cfg.batch_size))
        transforms.append(t)
    gallery = combined(members, root / "gallery.parquet")
    return evaluate(EvalInputs(lay.dataset, q, gallery, transforms), alt.evaluate, root / "eval", alt.batch_size,
                    alt.seed)

