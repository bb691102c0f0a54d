"""Evaluation at scale: time and peak memory of one configuration's metrics against gallery size, beside
pytorch-metric-learning's AccuracyCalculator (faiss kNN) on the same embeddings, and the dense
implementation the blocked one replaced, where it fits.

    python -m benchmarks.evaluation [--sizes 10000,30000,100000] [--dim 64] [--per-class 20] [--repeats 3]
                                    [--dense-up-to 30000] [--device cpu] [--no-write]

Queries are the gallery (leave-one-out, as `cmce evaluate` scores sym and asym configurations): unit
vectors around one centre per class, `--per-class` items a class. Each (size, method) runs in a fresh
process, so its peak RSS is its own; time is the median of the repeats, measured inside that process
around the metric call only (embeddings made beforehand). Methods:
- cmce R@K + MAP@R: `cmce.metrics.retrieval_metrics` with no FAR, the part AccuracyCalculator also gives;
- AccuracyCalculator: precision_at_1 and mean_average_precision_at_r, k="max_bin_count" (its MAP@R setting);
- cmce all metrics: R@1,2,4,8, MAP@R and TAR@FAR 1e-2, 1e-3, 1e-4 (one configuration of metrics.json);
- cmce all metrics + rejection curves: the served ensemble's configuration in `cmce evaluate` (5 rates,
  uncertainty and 5 random repeats, from the same passes);
- dense (before): the whole score matrix, as evaluate scored before (tests/dense_oracle.py).
Writes its section of BENCHMARKS.md (one current section, replaced).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks.args import comma_list, device_or_error, int_in, non_negative_int, positive_int
from benchmarks.memory import peak_rss_mb
from benchmarks.report import ROOT, write_section
from cmce import device as devices

METHODS = {
    "cmce_knn": "cmce R@K + MAP@R",
    "pml": "AccuracyCalculator R@1 + MAP@R",
    "cmce_all": "cmce all metrics",
    "cmce_rejection": "cmce all metrics + rejection curves",
    "dense": "dense (before): all metrics",
}


def embeddings(n: int, dim: int, per_class: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % max(1, n // per_class))
    centres = rng.normal(size=(labels.max() + 1, dim)).astype(np.float32)
    x = (centres[labels] + 1.2 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def run_method(method: str, n: int, dim: int, per_class: int, repeats: int, device: str) -> dict:
    """In this process: time `method` `repeats` times on n items; its results and this process's peak RSS."""
    x, labels = embeddings(n, dim, per_class)
    dev = devices.select(device)
    call = _metric_call(method, x, labels, dev)  # its libraries imported here, not timed
    call(x[: min(n, 64)], labels[: min(n, 64)])  # a warm-up: the first call pays for lazy set-up (CUDA's included)
    times, result = [], {}
    for _ in range(repeats):
        started = time.perf_counter()
        result = call(x, labels)
        times.append(time.perf_counter() - started)
    return {"seconds": times, "peak_rss_mb": peak_rss_mb(), "R@1": result["R@1"], "MAP@R": result["MAP@R"]}


def _metric_call(method: str, x, labels, dev):  # noqa: ANN001, ANN202 - numpy arrays and a torch device in, a call out
    """`method` as a call (embeddings, labels) → {"R@1", "MAP@R", ...}, scoring the items against themselves."""
    import numpy as np

    if method == "pml":
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                  device=dev)

        def pml(x, labels):  # noqa: ANN001, ANN202
            out = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels), ref_includes_query=True)
            return {"R@1": out["precision_at_1"], "MAP@R": out["mean_average_precision_at_r"]}
        return pml
    if method == "dense":
        sys.path.insert(0, str(ROOT))
        from tests.dense_oracle import retrieval_metrics, score_matrix

        return lambda x, labels: retrieval_metrics(score_matrix(x, x, np.arange(len(x))), labels, labels)
    from cmce.config import EvaluateConfig
    from cmce.evaluate import measure_with_rejection
    from cmce.metrics import retrieval_metrics
    from cmce.scores import InnerProducts

    def cmce(x, labels):  # noqa: ANN001, ANN202
        scores = InnerProducts(x, x, np.arange(len(x)), device=dev)
        if method == "cmce_knn":
            return retrieval_metrics(scores, labels, labels, fars=[])
        if method == "cmce_all":
            return retrieval_metrics(scores, labels, labels)
        uncertainty = np.random.default_rng(1).random(len(x))
        return measure_with_rejection(scores, labels, labels, uncertainty, EvaluateConfig(), 0)[0]
    return cmce


