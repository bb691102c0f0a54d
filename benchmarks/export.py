"""The query model for the edge: ONNX file size and CPU latency per image, onnxruntime vs torch, at batch 1 and
batch 64 (median of repeats), and the max |difference| of their raw embeddings, per architecture.

    python -m benchmarks.export [--config params.yaml] [--query-model CKPT] [--archs query_cnn mobilenet ...]
                                [--repeats 30] [--threads 1]

Each architecture is built at the config's image size and channels (its width and embedding dimension from the
config's model of that architecture, else the query model's), with random weights: size and latency do not
depend on training. --query-model measures that checkpoint instead. torch runs float32 in eval mode under
no_grad with torch's thread count; onnxruntime (CPU provider) gets the same number of threads.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.args import config_or_error, non_negative_int, one_line, positive_int
from benchmarks.report import LOG_FORMAT, ROOT, config_shown, write_section
from cmce.checkpoint import EmbeddingModel, load_embedding_model
from cmce.export import OnnxQueryModel, RawPixels, to_onnx
from cmce.models import EmbeddingNet, arch_names
from cmce.pretrained import MissingPretrainedError

BATCHES = (1, 64)


def median_ms_per_image(fn, images, repeats: int) -> float:
    fn(images)  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times) / len(images)


def random_model(arch: str, cfg) -> EmbeddingModel:
    spec = next((m for m in cfg.all_models() if m.arch == arch), cfg.query_model)
    torch.manual_seed(0)
    net = EmbeddingNet(arch, cfg.data.channels, spec.embedding_dim, spec.width, load_pretrained=False).eval()
    return EmbeddingModel(f"bench_{arch}", arch, net, torch.zeros(1, spec.embedding_dim), 16.0, cfg.data.channels,
                          cfg.data.image_size, spec.embedding_dim)


def measure(model: EmbeddingModel, work: Path, repeats: int) -> str:
    import onnx

    path = work / f"{model.arch}.onnx"
    onnx.save(to_onnx(model), str(path))
    session = OnnxQueryModel(path, threads=torch.get_num_threads())
    wrapped = RawPixels(model.net).eval()
    gen = torch.Generator().manual_seed(0)
    shape = (max(BATCHES), model.in_channels, model.image_size, model.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        diff = float(np.abs(wrapped(images).numpy() - session.embed(images.numpy())).max())

        def run_torch(x):
            return wrapped(x)

        cells = []
        for b in BATCHES:
            t = median_ms_per_image(run_torch, images[:b], repeats)
            o = median_ms_per_image(session.embed, images[:b].numpy(), repeats)
            cells.append(f"{t:.3f} | {o:.3f} | {t / o:.2f}")
    params = sum(p.numel() for p in model.net.parameters())
    return (f"| {model.arch} | {model.image_size} px × {model.in_channels} | {params:,} | "
            f"{path.stat().st_size / 1024:.1f} | {' | '.join(cells)} | {diff:.1e} |")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--query-model", default=None, help="a query checkpoint to measure (default: random weights)")
    ap.add_argument("--archs", nargs="+", choices=arch_names(), default=None, metavar="ARCH",
                    help="architectures (default: all in the registry)")
    ap.add_argument("--repeats", type=positive_int, default=30)
    ap.add_argument("--threads", type=non_negative_int, default=0,
                    help="threads for both torch and onnxruntime (default 0: torch's own count); 1 is steadier on a "
                         "shared machine")
    ap.add_argument("--no-write", action="store_true", help="print the section only")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, or the parser's error (exit 2)."""
    args = ap.parse_args(argv)
    twice = sorted({a for a in args.archs or [] if args.archs.count(a) > 1})
    if twice:
        ap.error(f"--archs: {', '.join(twice)} given twice")
    return args


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = parse_args(ap, argv)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_or_error(ap, args.config)
    rows = ["| architecture | input | parameters | ONNX (KiB) | torch ms/img @1 | onnxruntime ms/img @1 | "
            "speed-up @1 | torch ms/img @64 | onnxruntime ms/img @64 | speed-up @64 | max abs diff |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    try:  # a missing or broken checkpoint was a CheckpointError traceback
        query = load_embedding_model(args.query_model) if args.query_model else None
    except (ValueError, OSError) as err:
        ap.error(f"--query-model {args.query_model}: {one_line(err)}")
    with tempfile.TemporaryDirectory() as tmp:
        if query is not None:
            rows.append(measure(query, Path(tmp), args.repeats))
        else:
            for arch in args.archs or arch_names():
                try:
                    model = random_model(arch, cfg)
                except MissingPretrainedError:
                    rows.append(f"| {arch} | needs the `pretrained` extra |" + " |" * 9)
                    continue
                rows.append(measure(model, Path(tmp), args.repeats))
                logging.getLogger("benchmarks.export").warning("measured %s", arch)
    body = [
        "Per image, median of the repeats, CPU; torch float32 eval under no_grad vs onnxruntime's CPU provider on "
        f"the same {torch.get_num_threads()} thread(s). The graph takes uint8 pixels and scales them itself; max abs "
        "diff: of the raw embeddings of the same 64 random images. ONNX size is the one file a phone ships.",
        "",
        *rows,
    ]
    command = ["python -m benchmarks.export", *(argv if argv is not None else sys.argv[1:])]
    if args.config != str(ROOT / "params.yaml"):
        command = [c if c != args.config else config_shown(args.config) for c in command]
    write_section("ONNX query model: size and CPU latency", " ".join(command), body, time.perf_counter() - started,
                  write=not args.no_write)


if __name__ == "__main__":
    main()
