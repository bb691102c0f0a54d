"""Dataset files: a source imported under its protocol, and validation datasets carved from a train split."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cmce.config import DataConfig
from cmce.data.codec import pixel_limit
from cmce.data.protocols import assign_splits, cut_groups, disjoint_rule, single_vendor_classes
from cmce.data.readers import dataset_info, open_dataset
from cmce.data.schema import DATASET_SCHEMA, DOMAIN_FIELD, DataError
from cmce.data.sources import get_source
from cmce.storage import atomic_path
from cmce.tables import CHECKSUMS, check_unique_ids

log = logging.getLogger(__name__)


def prepare_dataset(cfg: DataConfig, out: str | Path, seed: int = 0, raw_dir: str | Path | None = None,
                    check_counts: Callable[[dict[str, int]], None] | None = None) -> Path:
    """Import the configured source (from `raw_dir` when given, see fetch_source), apply the protocol
    and write the dataset Parquet atomically; `check_counts` sees the split sizes first and may refuse them."""
    with pixel_limit(cfg.max_image_pixels):
        raw = get_source(cfg.source).load(cfg, Path(raw_dir) if raw_dir is not None else None)
    outside = np.flatnonzero((raw.labels < 0) | (raw.labels >= len(raw.classes)))
    if len(outside):  # assign_splits walks labels 0..n-1 only: such an image would vanish without a word
        i = int(outside[0])
        where = raw_dir or cfg.path or f"data.source={cfg.source}"
        raise DataError(f"{where} (id {raw.ids[i]}): label {int(raw.labels[i])} is "
                        f"not one of the {len(raw.classes)} classes (0..{len(raw.classes) - 1})")
    split = assign_splits(raw, cfg, seed)
    keep = np.flatnonzero(split != "")
    for part in ("train", "test"):
        if not np.any(split[keep] == part):
            where = raw_dir or (cfg.path if cfg.source == "imagefolder" and cfg.path else f"data.source={cfg.source}")
            # every setting that decides the split, so that the one at fault is named
            settings = [f"data.max_{part}_per_class={getattr(cfg, f'max_{part}_per_class')}"]
            if cfg.protocol == "heldout":
                settings.insert(0, f"data.heldout_fraction={cfg.heldout_fraction}")
            raise DataError(f"{where}: the {cfg.protocol} protocol with {', '.join(settings)} leaves the '{part}' "
                            "split empty")
    counts = {p: int(np.sum(split[keep] == p)) for p in ("train", "test")}
    if check_counts is not None:
        check_counts(counts)
    labels = raw.labels[keep].astype(np.int32)
    columns = {
        "id": [raw.ids[i] for i in keep],
        "label": labels,
        "class_name": [raw.classes[label] for label in labels],
        "split": list(split[keep]),
        "image": [raw.images[i] for i in keep],
    }
    schema = DATASET_SCHEMA
    meta = {"source": cfg.source, "protocol": cfg.protocol, "classes": raw.classes, "seed": seed}
    if cfg.protocol != "heldout":
        meta["disjoint_by"] = disjoint_rule(raw, cfg)
    if raw.groups is not None:
        meta["class_groups"] = raw.groups  # per class, so a validation split can keep groups whole too
    if raw.domains is not None:
        columns["domain"] = [raw.domains[i] for i in keep]
        schema = schema.append(DOMAIN_FIELD)
        meta["domains"] = sorted(set(columns["domain"]))
    table = pa.table(columns, schema=schema)
    table = table.replace_schema_metadata({"cmce": json.dumps(meta)})
    check_unique_ids(table.column("id").to_pylist(), str(out))
    out = Path(out)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=4096, **CHECKSUMS)
    log.info("wrote %s: %s images (%s)", out, len(keep), counts)
    return out


def carve_validation(dataset: str | Path, out: str | Path, fraction: float, seed: int) -> Path:
    """A tuning dataset made of a dataset file's train split alone, so settings chosen on it never saw
    a test image: `fraction` of the train split becomes the new 'test' split and the rest stays
    'train'; the original test split is left out. Under heldout that is `fraction` of each class's
    train images; under disjoint / cross_vendor it is `fraction` of the train classes, whole (drawn by
    `seed`; whole class groups when the test classes were split by group), and under cross_vendor a
    carved class drawn by a single vendor is dropped, as in assign_splits. Written atomically; schema
    and metadata are kept, with a "validation" entry added."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    pf = open_dataset(dataset)
    info = dataset_info(dataset)
    table = pf.read()
    train = table.filter(pc.equal(table.column("split"), "train"))
    labels = train.column("label").to_numpy()
    rng = np.random.default_rng([seed, 2])
    carved = np.zeros(len(labels), dtype=bool)
    classes = np.unique(labels)
    if info.get("protocol", "heldout") == "heldout":
        by = "images of each class"
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            carved[idx[: int(round(len(idx) * fraction))]] = True
    else:
        by = "whole classes"
        if info.get("class_groups") and info.get("disjoint_by") == "group":  # near-duplicates stay on one side
            by = "whole class groups"
            groups = [info["class_groups"][c] for c in classes]
            chosen = cut_groups(groups, fraction, rng)
            picked = classes[[g in chosen for g in groups]]
        else:
            picked = rng.choice(classes, int(round(len(classes) * fraction)), replace=False)
        if not 1 <= len(picked) < len(classes):
            raise DataError(f"{dataset}: {len(classes)} train classes cannot give a validation share of {fraction}")
        carved = np.isin(labels, picked)
        if info.get("protocol") == "cross_vendor":
            domains = np.asarray(train.column("domain").to_pylist(), dtype=object)
            keep = ~(carved & np.isin(labels, single_vendor_classes(labels, domains, carved)))
            train, labels, carved = train.filter(pa.array(keep)), labels[keep], carved[keep]
    if carved.all() or not carved.any():
        raise DataError(f"{dataset}: a validation share of {fraction} leaves an empty split")
    split = pa.array(np.where(carved, "test", "train"), pa.string())
    train = train.set_column(train.schema.get_field_index("split"), "split", split)
    info["validation"] = {"fraction": fraction, "seed": seed, "by": by, "carved_from": str(dataset)}
    train = train.replace_schema_metadata({**(table.schema.metadata or {}), b"cmce": json.dumps(info)})
    out = Path(out)
    with atomic_path(out) as tmp:
        pq.write_table(train, tmp, row_group_size=4096, **CHECKSUMS)
    log.info("wrote %s: validation dataset, %d train / %d test images", out, int((~carved).sum()), int(carved.sum()))
    return out
