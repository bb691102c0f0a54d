"""Shared by the benchmark scripts: the hardware line, and appending a dated section to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    line = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)}"
    return line


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def append_section(title: str, command: str, body: list[str], wall_s: float, out: Path = ROOT / "BENCHMARKS.md"):
    """Print the section and append it to BENCHMARKS.md (written atomically)."""
    from cmce.storage import write_text

    section = "\n".join([
        f"## {title} — {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`; commit {commit()}; {hardware()}; wall {wall_s:.0f} s.",
        "",
        *body,
        "",
    ])
    sys.stdout.write(section + "\n")
    text = out.read_text() if out.exists() else "# Benchmarks\n\n"
    write_text(out, text + section + "\n")
