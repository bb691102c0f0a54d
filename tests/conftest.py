"""Shared fixtures: one smoke run of the whole method on sklearn digits, reused by several tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmce.config import load_config
from cmce.steps import RunLayout, run_all

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunLayout, dict]:
    out = tmp_path_factory.mktemp("smoke")
    cfg = load_config(SMOKE, {"output_dir": str(out)})
    metrics = run_all(cfg)
    return RunLayout(out, [m.name for m in cfg.gallery_models]), metrics


@pytest.fixture(scope="session")
def kfp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled-from-source pipeline run by kfp.local on the smoke params, 2 gallery models."""
    from pipeline.__main__ import build_parser, run_local

    root = tmp_path_factory.mktemp("kfp")
    args = build_parser().parse_args(["run", "--local", "--params", str(SMOKE), "--root", str(root)])
    return run_local(args)
