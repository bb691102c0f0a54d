"""Size and compute of every registry architecture: parameters, float32 weight size and FLOPs per image at
the given input sizes (torch.utils.flop_counter, a multiply-add counts 2 FLOPs), as embedding models
(backbone + linear head to --dim).

    python -m benchmarks.model_size [--config params.yaml] [--sizes 28 96 128 224] [--dim 128] [--no-write]

Widths come from the config's model of that architecture, else --width (ImageNet backbones have a fixed
width). Channels from the config's data section. Prints a Markdown table and writes it to BENCHMARKS.md (in place
of its previous section).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from benchmarks.args import config_or_error, int_in
from benchmarks.report import ROOT, write_section
from cmce.config import DataConfig, ModelSpec, range_of
from cmce.models import EmbeddingNet, arch_names, count_flops, count_parameters, is_pretrained
from cmce.pretrained import ImageNetBackbone, MissingPretrainedError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    # the ranges a config allows: data.image_size, a model's embedding_dim and width
    ap.add_argument("--sizes", type=int_in(range_of(DataConfig, "image_size")), nargs="+", default=[28, 96, 128, 224])
    ap.add_argument("--dim", type=int_in(range_of(ModelSpec, "embedding_dim")), default=128)
    ap.add_argument("--width", type=int_in(range_of(ModelSpec, "width")), default=16)
    ap.add_argument("--no-write", action="store_true", help="print only, do not write BENCHMARKS.md")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, or the parser's error (exit 2)."""
    args = ap.parse_args(argv)
    twice = sorted({s for s in args.sizes if args.sizes.count(s) > 1})
    if twice:
        ap.error(f"--sizes: {', '.join(map(str, twice))} given twice")
    return args


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = parse_args(ap, argv)
    started = time.perf_counter()
    cfg = config_or_error(ap, args.config)
    ch = cfg.data.channels
    widths = {}
    for m in reversed(cfg.all_models()):  # the first model of an architecture wins
        widths[m.arch] = m.width
    sizes = " | ".join(f"MFLOPs @{s}px" for s in args.sizes)
    rows = [f"| architecture | init | width | parameters | weights (MB, fp32) | {sizes} |",
            "|---|---|---|---|---|" + "---|" * len(args.sizes)]
    for arch in arch_names():
        width = widths.get(arch, args.width)
        try:
            # weights do not change size or FLOPs: build without reading the ImageNet files
            net = EmbeddingNet(arch, ch, args.dim, width, load_pretrained=False)
        except MissingPretrainedError:
            rows.append(f"| {arch} | needs the `pretrained` extra |" + " |" * (3 + len(args.sizes)))
            continue
        params = count_parameters(net)
        flops = " | ".join(f"{count_flops(net, ch, s, s) / 1e6:.1f}" for s in args.sizes)
        fixed = "fixed" if isinstance(net.backbone, ImageNetBackbone) else str(width)
        init = "ImageNet" if is_pretrained(arch) else "random"
        rows.append(f"| {arch} | {init} | {fixed} | {params:,} | {params * 4 / 2**20:.1f} | {flops} |")
    body = [
        f"Embedding models ({ch} input channel(s), {args.dim}-d embedding head). ImageNet backbones repeat "
        "greyscale to RGB and upsample inputs below 64 px to 64 px, so their cost at 28 px is their cost at 64 px.",
        "",
        *rows,
    ]
    write_section("Model size and FLOPs per architecture", " ".join(["python -m benchmarks.model_size", *(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write")]), body,
        time.perf_counter() - started, write=not args.no_write)


if __name__ == "__main__":
    main()
