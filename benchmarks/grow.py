"""A finished benchmark run grown by more gallery members, without retraining the ones it has.

On emoji a gallery model with its transformation and KD student costs several minutes per seed, so an
ensemble of N + 2 measured from scratch repeats the N already measured. Training is deterministic for a given
config and seed (each model depends on its own spec, the dataset and the train settings, never on the other
members), so a run of the grown config would make those N members again bit for bit; here they are copied
instead, after checking that the finished run was made by the same config.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

from benchmarks.finished_run import check_run, recorded_members
from cmce import stages
from cmce.checkpoint import load_embedding_model
from cmce.config import Config
from cmce.layout import RunLayout
from cmce.stages import run_all
from cmce.storage import file_sha256

log = logging.getLogger("bench")


def reusable_members(cfg: Config, src: Path) -> list[str]:
    """The gallery members of the finished run `src`, which must be the first ones of the config (name and
    architecture, in order), trained and fitted as the config says (`check_run`)."""
    if Path(cfg.output_dir).resolve() == src.resolve():
        raise ValueError(f"{src}: the run to grow from is the output folder; write the grown run elsewhere")
    recorded = recorded_members(src)
    configured = [(m.name, m.arch) for m in cfg.gallery_models]
    if recorded != configured[:len(recorded)]:
        raise ValueError(f"{RunLayout(src).eval_dir / 'versions.json'}: the run's gallery members {recorded} are "
                         f"not the first members of the config's {configured}; list the run's members first, in its "
                         "order")
    kept = cfg.gallery_models[:len(recorded)]
    check_run(replace(cfg, gallery_models=kept), RunLayout(src, [m.name for m in kept]))
    return [m.name for m in kept]


def grow_run(cfg: Config, src: Path, kept: list[str] | None = None) -> dict:
    """Every configuration of `cfg`, whose first gallery members (and query model) are taken from the
    finished run `src` made by the same config; the other members are trained, fitted and embedded under
    cfg.output_dir, then the gallery, index and evaluation are made for all of them. `kept`: what
    `reusable_members(cfg, src)` returned, when the caller has already checked the run (it loads every model)."""
    stages.check_run_folder(cfg)  # before the dataset and the kept files are written there (run_all checks it late)
    kept = reusable_members(cfg, src) if kept is None else kept
    old, new = RunLayout(src, kept), RunLayout(Path(cfg.output_dir), [m.name for m in cfg.gallery_models])
    stages.prepare_data(cfg, stages.PrepareInputs(), stages.DatasetOutputs(new.dataset))
    if file_sha256(new.dataset) != file_sha256(old.dataset):
        raise ValueError(f"{old.dataset}: not the dataset the config prepares ({new.dataset}); pass the "
                         "--config, --set and seeds the run was made with")
    q = cfg.query_model.name
    files = [(old.model(q), new.model(q))]
    for g in kept:
        files += [(old.model(g), new.model(g)), (old.transformation(g), new.transformation(g)),
                  (old.train_embeddings(g), new.train_embeddings(g)), (old.member(g), new.member(g))]
        if cfg.kd.enabled:
            files.append((old.kd_student(g), new.kd_student(g)))
    missing = [str(a) for a, _ in files if not a.exists()]
    if missing:
        raise ValueError(f"{src} is not a finished run: missing {', '.join(missing)}")
    for g in kept if cfg.kd.enabled else []:
        if load_embedding_model(old.kd_student(g)).meta.get("teacher_sha256") != file_sha256(old.model(g)):
            raise ValueError(f"{old.kd_student(g)}: not the KD student of {old.model(g)}")
    for a, b in files:
        b.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a, b)
    log.info("kept from %s: %s and %s; training %s", src, q, ", ".join(kept),
             ", ".join(m.name for m in cfg.gallery_models[len(kept):]) or "nothing")
    return run_all(cfg, prepare=False, keep={q, *kept})
