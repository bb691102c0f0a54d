"""Rejection with something to reject: part of the gallery degraded (a reference beside the rejection target).

The target is stated on the benchmark's clean images, where every gallery item has the same quality. The
uncertainty is meant to flag items the gallery models cannot embed reliably (in the paper, poor face images).
Here a share DEGRADED of the test images is degraded on the gallery side only: downscaled SCALE× and back,
then given Gaussian noise. The queries stay clean. Each gallery model embeds the degraded split with its
fitted T (nothing is retrained), and the members are combined as served. Then 10 % of the gallery is rejected
by uncertainty, at random, by the label orderings, and by knowing which images were degraded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.references import REJECTED, operating_point_rows, operating_points, rejection_rows, served
from benchmarks.report import shown
from cmce import stages
from cmce.config import Config
from cmce.layout import RunLayout
from cmce.method import rejection_mask
from cmce.metrics import retrieval_metrics

DEGRADED = 0.1  # the same share as the rejection target rejects
SCALE = 4  # downscale factor: fine detail is gone, the coarse shape stays
NOISE = 0.1  # std of the added Gaussian noise, on a [0, 1] intensity scale


def degrade(png: bytes, rng: np.random.Generator) -> bytes:
    """The image downscaled SCALE× and back (bilinear), with Gaussian noise on its colour channels; PNG out."""
    img = Image.open(io.BytesIO(png))
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA")
    w, h = img.size
    img = img.resize((max(1, w // SCALE), max(1, h // SCALE)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    x = np.asarray(img).astype(np.float32) / 255
    colour = x[..., :3] if x.ndim == 3 else x  # alpha (emoji) stays: composited on white when loaded
    colour += rng.normal(0.0, NOISE, colour.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def degraded_copy(dataset: Path, out: Path, fraction: float, seed: int) -> set[str]:
    """Write `dataset` with `fraction` of its test images degraded (ids, labels, metadata unchanged); return
    the degraded ids."""
    table = pq.read_table(dataset)
    test = np.flatnonzero(np.asarray(table.column("split").to_pylist()) == "test")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(test, size=round(fraction * len(test)), replace=False))
    images = table.column("image").to_pylist()
    for n in chosen:
        images[n] = degrade(images[n], rng)
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, "image", pa.array(images, pa.binary())), out)
    ids = table.column("id").to_pylist()
    return {ids[n] for n in chosen}


def degraded_gallery(cfg: Config, lay: RunLayout, root: Path) -> tuple[Path, set[str]]:
    """The run's gallery rebuilt from the degraded test images by its own models and transformations."""
    root.mkdir(parents=True, exist_ok=True)
    dataset = root / "dataset.parquet"
    degraded = degraded_copy(lay.dataset, dataset, DEGRADED, cfg.seed)
    q = lay.model(cfg.query_model.name)
    members = [root / f"member_{g}.parquet" for g in lay.gallery_names]
    for g, member in zip(lay.gallery_names, members, strict=True):
        stages.embed_member(stages.MemberInputs(dataset, q, lay.model(g), lay.transformation(g), cfg.batch_size),
                            stages.GalleryOutputs(member))
    stages.combine(stages.FilesInputs(members), stages.GalleryOutputs(root / "gallery.parquet"))
    return root / "gallery.parquet", degraded


def degraded_table(cfg: Config, lay: RunLayout, config_run: dict, root: Path) -> list[str]:
    """The ensemble searched with clean queries over the clean and the degraded gallery (built under `root`);
    then 10 % of the degraded gallery rejected by each ordering, and how many degraded items the uncertainty
    puts first."""
    n = len(cfg.gallery_models)
    gallery, degraded = degraded_gallery(cfg, lay, root)
    s = served(lay, gallery)
    is_degraded = np.isin(s.gallery_ids, list(degraded))
    m = retrieval_metrics(s.scores, s.query_labels, s.gallery_labels, cfg.evaluate.recall_k, cfg.evaluate.far)
    caught = is_degraded[rejection_mask(s.uncertainty, REJECTED)].mean()
    rows = [f"| gallery (asym_ensemble/{n}, clean queries) | R@1 / MAP@R / TAR@FAR=0.001 |", "|---|---|",
            f"| clean | {shown(config_run[f'asym_ensemble/{n}'])} |",
            f"| {100 * DEGRADED:g} % degraded | {shown(m)} |", "",
            f"Degraded items among the {100 * REJECTED:g} % most uncertain: {100 * caught:.1f} % "
            f"(at random: {100 * is_degraded.mean():.1f} %).", ""]
    points = operating_points(cfg, s, {"the degraded items (known)": is_degraded * 1.0})
    return (rows + rejection_rows(cfg, points[cfg.evaluate.rejection_far], "the degraded gallery")
            + ["", "The same at other operating points (error and relative drops in %):", ""]
            + operating_point_rows([points]))
