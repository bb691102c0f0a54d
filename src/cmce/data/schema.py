"""The dataset file's schema and what an importer hands over."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

DATASET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),
    ]
)
DOMAIN_FIELD = pa.field("domain", pa.string())  # optional column, see the package docstring


class DataError(ValueError):
    """Bad input data; the message names the file and the offending field or item."""


@dataclass
class RawImages:
    """What an importer returns: encoded images with labels, and what the source says about splitting them."""

    ids: list[str]
    labels: np.ndarray  # int
    classes: list[str]  # class_name of label i
    images: list[bytes]  # PNG bytes (or RGB/grey JPEG bytes as the source stores them)
    official_split: list[str] | None = None  # per image: the source's own train/test split of the same classes
    class_split: list[str] | None = None  # per class: the source's own class-disjoint train/test split
    groups: list[str] | None = None  # per class: related classes the disjoint split keeps on one side
    domains: list[str] | None = None  # per image: rendering domain (emoji vendor)

    def __post_init__(self) -> None:
        n, c = len(self.ids), len(self.classes)
        for name, value, size in (("labels", self.labels, n), ("images", self.images, n),
                                  ("official_split", self.official_split, n), ("domains", self.domains, n),
                                  ("class_split", self.class_split, c), ("groups", self.groups, c)):
            if value is not None and len(value) != size:
                raise ValueError(f"RawImages.{name} has {len(value)} entries, expected {size}")
