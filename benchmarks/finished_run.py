"""A finished run of `benchmarks.method` checked against the config said to have made it, before a benchmark
builds on it (`benchmarks.levers` refits its transformations, `benchmarks.grow` adds gallery members)."""

from __future__ import annotations

import json
from pathlib import Path

from cmce.checkpoint import load_embedding_model
from cmce.config import Config
from cmce.layout import RunLayout
from cmce.transform import load_transformation


def recorded_members(root: Path) -> list[tuple[str, str]]:
    """The gallery members (name, architecture), in ensemble order, that the finished run under `root` evaluated."""
    versions = RunLayout(root).eval_dir / "versions.json"
    if not versions.exists():
        raise ValueError(f"{root} is not a finished run: missing {versions}")
    return [(m["name"], m["arch"]) for m in json.loads(versions.read_text())["members"]]


def check_run(cfg: Config, lay: RunLayout) -> None:
    """A finished run of this config: its dataset, models, transformations and evaluation exist, its recorded
    gallery members are the config's (name and architecture, in order), its models were trained with the
    config's seeds and epochs, and its transformations fitted with the config's shape and epochs."""
    needed = [lay.dataset, lay.model(cfg.query_model.name), *(lay.model(g) for g in lay.gallery_names),
              *(lay.transformation(g) for g in lay.gallery_names),
              lay.eval_dir / "metrics.json", lay.eval_dir / "versions.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise ValueError(f"{lay.root} is not a finished run: missing {', '.join(missing)}")
    recorded = recorded_members(lay.root)
    configured = [(m.name, m.arch) for m in cfg.gallery_models]
    if recorded != configured:
        raise ValueError(f"{lay.eval_dir / 'versions.json'}: the run's gallery members {recorded} are not the "
                         f"config's {configured}; pass the --config and --set the run was made with")
    for spec in [cfg.query_model, *cfg.gallery_models]:
        model = load_embedding_model(lay.model(spec.name))
        trained = (model.meta.get("seed"), len(model.meta.get("history", [])))
        if trained != (spec.seed, spec.epochs or cfg.train.epochs):
            raise ValueError(f"{lay.model(spec.name)}: trained with (seed, epochs) = {trained}, the config says "
                             f"{(spec.seed, spec.epochs or cfg.train.epochs)}; pass the --config, --set and seed "
                             "the run was made with")
    wanted = (cfg.transform.hidden_dim, cfg.transform.depth, cfg.transform.epochs)
    for g in lay.gallery_names:
        t = load_transformation(lay.transformation(g))
        if (t.hidden_dim, t.depth, len(t.history)) != wanted:
            raise ValueError(f"{lay.transformation(g)}: fitted with (hidden_dim, depth, epochs) = "
                             f"{(t.hidden_dim, t.depth, len(t.history))}, the config says {wanted}; pass the "
                             "--config and --set the run was made with")
