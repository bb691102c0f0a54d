"""What a finished local run tells its user: which of the task folders kfp.local named (`train-model/model`,
`for-loop-1-iteration-0/train-model-2/model`) holds the query model, the index and the dataset, and the commands
that search and serve them. A new user had to guess which `model` was the query model: a wrong guess was refused
only after loading (`index was built for query model …`)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path


def _find(run_dir: Path, pattern: str) -> Path | None:
    return next(iter(sorted(run_dir.rglob(pattern))), None)


def query_model_of(index: Path, run_dir: Path) -> Path | None:
    """The run's checkpoint the index was built for: the one whose sha256 its meta.json records."""
    from cmce.storage import file_sha256

    try:
        wanted = json.loads((index / "meta.json").read_text())["query_model_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((p for p in sorted(run_dir.rglob("model")) if p.is_file() and file_sha256(p) == wanted), None)


def _shown(path: Path) -> str:
    """A path as short as it stays exact: relative to the working folder when inside it (`make run`'s runs/kfp/…)."""
    rel = os.path.relpath(path)
    return shlex.quote(str(path) if rel.startswith("..") else rel)


def _cmce() -> str:
    """How to call cmce from here: the script beside this interpreter (the project's venv), shown relative."""
    script = Path(sys.executable).parent / "cmce"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m cmce"
    return _shown(script)


def next_steps(run_dir: Path) -> str:
    """The run's key outputs and the search and serve commands over them; "" when the run built no index (a
    lifecycle pipeline)."""
    index = _find(run_dir, "build-index*/index")
    query = query_model_of(index, run_dir) if index is not None else None
    if index is None or query is None:
        return ""
    dataset = _find(run_dir, "prepare-data*/dataset")
    edge = _find(run_dir, "export-query*/edge_model")
    lines = ["key outputs:", f"  query model   {_shown(query)}", f"  index         {_shown(index)}"]
    lines += [f"  dataset       {_shown(dataset)}"] if dataset is not None else []
    lines += [f"  query ONNX    {_shown(edge)}"] if edge is not None else []
    with_dataset = f" --dataset {_shown(dataset)}" if dataset is not None else ""
    cmce, pair = _cmce(), f"--index {_shown(index)} --query-model {_shown(query)}"
    lines += ["next:", f"  {cmce} search {pair} --images IMAGE.png"]
    if dataset is not None:
        lines.append(f"  {cmce} search {pair}{with_dataset} --limit 3 --exclude-self")
    lines.append(f"  {cmce} serve {pair}{with_dataset} --port 8000")
    return "\n".join(lines) + "\n"
