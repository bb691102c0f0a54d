"""Peak memory of `cmce serve` under a burst of large request bodies, with the bodies it holds at once bounded
(`--max-bodies-bytes`, default 4 × `--max-body-bytes`) and with that bound lifted, in one run.

    python -m benchmarks.serving_memory [--clients 40] [--repeats 3] [--no-write]

Each client posts one body of 64 embeddings of 9,500 floats (7.9 MB, under the 8 MiB `--max-body-bytes`) at the
same moment; the served model is 64-d, so each is answered 422 after it is parsed: the parse is what costs memory
(a list of floats is several times its JSON). The server's resident memory is sampled every 10 ms; the clients are
processes on the same cores. Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks.args import positive_int
from benchmarks.report import ROOT, write_section
from cmce.checkpoint import load_embedding_model
from tests.serve_world import Server, gallery_index, query_model

DIM, SIZE, WIDTH = 64, 28, 16
FLOATS, QUERIES = 9_500, 64


def _client(url: str, body: bytes, go: Any, answers: Any) -> None:
    go.wait()
    try:
        answer = requests.post(f"{url}/search", data=body, timeout=120, headers={"content-type": "application/json"})
        answers.put(answer.status_code)
    except requests.RequestException as err:
        answers.put(type(err).__name__)


def burst(server: Server, body: bytes, clients: int) -> dict:
    """`clients` processes post `body` at once: the server's peak RSS above its idle RSS, the answers, the wall
    time. Processes, not threads: threads of one process took turns sending and never made a burst."""
    proc = psutil.Process(server.proc.pid)
    idle = proc.memory_info().rss
    peak, done = [idle], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    ctx = multiprocessing.get_context("fork")
    go, answers = ctx.Barrier(clients + 1), ctx.Queue()
    posts = [ctx.Process(target=_client, args=(server.url, body, go, answers)) for _ in range(clients)]
    for p in posts:
        p.start()
    sampler = threading.Thread(target=sample)
    sampler.start()
    go.wait()
    started = time.perf_counter()
    statuses = Counter(answers.get(timeout=300) for _ in posts)
    wall = time.perf_counter() - started
    for p in posts:
        p.join()
    done.set()
    sampler.join()
    return {"peak_mb": (peak[0] - idle) / 1e6, "statuses": statuses, "wall_s": wall}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=positive_int, default=40)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--no-write", action="store_true", help="print the section only")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    started = time.time()
    # room for every body at once, and never below the default (2 clients' room was the default itself)
    lifted = str(max(2 * args.clients * (8 << 20), 2 * (32 << 20)))
    settings = (("default (4 × --max-body-bytes = 32 MiB)", []), (f"lifted ({lifted} bytes)",
                                                                   ["--max-bodies-bytes", lifted]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="cmce-serving-memory-") as tmp:
        root = Path(tmp)
        model = query_model(root / "query.pt", dim=DIM, size=SIZE, width=WIDTH)
        sha = load_embedding_model(model).sha256
        index = gallery_index(root / "work", model, root / "index", rows=2000, dim=DIM)
        body = json.dumps({"embeddings": [[0.123456789] * FLOATS] * QUERIES, "query_model_sha256": sha}).encode()
        for name, flags in settings:
            results = []
            for _ in range(args.repeats):
                server = Server(["--index", str(index), "--query-model", str(model), *flags], root / "serve.log")
                try:
                    results.append(burst(server, body, args.clients))
                finally:
                    server.stop()
            statuses = sum((r["statuses"] for r in results), Counter())
            peaks, walls = [r["peak_mb"] for r in results], [r["wall_s"] for r in results]
            rows.append(f"| {name} | {statistics.median(peaks):,.0f} | {max(peaks):,.0f} | "
                        f"{statistics.median(walls):.1f} | "
                        f"{', '.join(f'{k}: {v}' for k, v in sorted(statuses.items(), key=str))} |")
    text = [f"{args.clients} clients post one {len(body) / 1e6:.1f} MB body each at the same moment (64 embeddings of "
            f"{FLOATS:,} floats; answered 422 after parsing, as the served model is {DIM}-d); {args.repeats} bursts "
            "per setting, a fresh server each. Peak: the server's resident memory above its idle memory. 503: no "
            "room for the body within the wait (Retry-After: 1); 408: the body deadline passed while the server was "
            "busy.", "", "| bodies held at once | peak MB (median) | peak MB (max) | seconds (median) | answers, "
                         "all bursts |", "|---|---|---|---|---|", *rows]
    write_section("Serving: memory under a burst of large bodies", "python -m benchmarks.serving_memory"
                  + (f" --clients {args.clients}" if args.clients != 40 else "")
                  + (f" --repeats {args.repeats}" if args.repeats != 3 else ""), text, time.time() - started,
                  ROOT / "BENCHMARKS.md", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
