"""Gallery-side scale benchmarks: embedding throughput of the embed step vs a bare torch loop, peak
memory at two gallery sizes, Parquet throughput of gallery files vs pyarrow directly, and the cost of
the query side vs the whole gallery ensemble (parameters, FLOPs, CPU latency).

    python -m benchmarks.embedding [--config params.yaml] [--throughput-images 3000] [--small 10000]
                                   [--large 100000] [--repeats 9] [--workers 0,1] [--threads ALL,1]

Models are the config's architectures with random weights (speed does not depend on training); images
are synthetic smooth greyscale PNGs at the config's image size, stored like `prepare-data` stores them.
Prints Markdown tables and writes them, dated, to BENCHMARKS.md (in place of this benchmark's previous section).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from benchmarks.args import comma_list, config_or_error, non_negative_int, positive_int, thread_counts
from benchmarks.report import ROOT, config_shown, write_section
from cmce.checkpoint import EmbeddingModel, load_embedding_model, save_embedding_model
from cmce.config import ModelSpec
from cmce.data.codec import to_float
from cmce.data.readers import load_split
from cmce.data.schema import DATASET_SCHEMA
from cmce.embed import combine_members, embed_with_model, merge_shards
from cmce.models import EmbeddingNet, count_flops, count_parameters
from cmce.tables import embedding_column, read_table, write_table
from cmce.transform import Transformation, build_mlp, save_transformation


def synthetic_dataset(path: Path, n: int, size: int, seed: int = 0, row_group: int = 4096) -> Path:
    """n smooth random greyscale PNGs (upsampled 7x7 noise), streamed to Parquet in row groups."""
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, DATASET_SCHEMA) as writer:
        for start in range(0, n, row_group):
            m = min(row_group, n - start)
            blobs = []
            for low in rng.integers(0, 256, size=(m, 7, 7), dtype=np.uint8):
                buf = io.BytesIO()
                Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR).save(buf, "PNG")
                blobs.append(buf.getvalue())
            ids = [f"img{start + i:08d}" for i in range(m)]
            labels = [(start + i) % 10 for i in range(m)]
            writer.write_table(pa.table({"id": ids, "label": pa.array(labels, pa.int64()),
                                         "class_name": [str(c) for c in labels], "split": ["test"] * m,
                                         "image": blobs}, schema=DATASET_SCHEMA))
    return path


def random_model(spec: ModelSpec, channels: int, size: int, out: Path) -> Path:
    torch.manual_seed(spec.seed)
    net = EmbeddingNet(spec.arch, channels, spec.embedding_dim, spec.width).eval()
    model = EmbeddingModel(name=spec.name, arch=spec.arch, net=net, classifier=torch.randn(10, spec.embedding_dim),
                           scale=16.0, in_channels=channels, image_size=size, embedding_dim=spec.embedding_dim)
    save_embedding_model(model, out, spec.width)
    return out


def random_transformation(gallery: Path, query: Path, hidden: int, depth: int, out: Path) -> Path:
    g, q = load_embedding_model(gallery), load_embedding_model(query)
    mlp = build_mlp(g.embedding_dim, q.embedding_dim, hidden, depth).eval()
    save_transformation(Transformation(mlp, g.name, g.sha256, q.sha256, g.embedding_dim, q.embedding_dim,
                                       hidden, depth), out)
    return out


@torch.no_grad()  # as the step's embed_batch
def bare_loop(model: EmbeddingModel, images: torch.Tensor, batch: int) -> float:
    """Seconds for a plain forward loop over already-decoded tensors (the upper bound for the step)."""
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        model.net(to_float(images[i:i + batch]))
    return time.perf_counter() - started


def throughput(cfg, work: Path, n: int, repeats: int, workers: list[int], threads: list[int]) -> list[str]:
    """Each repeat times the bare loop and the step (every worker count) back to back, in alternating
    order, so a ratio compares runs seconds apart; the table gives medians of rates and of these paired
    ratios. Both sides are warmed up once first. Every
    torch thread count is measured separately: with fewer forward threads than cores, a decode worker
    gets a core of its own."""
    dataset = synthetic_dataset(work / f"data_{n}.parquet", n, cfg.data.image_size)
    q = random_model(cfg.query_model, cfg.data.channels, cfg.data.image_size, work / "query.pt")
    q_sha = load_embedding_model(q).sha256
    rows = ["| gallery model | torch threads | path | images/s (median) | vs bare loop (median of paired ratios) | "
            "paired ratios (min–max) |", "|---|---|---|---|---|---|"]
    default_threads = torch.get_num_threads()
    for spec in cfg.gallery_models:
        g = random_model(spec, cfg.data.channels, cfg.data.image_size, work / f"{spec.name}.pt")
        t = random_transformation(g, q, cfg.transform.hidden_dim, cfg.transform.depth, work / f"t_{spec.name}.pt")
        model = load_embedding_model(g)
        images = load_split(dataset, "test", cfg.data.channels, cfg.data.image_size).images
        member = work / f"member_{spec.name}.parquet"
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            # warm-up of both sides: the first call of each pays one-off costs (kernel primitives,
            # first Parquet writer, worker start-up code paths) that a long gallery amortises
            bare_loop(model, images[: cfg.batch_size], cfg.batch_size)
            for w in workers:
                embed_with_model(dataset, g, t, q_sha, member, "test", cfg.batch_size, workers=w)
            bare: list[float] = []
            step: dict[int, list[float]] = {w: [] for w in workers}
            for r in range(repeats):
                # alternate which side runs first, so a drift in machine load does not favour either
                for side in (("bare", *workers) if r % 2 == 0 else (*workers, "bare")):
                    if side == "bare":
                        bare.append(n / bare_loop(model, images, cfg.batch_size))
                        continue
                    started = time.perf_counter()
                    embed_with_model(dataset, g, t, q_sha, member, "test", cfg.batch_size, workers=side)
                    step[side].append(n / (time.perf_counter() - started))
            name = f"{spec.name} ({spec.arch}) | {n_threads}"
            rows.append(f"| {name} | bare forward loop, decoded tensors | {statistics.median(bare):,.0f} | 1.00 | |")
            for w in workers:
                ratios = [s / b for s, b in zip(step[w], bare, strict=True)]
                rows.append(f"| {name} | embed step (decode + forward + T + Parquet), workers={w} | "
                            f"{statistics.median(step[w]):,.0f} | {statistics.median(ratios):.2f} | "
                            f"{min(ratios):.2f}–{max(ratios):.2f} |")
    torch.set_num_threads(default_threads)
    return rows


# the step's own peak (VmHWM: ru_maxrss is kept across exec, and reported this benchmark's own peak, 1 GB, for every
# row); a decode worker's from ru_maxrss of the children, which fork from the step (no exec)
PEAK_RSS_CHILD = """
import resource, sys
from benchmarks.memory import peak_rss_mb
from cmce.embed import embed_with_model
from cmce.checkpoint import load_embedding_model
d, g, t, q, out, batch, workers = sys.argv[1:]
embed_with_model(d, g, t, load_embedding_model(q).sha256, out, "test", int(batch), workers=int(workers))
print(round(peak_rss_mb() * 1024), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_memory(cfg, work: Path, sizes: list[int], workers: list[int]) -> list[str]:
    # the query architecture stands in for the gallery model: memory does not depend on the model's
    # speed, and a fast model keeps the 100k-image run short
    spec = ModelSpec(**{**cfg.query_model.__dict__, "name": "stand_in"})
    q = work / "query.pt"
    g = random_model(spec, cfg.data.channels, cfg.data.image_size, work / "stand_in.pt")
    t = random_transformation(g, q, cfg.transform.hidden_dim, cfg.transform.depth, work / "t_stand_in.pt")
    rows = ["| gallery images | workers | peak RSS main process (MB) | peak RSS of a decode worker (MB) | "
            "dataset file (MB) |", "|---|---|---|---|---|"]
    for n in sizes:
        dataset = work / f"data_{n}.parquet"
        if not dataset.exists():
            synthetic_dataset(dataset, n, cfg.data.image_size)
        for w in workers:
            res = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(dataset), str(g), str(t), str(q),
                                  str(work / "rss.parquet"), str(cfg.batch_size), str(w)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            main_kb, child_kb = map(int, res.stdout.split()[-2:])
            rows.append(f"| {n:,} | {w} | {main_kb / 1024:.0f} | {child_kb / 1024 if w else 0:.0f} | "
                        f"{dataset.stat().st_size / 2**20:.1f} |")
    return rows


def parquet_io(work: Path, n: int, repeats: int) -> list[str]:
    """Gallery files: the cmce writers/readers vs pyarrow on the same table."""
    rng = np.random.default_rng(0)
    from cmce.embed import member_metadata, member_schema, member_table

    members = []
    for i in range(3):
        meta = member_metadata(f"m{i}", "resnet", f"{i}" * 64, "b" * 64, "c" * 64, "test")
        raw = rng.normal(size=(n, 128)).astype(np.float32)
        tr = rng.normal(size=(n, 64)).astype(np.float32)
        tr /= np.linalg.norm(tr, axis=1, keepdims=True)
        table = member_table([f"x{j}" for j in range(n)], np.arange(n) % 10, raw, tr,
                             member_schema(128, 64, meta))
        members.append(work / f"io_m{i}.parquet")
        pq.write_table(table, members[-1], row_group_size=8192)
    gallery = combine_members(members, work / "io_gallery.parquet")
    table = pq.read_table(gallery)
    size_mb = gallery.stat().st_size / 2**20

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return size_mb / statistics.median(times)

    direct_w = timed(lambda: pq.write_table(table, work / "io_direct.parquet", row_group_size=8192))
    ours_w = timed(lambda: write_table(table, work / "io_ours.parquet"))
    shards = []
    for i, part in enumerate((table.slice(0, n // 2), table.slice(n // 2))):
        meta = json.loads(table.schema.metadata[b"cmce"]) | {"shard": f"{i}/2"}
        shards.append(work / f"io_shard{i}.parquet")
        pq.write_table(part.replace_schema_metadata({"cmce": json.dumps(meta)}), shards[-1], row_group_size=8192)
    merge_w = timed(lambda: merge_shards(shards, work / "io_merged.parquet"))
    combine_w = timed(lambda: combine_members(members, work / "io_gallery2.parquet"))
    direct_r = timed(lambda: pq.read_table(gallery).column("embedding").combine_chunks().flatten().to_numpy())
    checked_r = timed(lambda: pq.read_table(gallery, page_checksum_verification=True).column("embedding")
                      .combine_chunks().flatten().to_numpy())
    ours_r = timed(lambda: embedding_column(read_table(gallery), "embedding", str(gallery)))
    return [
        f"Gallery file of {n:,} rows, 3 members (query dim 64, raw dim 128): {size_mb:.1f} MB. MB/s of the gallery "
        "file, median of repeats. The baseline is `pq.write_table` with pyarrow's defaults, which try a dictionary on "
        "every column; cmce's writers dictionary-encode only ids and labels (`cmce.tables.writer_options`). cmce's "
        "reader verifies every page's CRC-32 (a flipped bit is refused, not loaded), which pyarrow's default skips: "
        "the middle read row is pyarrow with that verification alone.",
        "",
        "| operation | MB/s | vs pyarrow directly |",
        "|---|---|---|",
        f"| write: `pq.write_table` (baseline) | {direct_w:,.0f} | 1.00 |",
        f"| write: `cmce.tables.write_table` (temp file + rename) | {ours_w:,.0f} | {ours_w / direct_w:.2f} |",
        f"| write: `merge_shards` (2 shards, row group by row group, id check) | {merge_w:,.0f} | "
        f"{merge_w / direct_w:.2f} |",
        f"| write: `combine_members` (3 member files → ensemble, uncertainty) | {combine_w:,.0f} | "
        f"{combine_w / direct_w:.2f} |",
        f"| read embeddings: `pq.read_table` → numpy (baseline) | {direct_r:,.0f} | 1.00 |",
        f"| read embeddings: `pq.read_table(page_checksum_verification=True)` → numpy | {checked_r:,.0f} | "
        f"{checked_r / direct_r:.2f} |",
        f"| read embeddings: `cmce.tables.read_table` + `embedding_column` (validated) | {ours_r:,.0f} | "
        f"{ours_r / direct_r:.2f} |",
    ]


def model_costs(cfg, work: Path, repeats: int = 50) -> list[str]:
    size, ch = cfg.data.image_size, cfg.data.channels
    x = torch.zeros(1, ch, size, size)

    @torch.no_grad()
    def cost(module: torch.nn.Module, inp: torch.Tensor) -> tuple[int, int, float]:
        module.eval()
        flops = count_flops(module, *inp.shape[1:])
        for _ in range(5):  # warm-up: the first calls create the kernels' primitives
            module(inp)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            module(inp)
            times.append(time.perf_counter() - started)
        return count_parameters(module), flops, statistics.median(times)

    rows = ["| model | parameters | FLOPs / image | CPU latency / image, batch 1 (ms) |", "|---|---|---|---|"]
    q_params, q_flops, q_ms = cost(EmbeddingNet(cfg.query_model.arch, ch, cfg.query_model.embedding_dim,
                                                cfg.query_model.width), x)
    rows.append(f"| query: {cfg.query_model.name} ({cfg.query_model.arch}) | {q_params:,} | {q_flops:,} | "
                f"{1e3 * q_ms:.2f} |")
    total = [0, 0, 0.0]
    for spec in cfg.gallery_models:
        net = EmbeddingNet(spec.arch, ch, spec.embedding_dim, spec.width)
        mlp = build_mlp(spec.embedding_dim, cfg.query_model.embedding_dim, cfg.transform.hidden_dim,
                        cfg.transform.depth)
        g = cost(net, x)
        t = cost(mlp, torch.zeros(1, spec.embedding_dim))
        rows.append(f"| gallery: {spec.name} ({spec.arch}) + its T | {g[0] + t[0]:,} | {g[1] + t[1]:,} | "
                    f"{1e3 * (g[2] + t[2]):.2f} |")
        total = [total[0] + g[0] + t[0], total[1] + g[1] + t[1], total[2] + g[2] + t[2]]
    rows.append(f"| gallery ensemble (all {len(cfg.gallery_models)}) | {total[0]:,} | {total[1]:,} | "
                f"{1e3 * total[2]:.2f} |")
    rows.append(f"| **query / ensemble** | {q_params / total[0]:.3f} | {q_flops / total[1]:.3f} | "
                f"{q_ms / total[2]:.3f} |")
    return rows


worker_counts = comma_list(non_negative_int)  # decode workers; 0: decoded in the main process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "params.yaml"))
    p.add_argument("--throughput-images", type=positive_int, default=3_000)
    p.add_argument("--small", type=positive_int, default=10_000, help="smaller gallery of the memory comparison")
    p.add_argument("--large", type=positive_int, default=100_000, help="larger gallery of the memory comparison")
    p.add_argument("--repeats", type=positive_int, default=9)
    p.add_argument("--workers", type=worker_counts, default="0,1", help="decode worker counts to measure")
    p.add_argument("--threads", type=thread_counts, default="ALL,1",
                   help="torch thread counts to measure, comma-separated; ALL = torch's default (every core)")
    p.add_argument("--no-write", action="store_true", help="print only, do not write BENCHMARKS.md")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, or the parser's error (exit 2) for flags that do not fit together."""
    args = p.parse_args(argv)
    if args.small >= args.large:
        p.error(f"--small {args.small} must be below --large {args.large} (the two galleries of the memory "
                "comparison)")
    return args


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = parse_args(p, argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_or_error(p, args.config)
    workers = args.workers
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cmce-bench-") as tmp:
        work = Path(tmp)
        size = f"{cfg.data.image_size}×{cfg.data.image_size}×{cfg.data.channels}"
        body = [f"Config `{config_shown(args.config)}`: {size} "
                f"images, inference batch {cfg.batch_size}. Random weights, synthetic PNGs.", "",
                f"### Embedding throughput, {args.throughput_images:,} images (median of {args.repeats})", ""]
        body += throughput(cfg, work, args.throughput_images, args.repeats, workers, args.threads)
        body += ["", "### Peak memory of the embed step by gallery size (one model: the query architecture as a "
                 "fast stand-in)", ""]
        body += peak_memory(cfg, work, [args.small, args.large], workers)
        body += ["", "### Parquet throughput of gallery files", ""]
        body += parquet_io(work, args.large, args.repeats)
        body += ["", "### Query side vs gallery side", ""]
        body += model_costs(cfg, work)
    command = "python -m benchmarks.embedding" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("throughput_images", "small", "large", "repeats") and v != p.get_default(k))
    if args.workers != worker_counts(p.get_default("workers")):
        command += " --workers " + ",".join(map(str, args.workers))
    if args.threads != thread_counts("ALL,1"):
        command += " --threads " + ",".join(map(str, args.threads))
    if args.config != p.get_default("config"):  # another config: the command without it measured params.yaml
        command += f" --config {shlex.quote(config_shown(args.config))}"
    if args.no_write:
        sys.stdout.write("\n".join(body) + "\n")
    else:
        write_section("Gallery embedding, memory, Parquet I/O and model costs", command, body, time.time() - started)


if __name__ == "__main__":
    main()
