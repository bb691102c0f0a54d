"""Around a stage, for orchestrators that call stages directly (the KFP components): logs to stderr,
the stage itself, and its record published to the tracker (MLflow) when the run is tracked."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmce.records import StepRecord

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_stage(stage: Callable[..., StepRecord | None], *args: Any, tracking: Any = None) -> StepRecord | None:
    """`stage(*args)`; then its record published under the parent run `tracking` names (a
    cmce.tracking.TrackingInfo or the path of its JSON file; tracking off when that says so or is None)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    record = stage(*args)
    if tracking is not None and record is not None:
        from cmce.tracking import publish

        publish(tracking if not isinstance(tracking, str) else Path(tracking), record)
    return record
