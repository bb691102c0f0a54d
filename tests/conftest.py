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
