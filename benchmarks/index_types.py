"""Index types on a synthetic clustered gallery: build time, memory, QPS at batch 1 and 1000, recall@10 vs exact.

    python -m benchmarks.index_types [--n 1000000] [--threads 1,2] [--no-write]

The gallery: unit vectors around random unit centres (about 1000 items per cluster, lognormal cluster
sizes), with anisotropic gaussian noise (variances decaying as 1/i along a random basis, noise norm 0.75,
so an item's cosine to its centre is about 0.8); the queries come from the same clusters with fresh noise,
so they are never gallery points. Every index is built with the library's defaults (cmce.index.make_index)
unless a flag overrides a parameter; exact search (IndexFlatIP) runs in the same process as the baseline
and gives the ground truth for recall@10. QPS are medians over --repeats runs. Prints a Markdown table and
writes it, dated, to BENCHMARKS.md (in place of its earlier section, else at the end).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from benchmarks.args import comma_list, int_in, one_of, positive_int, random_seed
from benchmarks.memory import reset_peak_rss, rss_mb
from benchmarks.report import LOG_FORMAT, ROOT, write_section
from cmce.config import HnswConfig, IndexConfig, IvfPqConfig, range_of
from cmce.index import INDEX_TYPES, make_index, set_search_params
from cmce.method import normalize

K = 10


def clustered_unit_vectors(n: int, n_queries: int, dim: int = 128, seed: int = 0,
                           per_cluster: int = 1000, spread: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, queries) as float32 unit vectors drawn from the same gaussian clusters (see the module doc)."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, n // per_cluster)
    centres = normalize(rng.standard_normal((n_clusters, dim))).astype(np.float32)
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    weights /= weights.sum()
    # embedding spectra decay: most of the spread lies in a few directions, in a random basis
    scale = (1.0 + np.arange(dim)) ** -0.5
    scale *= spread / np.sqrt((scale**2).sum())
    basis = (scale[:, None] * np.linalg.qr(rng.standard_normal((dim, dim)))[0].T).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 65536):  # chunks bound the float64 temporaries
            stop = min(count, start + 65536)
            cluster = rng.choice(n_clusters, stop - start, p=weights)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) @ basis
            out[start:stop] = normalize(centres[cluster] + noise)
        return out

    return draw(n), draw(n_queries)


@dataclass
class Row:
    index_type: str
    factory: str
    build_params: dict
    search_params: dict
    build_s: float
    index_mb: float
    rss_delta_mb: float
    peak_delta_mb: float
    qps: dict = field(default_factory=dict)  # (threads, batch) -> median QPS
    recall: float = float("nan")


def time_search(index, queries: np.ndarray, batch: int, repeats: int, n_single: int) -> float:
    """Median QPS over `repeats`: one call per `batch` queries (batch 1: the first `n_single` queries one by one)."""
    qs = queries[:n_single] if batch == 1 else queries
    index.search(qs[: min(batch, len(qs))], K)  # warm-up: first-touch of the index memory
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for s in range(0, len(qs), batch):
            index.search(qs[s:s + batch], K)
        runs.append(len(qs) / (time.perf_counter() - start))
    return statistics.median(runs)


def overlap_with_exact(found: np.ndarray, exact: np.ndarray) -> float:
    """ANN recall@K: the share of the exact top-K that the index returns (not the retrieval R@K of cmce.metrics,
    which asks whether any of the K neighbours shares the query's label)."""
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact, strict=True)]))


