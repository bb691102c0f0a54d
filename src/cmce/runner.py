"""Around a stage, for orchestrators that call stages directly (the KFP components): logs to stderr,
the stage itself, and its record published to the tracker (MLflow) when the run is tracked."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmce.errors import (
    Terminated,
    command_begun,
    exit_process,
    first_line,
    set_up_command,
    signal_name,
    terminate_by_exception,
    threads_are_left,
)
from cmce.records import StepRecord


def run_stage(stage: Callable[..., StepRecord | None], *args: Any, tracking: Any = None) -> StepRecord | None:
    """`stage(*args)`; then its record published under the parent run `tracking` names (a
    cmce.tracking.TrackingInfo or the path of its JSON file; tracking off when that says so or is None).
    A stop signal (SIGTERM: a pod's end, or the local runner stopping its tasks; Ctrl-C) runs the stage's
    cleanups and ends the process with 128 + its number and one line: a SIGTERM left the task's temporary files
    in place, a Ctrl-C printed a traceback."""
    set_up_command()
    command_begun()
    handlers = terminate_by_exception()
    try:
        record = stage(*args)
    except (Terminated, KeyboardInterrupt) as err:  # outputs are written aside and renamed in: none is left half
        signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
        logging.getLogger("cmce").error("%s: interrupted (%s); each output is whole or not written",
                                        stage.__name__, signal_name(signum))
        exit_process(128 + signum)
    except Exception as err:
        if threads_are_left():  # an S3 download's workers left in a read (a trickling server): the interpreter's
            # exit would wait for them (the task hung as long as the server did)
            logging.getLogger("cmce").error("%s", first_line(err), exc_info=True)
            exit_process(1, at_once=True)
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if tracking is not None and record is not None:
        from cmce.tracking import publish

        publish(tracking if not isinstance(tracking, str) else Path(tracking), record)
    return record