def in_child(method: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.evaluation", "--child", method, "--sizes", str(n), "--dim", str(args.dim),
           "--per-class", str(args.per_class), "--repeats", str(args.repeats), "--device", args.device]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:  # a CalledProcessError traceback, the child's reason swallowed
        reason = next((line for line in reversed(res.stderr.splitlines()) if line.strip()), "no message")
        raise SystemExit(f"benchmarks.evaluation: {METHODS[method]} at {n:,} items failed (exit {res.returncode}): "
                         f"{reason.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(results: dict[tuple[int, str], dict], sizes: list[int]) -> list[str]:
    rows = ["| gallery = queries | method | seconds (median) | ns per query × gallery pair | peak RSS (MB) | "
            "R@1 / MAP@R (%) | vs AccuracyCalculator (time) |", "|---|---|---|---|---|---|---|"]
    for n in sizes:
        for method, name in METHODS.items():
            r = results.get((n, method))
            if r is None:
                continue
            t = statistics.median(r["seconds"])
            pml = results.get((n, "pml"))
            vs = f"{t / statistics.median(pml['seconds']):.2f}" if pml and method == "cmce_knn" else ""
            rows.append(f"| {n:,} | {name} | {t:.2f} | {1e9 * t / n / n:.2f} | {r['peak_rss_mb']:,.0f} | "
                        f"{100 * r['R@1']:.2f} / {100 * r['MAP@R']:.2f} | {vs} |")
    return rows


# leave-one-out: each query needs another item in the gallery (and, by --per-class >= 2, of its class)
gallery_sizes = comma_list(int_in("[2, inf)"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=gallery_sizes, default="10000,30000,100000")
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--per-class", type=int_in("[2, inf)"), default=20)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--dense-up-to", type=non_negative_int, default=30_000,
                   help="largest size the dense implementation runs at")
    p.add_argument("--device", choices=devices.CHOICES, default="cpu")
    p.add_argument("--no-write", action="store_true", help="print only, do not write BENCHMARKS.md")
    p.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    sizes = args.sizes
    if args.child:
        sys.stdout.write(json.dumps(run_method(args.child, sizes[0], args.dim, args.per_class, args.repeats,
                                               args.device)) + "\n")
        return
    device_or_error(p, args.device)  # here, not in each measuring process
    started = time.time()
    results = {}
    for n in sizes:
        for method in METHODS:
            if method == "dense" and n > args.dense_up_to:
                continue
            results[n, method] = in_child(method, n, args)
            sys.stderr.write(f"{n} {method}: {results[n, method]}\n")
    body = [f"{args.dim}-d unit embeddings, {args.per_class} a class, queries = gallery (own image left out); "
            f"device {args.device}; median of {args.repeats} repeats, each method and size in its own process.", ""]
    body += table(results, sizes)
    small, large = sizes[0], sizes[-1]
    for method in ("cmce_all", "cmce_knn"):
        if (small, method) in results and (large, method) in results and large > small:
            ratio = statistics.median(results[large, method]["seconds"]) / statistics.median(
                results[small, method]["seconds"])
            body += ["", f"{METHODS[method]}: time × {ratio:.1f} from {small:,} to {large:,} items, for × "
                     f"{(large / small) ** 2:.0f} pairs."]
    command = "python -m benchmarks.evaluation" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("dim", "per_class", "repeats", "dense_up_to", "device") and v != p.get_default(k))
    if sizes != gallery_sizes(p.get_default("sizes")):
        command += " --sizes " + ",".join(map(str, sizes))
    if args.no_write:
        sys.stdout.write("\n".join(body) + "\n")
    else:
        write_section(f"Evaluation at scale ({args.device})", command, body, time.time() - started)


if __name__ == "__main__":
    main()
