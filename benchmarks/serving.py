"""Load test of `cmce serve`: latency (p50/p99) and throughput of POST /search at 1, 8 and 32 concurrent
clients, for client-side embeddings and for images embedded on the server, and while the index is rebuilt
under the clients (build-index's folder swap, picked up by the server's poller), in a local folder and under an
s3:// prefix on a real S3 server on 127.0.0.1 (SeaweedFS, as the tests use; that row is left out without it).

    python -m benchmarks.serving [--rows 20000] [--duration 6] [--clients 1,8,32] [--markdown BENCHMARKS.md]

A real server process on 127.0.0.1 (tests/serve_world.py: an untrained query model the size of params.yaml's,
28 px grey images, a flat index of random gallery embeddings); one query per request, k = 10; the clients are
threads of this process, on the same cores as the server. Writes its section to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import requests

from benchmarks.args import comma_list, int_in, positive_float, positive_int
from benchmarks.report import LOG_FORMAT, ROOT, write_section
from cmce.checkpoint import load_embedding_model
from tests.s3server import WeedServer, weed_binary
from tests.serve_world import Server, b64, cmce_env, gallery_index, png, query_model

DIM, SIZE, WIDTH, K = 64, 28, 16, 10  # params.yaml's query model: query_cnn, 64-d, width 16, 28 px


def load(server: Server, bodies: list[dict], clients: int, duration_s: float) -> dict:
    """`clients` threads posting `bodies` in turn for `duration_s`: latencies of the answered requests,
    the failed ones, and the index versions that answered."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failed: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()

    def client(i: int) -> None:
        with requests.Session() as session:
            n = i
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    res = server.search(session, **bodies[n % len(bodies)])
                    ok = res.status_code == 200
                except requests.RequestException as err:
                    ok, res = False, err
                if ok:
                    latencies[i].append(time.perf_counter() - start)
                    versions.add(res.json()["index_version"])
                else:
                    failed.append(str(getattr(res, "text", res))[:200])
                n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration_s)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1000
    return {"n": len(lat), "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"), "qps": len(lat) / wall,
            "failed": len(failed), "versions": len(versions), "first_failure": failed[:1]}


def row(kind: str, clients: int, r: dict) -> str:
    return f"| {kind} | {clients} | {r['n']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['qps']:.0f} | {r['failed']} |"


class Rebuilder(threading.Thread):
    """Rebuilds the index in place, a new gallery every `every_s` seconds, until stopped. An s3:// `index` is
    built in a local folder and uploaded as build-index uploads it (staged, meta.json last)."""

    def __init__(self, work: Path, model: Path, index: Path | str, rows: int, every_s: float):
        super().__init__(name="rebuilder")
        self.work, self.model, self.index, self.rows, self.every_s = work, model, index, rows, every_s
        self.builds = 0
        self.done = threading.Event()

    def run(self) -> None:
        from cmce import s3

        while not self.done.wait(self.every_s):
            seed = 100 + self.builds
            local = self.work / "built" if isinstance(self.index, str) else self.index
            gallery_index(self.work, self.model, local, rows=self.rows, seed=seed, prefix=f"r{seed}", dim=DIM)
            if isinstance(self.index, str):
                s3.upload_dir(local, self.index, last="meta.json")
            self.builds += 1


def rebuilt_under_load(server: Server, bodies: list[dict], rebuilder: Rebuilder, clients: int, duration_s: float,
                       where: str) -> str:
    """The table row of `clients` searching while `rebuilder` rebuilds the index the server follows."""
    rebuilder.start()
    r = load(server, bodies, clients, duration_s)
    finished = rebuilder.builds  # a build still running is not counted: no client saw it
    rebuilder.done.set()
    rebuilder.join()
    logging.info("during reloads of %s: %s", where, r)
    return row(f"embedding, {where} rebuilt {finished}× meanwhile ({r['versions']} versions answered)", clients, r)


