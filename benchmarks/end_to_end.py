"""The whole method end to end on one device: every model, transformation and KD student, the gallery
embedding and the full evaluation (`cmce run`'s steps in one process), with the wall time of each stage.

    python -m benchmarks.end_to_end [--config configs/scale.yaml] [--images 60000] [--classes 3000]
                                    [--device auto] [--out runs/end_to_end] [--no-write]

The data is synthetic so that any machine can make it at any size without a download: per class a random
smooth template (7×7 noise upsampled), per image that template shifted by up to 2 pixels, rescaled and
noised, stored as PNGs like `prepare-data` stores them; the first half of the classes train, the second
half are the test split (the class-disjoint protocol). configs/scale.yaml is the issue's GPU configuration:
a 37k-parameter query model, 4 gallery models of 0.26–1.6M parameters, their KD students, 20 epochs,
batch 512. Writes its section of BENCHMARKS.md (one current section per device type, replaced).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.args import config_or_error, config_override, device_or_error, int_in, positive_int
from benchmarks.report import ROOT, config_shown, write_section
from cmce import device as devices
from cmce.data.schema import DATASET_SCHEMA
from cmce.storage import atomic_path


def synthetic_disjoint_dataset(out: Path, images: int, classes: int, size: int, seed: int = 0) -> Path:
    """`images` grey PNGs of `size` px in `classes` classes (as equal as the division allows); classes
    below classes/2 are the train split, the rest the test split."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (classes, 7, 7), dtype=np.uint8)
    labels = np.arange(images) % classes
    rows = {"id": [], "label": [], "class_name": [], "split": [], "image": []}
    for i, label in enumerate(labels):
        base = np.asarray(Image.fromarray(templates[label]).resize((size + 4, size + 4), Image.Resampling.BILINEAR),
                          np.float32)
        dy, dx = rng.integers(0, 5, 2)
        img = base[dy:dy + size, dx:dx + size] * rng.uniform(0.7, 1.1) + rng.normal(0, 12, (size, size))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
        rows["id"].append(f"c{label:05d}_{i:07d}")
        rows["label"].append(int(label))
        rows["class_name"].append(f"class {label}")
        rows["split"].append("train" if label < classes // 2 else "test")
        rows["image"].append(buf.getvalue())
    meta = {"source": "synthetic", "protocol": "disjoint", "classes": [f"class {c}" for c in range(classes)],
            "seed": seed, "disjoint_by": "first_half"}
    table = pa.table(rows, schema=DATASET_SCHEMA).replace_schema_metadata({"cmce": json.dumps(meta)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=4096)
    return out


class StageClock(logging.Handler):
    """Times the stages of a run from the log lines the steps already write."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.started = time.perf_counter()
        self.marks: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if record.name in ("cmce.embed", "cmce.transform", "cmce.train", "cmce.evaluate", "cmce.index") and (
                msg.startswith("wrote ") or ": final loss" in msg or " epoch " in msg or "R@1" in msg):
            self.marks.append((time.perf_counter() - self.started, f"{record.name}: {msg[:90]}"))


def last_epoch_or_other(line: str) -> bool:
    """Of the per-epoch training lines, only each model's last."""
    m = re.search(r" epoch (\d+)/(\d+) ", line)
    return m is None or m[1] == m[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "scale.yaml"))
    p.add_argument("--set", action="append", default=[], type=config_override, metavar="KEY=VALUE",
                   help="config override")
    p.add_argument("--images", type=positive_int, default=60_000)
    # the class-disjoint split needs at least 2 classes on each side (cmce.data.protocols)
    p.add_argument("--classes", type=int_in("[4, inf)"), default=3_000)
    p.add_argument("--device", choices=devices.CHOICES, default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "end_to_end"))
    p.add_argument("--no-write", action="store_true", help="print only, do not write BENCHMARKS.md")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, or the parser's error (exit 2) for flags that do not fit together."""
    args = p.parse_args(argv)
    if args.images < 2 * args.classes:  # leave-one-out: a query needs another image of its class
        p.error(f"--images {args.images} is less than two a class (--classes {args.classes})")
    out = Path(args.out)
    if out.is_dir() and (left := next(out.rglob("*.resume"), None)):  # training would resume: its epochs untimed
        p.error(f"--out {args.out}: holds the resume state of an interrupted run ({left.relative_to(out)}); the "
                "epochs it kept would not be timed: remove it, or give another folder")
    return args


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    from cmce.layout import RunLayout
    from cmce.stages import check_run_folder, run_all

    cfg = config_or_error(p, args.config, {"output_dir": args.out, "device": args.device}, args.set,
                         flags={"output_dir": "--out", "device": "--device"})
    device = device_or_error(p, cfg.device)
    try:
        check_run_folder(cfg)  # before the synthetic dataset is written into it
    except ValueError as err:
        p.error(f"--out {args.out}: {err}")
    lay = RunLayout(Path(args.out))
    started = time.perf_counter()
    synthetic_disjoint_dataset(lay.dataset, args.images, args.classes, cfg.data.image_size)
    made = time.perf_counter() - started
    clock = StageClock()
    for name in ("cmce.embed", "cmce.transform", "cmce.train", "cmce.evaluate", "cmce.index"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(clock)
    started = time.perf_counter()
    metrics = run_all(cfg, prepare=False)
    wall = time.perf_counter() - started
    n = len(cfg.gallery_models)
    sets = "".join(f" --set {shlex.quote(s)}" for s in args.set)
    body = [f"Config `{config_shown(args.config)}`{sets}: {args.images:,} "
            f"synthetic {cfg.data.image_size}-px grey images in {args.classes:,} classes (class-disjoint: half "
            f"train, half test), {n} gallery models, KD {'on' if cfg.kd.enabled else 'off'}, "
            f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}; device {devices.describe(device)}.", "",
            f"**Every model, transformation, KD student, the gallery embedding and the full evaluation: {wall:.0f} s** "
            f"(making the dataset, not counted: {made:.0f} s). asym_ensemble/{n} R@1 "
            f"{100 * metrics[f'asym_ensemble/{n}']['R@1']:.2f}, sym_query R@1 {100 * metrics['sym_query']['R@1']:.2f}.",
            "", "| seconds from the start | stage (the step's own log line) |", "|---|---|"]
    body += [f"| {t:.1f} | {what.replace('|', '/')} |" for t, what in clock.marks if last_epoch_or_other(what)]
    command = "python -m benchmarks.end_to_end" + "".join(
        f" --{k} {v}" for k, v in vars(args).items() if k in ("images", "classes", "device") and v != p.get_default(k))
    command += "" if args.config == p.get_default("config") else f" --config {config_shown(args.config)}"
    command += "".join(f" --set {shlex.quote(s)}" for s in args.set)
    if args.no_write:
        sys.stdout.write("\n".join(body) + "\n")
    else:
        write_section(f"End to end ({device.type})", command, body, wall + made)


if __name__ == "__main__":
    main()