def index_bytes(index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def options_from(args: argparse.Namespace) -> IndexConfig:
    cfg = IndexConfig()
    ivf = {k: getattr(args, k) for k in ("nlist", "m", "nprobe", "k_factor", "train_size") if getattr(args, k)}
    if args.ef_search:
        cfg = replace(cfg, hnsw=replace(cfg.hnsw, ef_search=args.ef_search))
    return replace(cfg, ivfpq=replace(cfg.ivfpq, **ivf))


def run(args: argparse.Namespace) -> tuple[list[Row], list[int], float]:
    threads = args.threads or [faiss.omp_get_max_threads()]
    build_threads = max(threads)
    t0 = time.perf_counter()
    gallery, queries = clustered_unit_vectors(args.n, args.queries, args.dim, args.seed)
    gen_s = time.perf_counter() - t0
    options = options_from(args)
    rows: list[Row] = []
    exact_ids = None
    for index_type in args.types:
        faiss.omp_set_num_threads(build_threads)
        gc.collect()
        peak_ok = reset_peak_rss()
        before = rss_mb()
        start = time.perf_counter()
        built = make_index(gallery, index_type, options)
        build_s = time.perf_counter() - start
        row = Row(built.index_type, built.params["factory"], {k: v for k, v in built.params.items()
                                                               if k not in ("factory", "requested_type")},
                  built.search_params, build_s, index_bytes(built.index) / 2**20, rss_mb() - before,
                  rss_mb("VmHWM") - before if peak_ok else float("nan"))
        set_search_params(built.index, built.search_params)
        _, ids = built.index.search(queries, K)
        if exact_ids is None:
            if built.index_type != "flat":
                raise SystemExit("--types must start with flat: it is the baseline and the ground truth")
            exact_ids = ids
        row.recall = overlap_with_exact(ids, exact_ids)
        for t in threads:
            faiss.omp_set_num_threads(t)
            for batch in (1, args.queries):
                row.qps[t, batch] = time_search(built.index, queries, batch, args.repeats, args.batch1_queries)
        logging.info("%s: build %.1f s, recall@%d %.4f, QPS %s", row.factory, build_s, K, row.recall,
                     {f"{t}t/b{b}": round(q) for (t, b), q in row.qps.items()})
        rows.append(row)
        del built
    return rows, threads, gen_s


def table(rows: list[Row], threads: list[int], n_queries: int) -> list[str]:
    flat = rows[0]
    lines = [f"| index (faiss factory) | search params | build s | index MiB | RSS Δ MiB (peak) | omp threads | "
             f"QPS batch 1 | QPS batch {n_queries} | × exact b1 | × exact b{n_queries} | recall@{K} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = ", ".join(f"{k}={v}" for k, v in r.search_params.items()) or "exact"
        for t in threads:
            b1, bn = r.qps[t, 1], r.qps[t, n_queries]
            lines.append(f"| {r.index_type} `{r.factory}` | {sp} | {r.build_s:.1f} | {r.index_mb:.0f} | "
                         f"{r.rss_delta_mb:.0f} ({r.peak_delta_mb:.0f}) | {t} | {b1:.0f} | {bn:.0f} | "
                         f"{b1 / flat.qps[t, 1]:.1f} | {bn / flat.qps[t, n_queries]:.1f} | {r.recall:.4f} |")
    return lines


OVERRIDES = {"nlist": IvfPqConfig, "m": IvfPqConfig, "nprobe": IvfPqConfig, "k_factor": IvfPqConfig,
             "train_size": IvfPqConfig, "ef_search": HnswConfig}  # flag → the config class whose range it takes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # at least K items: every query has K neighbours to find
    p.add_argument("--n", type=int_in(f"[{K}, inf)"), default=1_000_000, help="gallery size (tests run it tiny)")
    p.add_argument("--dim", type=positive_int, default=128)
    p.add_argument("--queries", type=positive_int, default=1000, help="queries; also the large batch size")
    p.add_argument("--batch1-queries", type=positive_int, default=100,
                   help="queries searched one at a time (at most --queries)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--types", type=comma_list(one_of(INDEX_TYPES)), default="flat,ivfpq,hnsw",
                   help="comma-separated, flat first (the baseline)")
    p.add_argument("--threads", type=comma_list(positive_int), default=None,
                   help="comma-separated search thread counts (default: faiss's)")
    for name, cls in OVERRIDES.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int_in(range_of(cls, name)), default=None,
                       help="override the library default")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"),
                   help="file the dated section is written to, in place of its earlier one, else at the end")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, or the parser's error (exit 2) for flags that do not fit together."""
    args = p.parse_args(argv)
    if args.types[0] != "flat":
        p.error(f"--types must start with flat (the baseline and the ground truth), got {','.join(args.types)}")
    if args.batch1_queries > args.queries:
        p.error(f"--batch1-queries {args.batch1_queries} is more than --queries {args.queries}")
    if args.m and args.dim % args.m:
        p.error(f"--m {args.m} must divide --dim {args.dim} (PQ sub-quantisers split the dimensions)")
    return args


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    load = os.getloadavg()[0]
    started = time.time()
    rows, threads, gen_s = run(args)
    lines = table(rows, threads, args.queries)
    ivf = next((r for r in rows if r.index_type == "ivfpq"), None)
    verdict = ""
    if ivf is not None:
        ratios = {t: [ivf.qps[t, b] / rows[0].qps[t, b] for b in (1, args.queries)] for t in threads}
        met = min(min(r) for r in ratios.values()) >= 10 and ivf.recall >= 0.95
        verdict = (f"Target (IVF-PQ+refine ≥ 10× exact QPS at recall@{K} ≥ 0.95): {'met' if met else 'NOT met'} — "
                   + "; ".join(f"{t} thread(s): ×{r[0]:.1f} at batch 1, ×{r[1]:.1f} at batch {args.queries}"
                               for t, r in ratios.items()) + f"; recall@{K} {ivf.recall:.4f}.")
    command = " ".join(["python -m benchmarks.index_types", *(argv if argv is not None else sys.argv[1:])])
    body = [
        f"faiss {faiss.__version__}; load average {load:.1f} at start: the cores may be shared with other work, "
        f"which hurts multi-threaded OpenMP most; data generation {gen_s:.0f} s.",
        f"{args.n:,} synthetic clustered unit vectors of dimension {args.dim} (`clustered_unit_vectors` in the "
        "script: ~1000 items per gaussian "
        f"cluster, anisotropic noise); {args.queries} queries from the same clusters, not gallery points. "
        f"QPS: medians of {args.repeats} runs (batch 1: {args.batch1_queries} queries one at a time); builds use "
        f"{max(threads)} threads. recall@{K}: overlap with exact top-{K}. Index MiB: the written index.faiss. "
        "RSS Δ: resident growth kept after the build (peak during it).",
        "Build parameters: " + "; ".join(f"{r.index_type} " + ", ".join(f"{k}={v}" for k, v in r.build_params.items())
                                         for r in rows if r.build_params) + ".",
        "",
        *lines,
        *(["", verdict] if verdict else []),
    ]
    # one section whatever the size: a run at another size added a second one for good
    write_section("Index types", command.strip(), body, time.time() - started,
                   Path(args.markdown), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
