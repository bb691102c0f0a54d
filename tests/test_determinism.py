"""Same config + seed on the same machine gives identical results: a second `cmce run` of the smoke
config, in a fresh process with a different hash seed, reproduces the session's smoke run file for file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, SMOKE


def test_same_config_and_seed_give_identical_metrics_and_artifacts(smoke_run, tmp_path):
    lay, metrics = smoke_run
    out = tmp_path / "again"
    # a different PYTHONHASHSEED: no result may depend on set or dict-of-str iteration order
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "cmce.cli", "run", "--config", str(SMOKE), "--set",
                          f"output_dir={out}"], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    query = out / "models" / "query.pt"  # the smoke config's query model, where the run says it is
    assert f"query model   {query}\n" in res.stderr and f"--index {out / 'index'} --query-model {query}" in res.stderr
    assert f"gallery       {out / 'gallery.parquet'}\n" in res.stderr

    assert (out / "eval" / "metrics.json").read_bytes() == (lay.eval_dir / "metrics.json").read_bytes()
    assert json.loads((out / "eval" / "metrics.json").read_text()).keys() == metrics.keys()
    # every artifact byte for byte: checkpoints (hence every recorded sha256), embeddings, index, plots
    first = {p.relative_to(lay.root) for p in lay.root.rglob("*") if p.is_file()}
    again = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert again == first
    differ = [str(rel) for rel in sorted(again) if (out / rel).read_bytes() != (lay.root / rel).read_bytes()]
    assert differ == ["eval/versions.json"]  # it records the gallery file's path, i.e. the output folder
    versions = [json.loads((d / "eval" / "versions.json").read_text()) for d in (lay.root, out)]
    assert [{k: v for k, v in x.items() if k != "gallery"} for x in versions] == [
        {k: v for k, v in versions[0].items() if k != "gallery"}] * 2
