"""Reports from one metrics dict: metrics.json (read by DVC/MLflow/KFP), results.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cmce.storage import atomic_path, write_text  # noqa: E402

Metrics = dict[str, dict[str, float]]


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def markdown_table(metrics: Metrics) -> str:
    """Retrieval table (percent) and rejection table; config order as in the dict."""
    configs = [k for k in metrics if not k.startswith("rejection/")]
    cols = list(dict.fromkeys(c for k in configs for c in metrics[k] if c != "lone_queries"))
    lines = ["| configuration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in configs:
        lines.append(f"| {k} | " + " | ".join(_fmt(metrics[k].get(c, float("nan"))) for c in cols) + " |")
    if "rejection/uncertainty" in metrics:
        unc, rnd = metrics["rejection/uncertainty"], metrics["rejection/random"]
        rates = [k.split("@", 1)[1] for k in unc if k.startswith("retrieval_error@")]
        lines += [
            "",
            "Error (%) after rejecting the most uncertain gallery items vs the same number at random:",
            "",
            "| rejected | retrieval 1−R@1 (uncertainty) | (random) | verification 1−TAR (uncertainty) | (random) |",
            "|---|---|---|---|---|",
        ]
        for r in rates:
            row = [unc[f"retrieval_error@{r}"], rnd[f"retrieval_error@{r}"],
                   unc[f"verification_error@{r}"], rnd[f"verification_error@{r}"]]
            lines.append(f"| {100 * float(r):g}% | " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_recall(metrics: Metrics, path: Path) -> None:
    configs = [k for k in metrics if not k.startswith("rejection/")]
    ks = sorted(int(c[2:]) for c in metrics[configs[0]] if c.startswith("R@"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in configs:
        style = "-o" if k.startswith("asym_ensemble") else "--."
        ax.plot(ks, [100 * metrics[k][f"R@{x}"] for x in ks], style, label=k)
    ax.set(xscale="log", xticks=ks, xticklabels=[str(x) for x in ks], xlabel="K", ylabel="Recall@K (%)",
           title="Recall@K per configuration")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_rejection(metrics: Metrics, path: Path) -> None:
    unc, rnd = metrics["rejection/uncertainty"], metrics["rejection/random"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, proto, title in zip(axes, ("retrieval", "verification"), ("retrieval: 1 − R@1", "verification: 1 − TAR"),
                                strict=True):
        keys = [k for k in unc if k.startswith(f"{proto}_error@")]
        rates = [100 * float(k.split("@")[1]) for k in keys]
        ax.plot(rates, [100 * unc[k] for k in keys], "-o", label="most uncertain")
        ax.plot(rates, [100 * rnd[k] for k in keys], "--s", label="random")
        ax.set(xlabel="gallery items rejected (%)", ylabel="error (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_reports(metrics: Metrics, versions: dict[str, Any], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text(out_dir / "versions.json", json.dumps(versions, indent=2, sort_keys=True) + "\n")
    write_text(out_dir / "results.md", markdown_table(metrics))
    plot_recall(metrics, out_dir / "recall.png")
    if "rejection/uncertainty" in metrics:
        plot_rejection(metrics, out_dir / "rejection.png")
