"""Shared by the benchmark scripts: the hardware line, and writing a dated section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.args import config_override

ROOT = Path(__file__).resolve().parents[1]
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_config_options(p: argparse.ArgumentParser, set_help: str = "config override") -> None:
    """--config (default params.yaml) and repeatable --set KEY=VALUE, read back by `cmce.overrides.parse_overrides`."""
    p.add_argument("--config", default=str(ROOT / "params.yaml"))
    p.add_argument("--set", action="append", default=[], type=config_override, metavar="KEY=VALUE", help=set_help)


def config_shown(path: str) -> str:
    """A config path as a recorded command names it: relative to the project root when inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    load = os.getloadavg()[0]
    line = (f"{cpu_name()}, {os.cpu_count()} CPU cores (load average {load:.1f} when written), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


STARTED_AT = commit()  # read when a benchmark starts: its section names the code it ran, even if HEAD moves meanwhile


SHOWN = ("R@1", "MAP@R", "TAR@FAR=0.001")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    """mean ± std over seeds of fractions, in %."""
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def shown(metrics: dict[str, float]) -> str:
    """One configuration's R@1 / MAP@R / TAR@FAR=0.001 in %, as a table cell."""
    return " / ".join(f"{100 * metrics[x]:.2f}" for x in SHOWN)


def write_section(title: str, command: str, body: list[str], wall_s: float, out: Path = ROOT / "BENCHMARKS.md",
                  write: bool = True) -> str:
    """Print the section and (unless `write` is false) write it to BENCHMARKS.md in place of the section with the
    same title (any date, any command), or at the end when there is none: one current section per benchmark, the
    file regenerated rather than appended to; earlier results, other commands' included, stay in its git history.
    Written atomically."""
    from cmce.storage import write_text

    section = "\n".join([
        f"## {title} — {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`; commit {STARTED_AT}; {hardware()}; wall {wall_s:.0f} s.",
        "",
        *body,
    ])
    sys.stdout.write(section + "\n")
    if not write:
        return section
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")] + [len(lines)]
    same = [(a, b) for a, b in zip(heads, heads[1:], strict=False) if lines[a].startswith(f"## {title} — ")]
    if same:
        for a, b in reversed(same[1:]):  # a file written before one section per title: its other copies go too
            del lines[a:b]
        a, b = same[0]
        lines[a:b] = section.split("\n") + ([""] if b < len(lines) else [])
        text = "\n".join(lines).rstrip("\n") + "\n"
    else:
        text = "\n".join(lines) + "\n\n" + section + "\n"
    write_text(out, text)
    return section
