"""A blocking client call with a deadline on its whole answer. A server that sends its answer a byte (or a header
line) at a time never trips a read timeout, each read getting something: an S3 listing or an MLflow registry read
held a step, or `cmce serve`'s start, until it was killed. The call runs in a daemon thread; past the deadline it
is left to its read, and the command exits without the interpreter's shutdown (errors.threads_left_running)."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from cmce.errors import stopping_on, threads_left_running

T = TypeVar("T")


def within(seconds: float, call: Callable[[], T], timed_out: Callable[[], BaseException]) -> T:
    """`call()`'s result or error, or `timed_out()` raised once `seconds` have passed without one."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            box["error"] = err
        finally:
            done.set()

    context = contextvars.copy_context()  # what the caller set (an S3 endpoint for this command) holds there too
    threading.Thread(target=context.run, args=(run,), name="cmce-request", daemon=True).start()
    try:
        finished = done.wait(seconds)
    except BaseException as err:  # a stop: the call's retries end with it
        stopping_on(err)
        threads_left_running()
        raise
    if not finished:
        threads_left_running()
        raise timed_out()
    if "error" in box:
        raise box["error"]
    return box["value"]
