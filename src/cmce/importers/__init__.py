"""Importers, one per data source; each returns cmce.data.schema.RawImages and is reached through
cmce.data.sources.SOURCES by its data.source name.

digits                 sklearn's 8x8 digits (tests)
fashion_mnist          Fashion-MNIST from Debian's package
imagefolder            a local ImageFolder tree
emoji                  the cross-vendor emoji set (npm emoji-datasource-google / -twitter, pinned)
retrieval_benchmarks   CUB-200-2011, Cars196 and Stanford Online Products from a local copy
"""

from __future__ import annotations

from pathlib import Path

from cmce.data.schema import DataError


def resolved(path: Path) -> Path:
    """`path` with its links followed; a loop of links named (Python 3.11's resolve() raised a bare RuntimeError)."""
    try:
        return path.resolve()
    except RuntimeError:
        raise DataError(f"{path}: a loop of symbolic links; remove it") from None


def inside_root(path: Path, real_root: Path, root_name: str = "ImageFolder root") -> None:
    """Refuse a file or class folder that resolves outside the data root (a symlink pointing elsewhere, or
    a listed path with `..`): the dataset must be exactly what lies under data.path."""
    real = resolved(path)
    if not real.is_relative_to(real_root):
        raise DataError(f"{path}: resolves to {real}, outside the {root_name} {real_root}")
