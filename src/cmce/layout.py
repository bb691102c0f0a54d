"""Where artifacts live: the folder layout of a `cmce run`, the per-model file names an orchestrator hands
around, and the members bundle (gallery models with their transformations, in ensemble order)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cmce.config import Config
from cmce.storage import file_sha256
from cmce.transform import load_transformation


@dataclass
class RunLayout:
    """Where `cmce run` puts each artifact under the output directory."""

    root: Path
    gallery_names: list[str] = field(default_factory=list)

    @property
    def dataset(self) -> Path:
        return self.root / "data" / "dataset.parquet"

    def model(self, name: str) -> Path:
        return self.root / "models" / f"{name}.pt"

    def kd_student(self, gallery_name: str) -> Path:
        return self.root / "models" / f"kd_{gallery_name}.pt"

    @property
    def transforms_dir(self) -> Path:
        return self.root / "transforms"

    def transformation(self, name: str) -> Path:
        return self.transforms_dir / f"{name}.pt"

    def train_embeddings(self, name: str) -> Path:
        return self.root / "embeddings" / "train" / f"{name}.parquet"

    @property
    def members_dir(self) -> Path:
        return self.root / "embeddings" / "gallery"

    def member(self, name: str) -> Path:
        return self.members_dir / f"{name}.parquet"

    @property
    def gallery(self) -> Path:
        return self.root / "gallery.parquet"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    # the files that say a folder of the run is complete, the innermost first: its index (read by `cmce serve` while
    # a rerun replaces it), then the run (its report the last thing written)
    COMPLETION_MARKERS = ("index/meta.json", "eval/metrics.json")

    def written_folders(self) -> tuple[Path, ...]:
        """The folders `cmce run` writes files into by name (data.path must lie outside each)."""
        return (self.dataset.parent, self.model("x").parent, self.transforms_dir, self.members_dir.parent, self.index,
                self.eval_dir)


def member_paths(cfg: Config, members_dir: Path) -> list[Path]:
    """Per-model embedding files named after the gallery models, in config (ensemble) order."""
    return [members_dir / f"{m.name}.parquet" for m in cfg.gallery_models]


def pair_transformations(gallery_models: list[Path], transformations: list[Path]) -> list[Path]:
    """The transformation of each gallery model, in the models' order, matched by the model's sha256
    (orchestrators may hand both lists over in different orders)."""
    by_sha = {load_transformation(t).gallery_model_sha256: t for t in transformations}
    out = []
    for m in gallery_models:
        sha = file_sha256(m)
        if sha not in by_sha:
            raise ValueError(f"{m}: no transformation among {[str(t) for t in transformations]} was fitted for it")
        out.append(by_sha[sha])
    return out


def write_member_bundle(out: Path, names: list[str], models: list[Path], transformations: list[Path]) -> None:
    """Gallery models (in ensemble order, named `names`) and their transformations (any order) copied into one
    new folder as <i>_<name>.pt and <i>_<name>.transform.pt, for orchestrator tasks that need every member."""
    out.mkdir(parents=True)
    for i, (name, model, transform) in enumerate(zip(names, models, pair_transformations(models, transformations),
                                                     strict=True)):
        shutil.copyfile(model, out / f"{i}_{name}.pt")
        shutil.copyfile(transform, out / f"{i}_{name}.transform.pt")


def member_bundle(folder: Path) -> list[tuple[str, Path, Path]]:
    """The members of a `write_member_bundle` folder in ensemble order (by index, so 10 follows 9):
    (name, model, transformation)."""
    models = [p for p in folder.glob("*.pt") if not p.name.endswith(".transform.pt")]
    indexed = sorted((int(p.name.split("_", 1)[0]), p.name.split("_", 1)[1].removesuffix(".pt"), p) for p in models)
    return [(name, model, model.with_suffix(".transform.pt")) for _, name, model in indexed]


def bundled_model(folder: Path, name: str) -> Path:
    """The checkpoint of gallery model `name` in a members bundle."""
    found = [model for member, model, _ in member_bundle(folder) if member == name]
    if len(found) != 1:
        raise FileNotFoundError(f"{folder}: no gallery model named {name!r} in the members bundle")
    return found[0]


def bundle_in_config_order(cfg: Config, out: Path, models: list[Path], transformations: list[Path]) -> None:
    """A members bundle of the config's gallery models, whatever order `models` came in (each is named by
    its checkpoint's own record of its name)."""
    from cmce.checkpoint import load_embedding_model

    paths = {load_embedding_model(m).name: m for m in models}
    missing = [spec.name for spec in cfg.gallery_models if spec.name not in paths]
    if missing:
        raise FileNotFoundError(f"no checkpoint of gallery model(s) {missing} among {[str(m) for m in models]}")
    names = [spec.name for spec in cfg.gallery_models]
    write_member_bundle(out, names, [paths[n] for n in names], transformations)
