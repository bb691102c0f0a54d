"""Around a stage, for orchestrators that call stages directly (the KFP components): logs to stderr,
the stage itself, and its record published to the tracker (MLflow) when the run is tracked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmce.errors import command_begun, exit_process, first_line, set_up_command, threads_are_left
from cmce.records import StepRecord


def run_stage(stage: Callable[..., StepRecord | None], *args: Any, tracking: Any = None) -> StepRecord | None:
    """`stage(*args)`; then its record published under the parent run `tracking` names (a
    cmce.tracking.TrackingInfo or the path of its JSON file; tracking off when that says so or is None)."""
    set_up_command()
    command_begun()
    try:
        record = stage(*args)
    except Exception as err:
        if threads_are_left():  # an S3 download's workers left in a read (a trickling server): the interpreter's
            # exit would wait for them (the task hung as long as the server did)
            logging.getLogger("cmce").error("%s", first_line(err), exc_info=True)
            exit_process(1, at_once=True)
        raise
    if tracking is not None and record is not None:
        from cmce.tracking import publish

        publish(tracking if not isinstance(tracking, str) else Path(tracking), record)
    return record
