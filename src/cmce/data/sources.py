"""The data-source registry: data.source names → importers (cmce.importers) and their fetchers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cmce.config import DataConfig
from cmce.data.schema import DataError, RawImages
from cmce.importers import retrieval_benchmarks
from cmce.importers.digits import fetch_digits, import_digits
from cmce.importers.emoji import fetch_emoji, import_emoji
from cmce.importers.fashion_mnist import fetch_fashion_mnist, import_fashion_mnist
from cmce.importers.imagefolder import import_imagefolder


@dataclass(frozen=True)
class Source:
    """One data.source: `load(cfg, raw_dir)` imports it (from `raw_dir`, a fetched copy, when given);
    `fetch(dest)` materialises a packaged source as raw files; `local` says where a local source is read from."""

    load: Callable[[DataConfig, Path | None], RawImages]
    fetch: Callable[[Path], Path] | None = None
    local: str = ""


def _need_path(cfg: DataConfig, what: str) -> Path:
    """data.path, absolute: a relative one is read from the working folder, and a message naming `../if/plain`
    left the user guessing from where (the config file's folder is a natural guess)."""
    if not cfg.path:
        raise DataError(f"data.path: data.source={cfg.source} needs {what}")
    return Path(cfg.path).absolute()


def _load_fashion(cfg: DataConfig, raw_dir: Path | None) -> RawImages:
    if raw_dir is not None:
        return import_fashion_mnist(raw_dir)
    if not cfg.path:
        raise DataError("data.path: Fashion-MNIST needs a folder for its IDX files")
    return import_fashion_mnist(fetch_fashion_mnist(Path(cfg.path).absolute()))


def _load_emoji(cfg: DataConfig, raw_dir: Path | None) -> RawImages:
    return import_emoji(raw_dir if raw_dir is not None else fetch_emoji(_need_path(cfg, "a folder for the packages")))


def _benchmark(name: str) -> Callable[[DataConfig, Path | None], RawImages]:
    def load(cfg: DataConfig, raw_dir: Path | None) -> RawImages:
        root = raw_dir if raw_dir is not None else _need_path(cfg, "the benchmark's folder")
        return getattr(retrieval_benchmarks, f"import_{name}")(root)

    return load


_LOCAL = "read from data.path (a local copy in the standard layout)"
SOURCES: dict[str, Source] = {
    "digits": Source(lambda cfg, raw_dir: import_digits(raw_dir), fetch_digits),
    "fashion_mnist": Source(_load_fashion, fetch_fashion_mnist),
    # --raw names the root in place of data.path, as for the benchmarks (it was ignored: data.path was read)
    "imagefolder": Source(lambda cfg, raw_dir: import_imagefolder(raw_dir or _need_path(cfg, "a root folder")),
                          local="an ImageFolder is read from data.path"),
    "emoji": Source(_load_emoji, fetch_emoji),
    "cub200": Source(_benchmark("cub200"), local=_LOCAL),
    "cars196": Source(_benchmark("cars196"), local=_LOCAL),
    "sop": Source(_benchmark("sop"), local=_LOCAL),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; valid names: {sorted(SOURCES)}")
    return SOURCES[name]


def fetch_source(cfg: DataConfig, dest: str | Path) -> Path:
    """Materialise the configured packaged source as raw files under `dest` (a DVC-trackable folder)."""
    src = get_source(cfg.source)
    if src.fetch is None:
        raise DataError(f"data.source={cfg.source!r}: {src.local}; there is nothing to fetch")
    return src.fetch(Path(dest))
