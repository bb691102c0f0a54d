"""What a finished run tells its user: where its query model, index and dataset are, and the commands that search
and serve them (a new user had to guess which of a run's files was the query model)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def shown(path: Path | str) -> str:
    """A path as short as it stays exact: relative to the working folder when inside it (`make run`'s runs/kfp/…);
    an s3:// URI as it is."""
    if "://" in str(path):
        return shlex.quote(str(path))
    rel = os.path.relpath(path)
    return shlex.quote(str(path) if rel.startswith("..") else rel)


def _cmce() -> str:
    """How to call cmce from here: the script beside this interpreter (the project's venv)."""
    script = Path(sys.executable).parent / "cmce"
    return shown(script) if script.exists() else f"{shlex.quote(sys.executable)} -m cmce"


def next_steps(query: Path | str, index: Path | str, dataset: Path | str | None = None,
               edge: Path | str | None = None, gallery: Path | str | None = None) -> str:
    """The run's key outputs (the gallery: what the live-gallery operations' --gallery take) and the search and
    serve commands over them."""
    lines = ["key outputs:", f"  query model   {shown(query)}", f"  index         {shown(index)}"]
    lines += [f"  gallery       {shown(gallery)}"] if gallery is not None else []
    lines += [f"  dataset       {shown(dataset)}"] if dataset is not None else []
    lines += [f"  query ONNX    {shown(edge)}"] if edge is not None else []
    with_dataset = f" --dataset {shown(dataset)}" if dataset is not None else ""
    cmce, pair = _cmce(), f"--index {shown(index)} --query-model {shown(query)}"
    lines += ["next:", f"  {cmce} search {pair} --images IMAGE.png"]
    if dataset is not None:
        lines.append(f"  {cmce} search {pair}{with_dataset} --limit 3 --exclude-self")
    lines.append(f"  {cmce} serve {pair}{with_dataset} --port 8000")
    return "\n".join(lines) + "\n"