@contextlib.contextmanager
def s3_index(root: Path, index: Path) -> Iterator[tuple[str, dict[str, str]] | None]:
    """`index` uploaded to a bucket of a fresh S3 server on 127.0.0.1: (its URI, the server's environment); None
    without the server's binary."""
    if weed_binary() is None:
        yield None
        return
    from cmce import s3

    server = WeedServer(root / "s3").start()
    try:
        with mock.patch.dict(os.environ, server.env()):  # this process uploads the rebuilds
            server.client().create_bucket(Bucket="bench")
            s3.upload_dir(index, "s3://bench/index", last="meta.json")
            yield "s3://bench/index", server.env()
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int_in(f"[{K}, inf)"), default=20000,
                   help=f"gallery items indexed (at least k = {K})")
    p.add_argument("--duration", type=positive_float, default=6.0, help="seconds of load per measurement")
    p.add_argument("--clients", type=comma_list(positive_int), default="1,8,32",
                   help="concurrent clients, comma-separated")
    p.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"),
                   help="file the section is written to, in place of its previous one (else at the end)")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    started = time.time()
    clients = args.clients
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cmce-serving-") as tmp:
        root = Path(tmp)
        model = query_model(root / "query.pt", dim=DIM, size=SIZE, width=WIDTH)
        sha = load_embedding_model(model).sha256
        index = gallery_index(root / "work", model, root / "index", rows=args.rows, dim=DIM)
        server = Server(["--index", str(index), "--query-model", str(model), "--reload-interval", "0.5"],
                        root / "serve.log")
        rng = np.random.default_rng(0)
        embedding_bodies = [{"embeddings": [rng.normal(size=DIM).tolist()], "query_model_sha256": sha, "k": K}
                            for _ in range(64)]
        image_bodies = [{"images": [b64(png(s, SIZE))], "k": K} for s in range(64)]
        try:
            for kind, bodies in (("embedding", embedding_bodies), ("image (embedded on the server)", image_bodies)):
                for c in clients:
                    load(server, bodies, c, min(1.0, args.duration / 4))  # warm-up: connections, thread pool
                    r = load(server, bodies, c, args.duration)
                    rows.append(row(kind, c, r))
                    logging.info("%s, %d clients: %s", kind, c, r)
            c = clients[len(clients) // 2]
            rebuilder = Rebuilder(root / "work", model, index, args.rows, args.duration / 8)
            # a build takes seconds on busy cores: twice the load time
            rows.append(rebuilt_under_load(server, embedding_bodies, rebuilder, c, 2 * args.duration, "index"))
        finally:
            server.stop()
        with s3_index(root, index) as remote:
            if remote is not None:
                uri, env = remote
                server = Server(["--index", uri, "--query-model", str(model), "--reload-interval", "0.5"],
                                root / "serve-s3.log", env={**cmce_env(), **env})
                try:
                    load(server, embedding_bodies, c, min(1.0, args.duration / 4))
                    rebuilder = Rebuilder(root / "work-s3", model, uri, args.rows, args.duration / 8)
                    rows.append(rebuilt_under_load(server, embedding_bodies, rebuilder, c, 2 * args.duration,
                                                   "s3:// index"))
                finally:
                    server.stop()
    body = [f"`cmce serve` over a flat index of {args.rows:,} × {DIM} gallery items; one query per request, k = {K}; "
            f"{args.duration:g} s of load per row after a warm-up; the clients are threads of the benchmark "
            "process on the same cores as the server (one uvicorn worker, one thread per FAISS search). Image "
            "queries are 28 px grey PNGs embedded on the server by a query_cnn of params.yaml's size. The last "
            f"rows ({2 * args.duration:g} s each) rebuild the index in place while the clients run, the server "
            "polling it every 0.5 s: in a local folder (build-index's atomic folder swap), then under an s3:// "
            "prefix on a SeaweedFS server on 127.0.0.1 (uploaded as build-index uploads it, meta.json last; the "
            "server follows its meta.json, downloads each new version and swaps it in). On a machine shared with "
            "other jobs (the load average above) rows differ by up to 2× from run to run.", "",
            "| requests | clients | answered | p50 ms | p99 ms | QPS | failed |", "|---|---|---|---|---|---|---|",
            *rows]
    command = (f"python -m benchmarks.serving --rows {args.rows} --duration {args.duration:g} "
               f"--clients {','.join(map(str, clients))}")
    write_section("Serving: latency and throughput of cmce serve", command, body, time.time() - started,
                  Path(args.markdown), write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
