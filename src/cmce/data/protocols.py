"""Protocols: which images are train and which test (heldout images, disjoint classes, cross-vendor)."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from cmce.config import DataConfig
from cmce.data.schema import DataError, RawImages

log = logging.getLogger(__name__)


def disjoint_rule(raw: RawImages, cfg: DataConfig) -> str:
    """data.disjoint_by with `auto` resolved for this source."""
    if cfg.disjoint_by != "auto":
        return cfg.disjoint_by
    return "official" if raw.class_split is not None else "group" if raw.groups is not None else "first_half"


def cut_groups(groups: list[str], share: float, rng: np.random.Generator) -> set[str]:
    """Whole groups holding about `share` of the classes (`groups`: one group name per class): the
    groups shuffled and laid end to end, cut at that share; a group straddling the cut goes to the side
    holding most of it, so related classes never land on both sides."""
    sizes = Counter(groups)
    names = sorted(sizes)
    chosen, seen = set(), 0
    for i in rng.permutation(len(names)):
        if seen + sizes[names[i]] / 2 < len(groups) * share:
            chosen.add(names[i])
        seen += sizes[names[i]]
    return chosen


def train_classes(raw: RawImages, cfg: DataConfig, seed: int) -> np.ndarray:
    """Per class True for a train class, under data.disjoint_by; each side holds at least 2 classes (2 or 3 classes
    made a train split of one class, refused only by `train`, and a test of one class, where every match is right)."""
    train = _train_classes(raw, cfg, seed)
    sides = (int(train.sum()), int((~train).sum()))
    if min(sides) < 2:
        where = f" ({cfg.path})" if getattr(cfg, "path", None) else ""
        raise DataError(f"data.protocol={cfg.protocol}: data.source={cfg.source}{where} has {len(train)} classes, "
                        f"{sides[0]} for the train split and {sides[1]} for the test split; each needs at least 2")
    return train


def _train_classes(raw: RawImages, cfg: DataConfig, seed: int) -> np.ndarray:
    n = len(raw.classes)
    how = disjoint_rule(raw, cfg)
    rng = np.random.default_rng([seed, 1])  # its own stream: the heldout draws and caps stay as they were
    if how == "official":
        if raw.class_split is None:
            raise DataError(f"data.disjoint_by=official: data.source={cfg.source} has no official class split; "
                            "use first_half, random or group")
        return np.array([s == "train" for s in raw.class_split], dtype=bool)
    if how == "group":
        if raw.groups is None:
            raise DataError(f"data.disjoint_by=group: data.source={cfg.source} defines no class groups; "
                            "use first_half or random")
        if len(set(raw.groups)) < 2:
            raise DataError(f"data.disjoint_by=group: data.source={cfg.source} has a single class group")
        train_groups = cut_groups(raw.groups, 0.5, rng)
        return np.array([g in train_groups for g in raw.groups], dtype=bool)
    if n < 2:
        where = f" ({cfg.path})" if getattr(cfg, "path", None) else ""
        raise DataError(f"data.protocol=disjoint needs at least 2 classes; data.source={cfg.source}{where} has {n}")
    train = np.zeros(n, dtype=bool)
    # first_half: the deep-metric-learning standard for sources without an official class split
    train[rng.permutation(n)[: n // 2] if how == "random" else np.arange(n // 2)] = True
    return train


def single_vendor_classes(labels: np.ndarray, domains: np.ndarray, rows: np.ndarray) -> list[int]:
    """Classes of the `rows` (a boolean mask) drawn there by a single vendor: under cross_vendor their
    queries have no countable match, so the protocol drops them."""
    return [c for c in np.unique(labels[rows]) if len(set(domains[rows & (labels == c)])) < 2]


def assign_splits(raw: RawImages, cfg: DataConfig, seed: int) -> np.ndarray:
    """Return the split of every image ("train", "test" or "" for dropped) under the protocol."""
    rng = np.random.default_rng(seed)
    labels = raw.labels
    n_classes = len(raw.classes)
    split = np.full(len(labels), "", dtype=object)
    if cfg.protocol == "cross_vendor" and (raw.domains is None or len(set(raw.domains)) < 2):
        raise DataError(f"data.source={cfg.source}: the cross_vendor protocol needs images from at least two "
                        "vendors (the emoji source has them); use heldout or disjoint")
    if cfg.protocol in ("disjoint", "cross_vendor"):
        train_class = train_classes(raw, cfg, seed)
        split[:] = np.where(train_class[labels], "train", "test")
    elif raw.official_split is not None:
        split[:] = raw.official_split
        if not set(labels[split == "train"]) & set(labels[split == "test"]):  # written as heldout, said nowhere
            log.warning("data.source=%s: its own train/test split shares no class: read under data.protocol=heldout, "
                        "the test classes are never trained on; data.protocol=disjoint names it so", cfg.source)
    else:
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            # at least one image stays for training: at 0.75 a class of 2 went wholly to test, never trained on
            n_test = min(int(round(len(idx) * cfg.heldout_fraction)), len(idx) - 1) if len(idx) > 1 else 0
            split[idx[:n_test]] = "test"
            split[idx[n_test:]] = "train"
    for part, cap in (("train", cfg.max_train_per_class), ("test", cfg.max_test_per_class)):
        if cap is None:
            continue
        for c in range(n_classes):
            idx = np.flatnonzero((labels == c) & (split == part))
            if len(idx) > cap:
                split[rng.choice(idx, len(idx) - cap, replace=False)] = ""
    if cfg.protocol == "cross_vendor":
        # a test class drawn by one vendor only has no query with a countable match: drop it
        domains = np.asarray(raw.domains, dtype=object)
        test = split == "test"
        lone = single_vendor_classes(labels, domains, test)
        if lone:
            split[test & np.isin(labels, lone)] = ""
            log.warning("cross_vendor: %d test classes drawn by a single vendor dropped", len(lone))
    return split
