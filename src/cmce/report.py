"""Reports from one metrics dict: metrics.json (read by KFP and MLflow), summary.json (the headline numbers DVC
shows), results.md, and the plots as PNGs with the CSV data each is drawn from."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator  # noqa: E402

from cmce.storage import atomic_path, write_text  # noqa: E402

Metrics = dict[str, dict[str, float]]


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def markdown_table(metrics: Metrics) -> str:
    """Retrieval table (percent) and rejection table; config order as in the dict."""
    configs = configurations(metrics)
    cols = list(dict.fromkeys(c for k in configs for c in metrics[k] if c != "lone_queries"))
    lines = ["| configuration | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in configs:
        lines.append(f"| {k} | " + " | ".join(_fmt(metrics[k].get(c, float("nan"))) for c in cols) + " |")
    if "rejection/uncertainty" in metrics:
        unc, rnd = metrics["rejection/uncertainty"], metrics["rejection/random"]
        rates = [k.split("@", 1)[1] for k in unc if k.startswith("retrieval_error@")]
        lines += [
            "",
            "Error (%) after rejecting the most uncertain gallery items vs the same number at random (1−R@1 is "
            "over the queries the kept gallery can still answer; the last columns count those it cannot):",
            "",
            "| rejected | retrieval 1−R@1 (uncertainty) | (random) | verification 1−TAR (uncertainty) | (random) "
            "| queries left unanswerable (uncertainty) | (random) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rates:
            row = [src.get(f"{what}@{r}", float("nan")) for what in ("retrieval_error", "verification_error",
                                                                       "unanswerable") for src in (unc, rnd)]
            lines.append(f"| {100 * float(r):g}% | " + " | ".join(_fmt(v) for v in row) + " |")
    if "index" in metrics:
        lines += ["", "The built index, searched as it is served (%): " + ", ".join(
            f"{name} {_fmt(value)}" for name, value in metrics["index"].items())]
    return "\n".join(lines) + "\n"


def configurations(metrics: Metrics) -> list[str]:
    """The retrieval configurations of a metrics dict, in its order (not the rejection curves or index checks)."""
    return [k for k in metrics if not k.startswith("rejection/") and k != "index"]


def served_ensemble(metrics: Metrics) -> str:
    """The configuration that is served: the ensemble of every gallery model."""
    return max((k for k in metrics if k.startswith("asym_ensemble/")), key=lambda k: int(k.split("/")[1]))


def summary(metrics: Metrics) -> dict[str, float]:
    """The headline numbers, flat and few (DVC's `metrics show/diff`, `exp show`, the MLflow parent run): the
    served ensemble's R@K and MAP@R, the query model alone, each member through its transformation, the
    rejection curves at their largest rate, and the built index's checks. Values that are not finite left out."""
    ens = served_ensemble(metrics)
    out = {f"ensemble/{m}": v for m, v in metrics[ens].items() if m.startswith(("R@", "MAP@R"))}
    if "sym_query" in metrics:
        out["query_only/R@1"] = metrics["sym_query"]["R@1"]
    out |= {f"{k}/R@1": metrics[k]["R@1"] for k in metrics if k.startswith("asym/")}
    if "rejection/uncertainty" in metrics:
        unc, rnd = metrics["rejection/uncertainty"], metrics["rejection/random"]
        top = max((k for k in unc if k.startswith("retrieval_error@")), key=lambda k: float(k.split("@")[1]))
        rate = top.split("@")[1]
        out |= {f"rejection/{proto}_error@{rate}/{how}": src[f"{proto}_error@{rate}"]
                for proto in ("retrieval", "verification") for how, src in (("uncertainty", unc), ("random", rnd))}
        out |= {f"rejection/unanswerable@{rate}/{how}": src.get(f"unanswerable@{rate}", float("nan"))
                for how, src in (("uncertainty", unc), ("random", rnd))}
    out |= {f"index/{m}": v for m, v in metrics.get("index", {}).items()}
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def recall_rows(metrics: Metrics) -> list[dict[str, Any]]:
    """recall.csv: one row per K, one column per configuration (percent), and `served`, a copy of the served
    ensemble's under a name that does not depend on the number of gallery models: DVC plots it against K."""
    configs, served = configurations(metrics), served_ensemble(metrics)
    ks = sorted(int(c[2:]) for c in metrics[configs[0]] if c.startswith("R@"))
    return [{"K": k, "served": round(100 * metrics[served][f"R@{k}"], 4),
             **{c: round(100 * metrics[c][f"R@{k}"], 4) for c in configs}} for k in ks]


SELECTIONS = ("uncertainty", "random")  # which gallery items are rejected: the most uncertain, or chosen at random
# rejection.csv's columns: those of rejection_rows, the header alone when nothing was rejected (one gallery model)
REJECTION_COLUMNS = ["rejected", *(f"{proto}_{how}" for proto in ("retrieval", "verification") for how in SELECTIONS),
                     *(f"unanswerable_{how}" for how in SELECTIONS)]


def rejection_rows(metrics: Metrics) -> list[dict[str, Any]]:
    """rejection.csv: one row per rejection rate (percent), error (percent) by protocol and selection."""
    rates = [k.split("@", 1)[1] for k in metrics["rejection/uncertainty"] if k.startswith("retrieval_error@")]
    rows = []
    for r in rates:
        row = {"rejected": round(100 * float(r), 4)}
        for column in REJECTION_COLUMNS[1:]:
            what, how = column.rsplit("_", 1)
            src = metrics[f"rejection/{how}"]  # unanswerable@: absent from reports written before it was counted
            value = src.get(f"{what}@{r}", float("nan")) if what == "unanswerable" else src[f"{what}_error@{r}"]
            row[column] = round(100 * value, 4)
        rows.append(row)
    return rows


def _csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# every configuration its own colour, marker and line style: with a dozen lines, colour alone repeats and
# a line drawn over another (asym/<m> under asym_ensemble/1 when they are equal) would vanish
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")
DODGE = 0.012  # log2 units between neighbouring configurations' points


def plot_recall(metrics: Metrics, path: Path) -> None:
    _save(recall_figure(metrics), path)


def recall_figure(metrics: Metrics) -> Any:
    configs = configurations(metrics)
    ks = sorted(int(c[2:]) for c in metrics[configs[0]] if c.startswith("R@"))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    colours = plt.get_cmap("tab20").colors
    for i, k in enumerate(configs):
        # each configuration nudged sideways by a few percent of K, so equal curves sit side by side
        dodge = 2 ** (DODGE * (i - (len(configs) - 1) / 2))
        ax.plot([x * dodge for x in ks], [100 * metrics[k][f"R@{x}"] for x in ks], color=colours[i % len(colours)],
                marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                linewidth=2.2 if k == served_ensemble(metrics) else 1.2, markersize=6,
                markerfacecolor="none" if i % 2 else None, label=k)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_major_formatter(FixedFormatter([str(x) for x in ks]))
    ax.xaxis.set_minor_locator(NullLocator())  # else the log axis labels minor ticks as 3×10⁰
    ax.set(xlabel="K", ylabel="Recall@K (%)", title="Recall@K per configuration (bold: the served ensemble)")
    _span(ax, [100 * metrics[k][f"R@{x}"] for k in configs for x in ks])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: hides no line
    ax.grid(alpha=0.3)
    return fig


MIN_SPAN = 10.0  # percentage points: a y axis never spans less, so a 0.1-point wiggle looks like one


def _span(ax: Any, values: list[float]) -> None:
    """y limits around the finite values, at least MIN_SPAN points wide, inside [0, 100]."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    pad = max(MIN_SPAN - (hi - lo), 0) / 2 + 1.0
    lo, hi = max(lo - pad, 0.0), min(hi + pad, 100.0)
    if hi - lo < MIN_SPAN:  # pressed against 0 or 100
        lo, hi = (0.0, MIN_SPAN) if lo == 0.0 else (100.0 - MIN_SPAN, 100.0)
    ax.set_ylim(lo, hi)


def rejection_figure(metrics: Metrics, far: float | None = None) -> Any:
    unc, rnd = metrics["rejection/uncertainty"], metrics["rejection/random"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    verification = "verification: 1 − TAR" + (f" at FAR = {far:g}" if far is not None else "")
    retrieval = "retrieval: 1 − R@1 (queries still answerable)"
    for ax, proto, title in zip(axes, ("retrieval", "verification"), (retrieval, verification), strict=True):
        keys = [k for k in unc if k.startswith(f"{proto}_error@")]
        rates = [100 * float(k.split("@")[1]) for k in keys]
        ax.plot(rates, [100 * unc[k] for k in keys], "-o", label="most uncertain")
        ax.plot(rates, [100 * rnd[k] for k in keys], "--s", label="random")
        ax.set(xlabel="gallery items rejected (%)", ylabel="error (%)", title=title)
        _span(ax, [100 * src[k] for src in (unc, rnd) for k in keys])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Served ensemble: error vs rejection ({served_ensemble(metrics)})", fontsize=10)
    return fig


def no_rejection_figure() -> Any:
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.axis("off")
    ax.text(0.5, 0.5, "No rejection by uncertainty: the ensemble has one gallery member\n"
            "(uncertainty needs at least 2)", ha="center", va="center", fontsize=11)
    return fig


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)


def write_reports(metrics: Metrics, versions: dict[str, Any], out_dir: str | Path,
                  rejection_far: float | None = None) -> None:
    """metrics.json (everything), summary.json (the headline numbers), results.md, and each plot as a PNG and
    as the CSV it is drawn from (what DVC overlays across revisions and experiments)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text(out_dir / "summary.json", json.dumps(summary(metrics), indent=2) + "\n")
    write_text(out_dir / "versions.json", json.dumps(versions, indent=2, sort_keys=True) + "\n")
    write_text(out_dir / "results.md", markdown_table(metrics))
    write_text(out_dir / "recall.csv", _csv(recall_rows(metrics)))
    plot_recall(metrics, out_dir / "recall.png")
    # with one gallery member there is no uncertainty to reject by: the files still say so, so that no earlier run's
    # curves are left beside these numbers and a pipeline finds every output it declares (DVC failed without them)
    rejection = "rejection/uncertainty" in metrics
    write_text(out_dir / "rejection.csv", _csv(rejection_rows(metrics) if rejection else [], REJECTION_COLUMNS))
    _save(rejection_figure(metrics, rejection_far) if rejection else no_rejection_figure(), out_dir / "rejection.png")
