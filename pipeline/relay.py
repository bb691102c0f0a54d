"""What a local run writes: kfp.local relays every task's output through this process's standard output, tidied
here, and silenced once an ending signal has come; its warnings of cluster settings said once."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("pipeline")
LOCAL_NOOP_WARNINGS = (r"Task '.*': settings \[.*\] have no effect in the current local runner",
                       r"You may be attemping to run a task that uses custom or non-Python base image")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours its lines




@contextlib.contextmanager
def cluster_settings_said_once() -> Iterator[None]:
    """kfp.local runs each task in this Python environment, as designed: the images, resource requests and GPUs
    the tasks name are a cluster's. It warned of them twice a task (`localhost/cmce:cuda` on a CPU-only run read
    as a fault); one line says it for the run instead."""
    log.info("kfp.local runs every task in this Python environment; images, resource and GPU requests apply on a "
             "cluster")
    with warnings.catch_warnings():
        for noop in LOCAL_NOOP_WARNINGS:
            warnings.filterwarnings("ignore", message=noop)
        yield


class _StdoutWrapper:
    """A wrapper of standard output that changes what `write` does; everything else is the stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> object:  # flush, fileno, encoding, isatty, …
        return getattr(self._stream, name)


class SilencedOnStop(_StdoutWrapper):
    """This process's standard output during a local run, where kfp.local's threads relay each task's output and
    log its status: nothing is written once an ending signal has reached the process. A terminal's Ctrl-C reaches
    the tasks too, and a stopping task's traceback (or kfp.local's `Retrying in 30.0s`) was printed above stop()'s
    line whenever it came before the main thread ran its handler. The signal's C-level handler writes it to the
    wakeup pipe as the signal is taken, before any thread of this process runs Python again: it is read here."""

    def __init__(self, stream: object, wakeup: int, signums: tuple[int, ...]) -> None:
        super().__init__(stream)
        self._wakeup, self._signums, self._stopped = wakeup, set(signums), False

    def _stopping(self) -> bool:
        if not self._stopped:
            with contextlib.suppress(BlockingIOError, OSError):
                self._stopped = any(signum in self._signums for signum in os.read(self._wakeup, 512))
        return self._stopped

    def write(self, text: str) -> int:
        return len(text) if self._stopping() else self._stream.write(text)


class TidiedRelay(_StdoutWrapper):
    """This process's standard output during a local run, where kfp.local relays each task's output indented by 4
    spaces: each task's executor dumped its whole input as JSON (two thirds of `make run`'s 2,400 lines), and
    kfp.local's colour codes reached files and pipes. The dump is dropped (its lines only: any other line ends
    it) and colours kept for a terminal alone. Whole lines are written; a partial one waits for its end. Each
    thread has its own line and dump (kfp.local relays parallel branches from parallel threads)."""

    DUMP_START = "]: Got executor_input:"
    DUMP_LINE = re.compile(r"    [ {}]")  # the dump's own lines: indented JSON, or its braces

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lock = threading.Lock()
        self._threads: dict[int, list] = {}  # a thread's [partial line, in a dump]
        try:
            self._colour = stream.isatty()
        except (AttributeError, ValueError):
            self._colour = False

    def write(self, text: str) -> int:
        state = self._threads.setdefault(threading.get_ident(), ["", False])
        *lines, state[0] = (state[0] + text).split("\n")
        for line in lines:
            self._line(state, line + "\n")
        return len(text)

    def _line(self, state: list, line: str) -> None:
        if state[1] and self.DUMP_LINE.match(line):
            return
        state[1] = line.rstrip().endswith(self.DUMP_START)
        if not state[1]:
            with self._lock:
                self._stream.write(line if self._colour else ANSI.sub("", line))

    def flush(self) -> None:
        """This thread's line so far is written (not its indentation alone: its line follows). A logging
        handler flushes after each record: another thread's half line must wait for its end."""
        self._end(self._threads.get(threading.get_ident()))
        self._stream.flush()

    def flush_all(self) -> None:
        """As the relay ends: every thread's last line without its end."""
        for state in list(self._threads.values()):
            self._end(state)
        self._stream.flush()

    def _end(self, state: list | None) -> None:
        if state is not None and state[0].strip():
            self._line(state, state[0])
            state[0] = ""


@contextlib.contextmanager
def tidied_stdout() -> Iterator[None]:
    """sys.stdout is a TidiedRelay for the block."""
    stream = sys.stdout
    sys.stdout = relay = TidiedRelay(stream)
    try:
        yield
    finally:
        sys.stdout = stream
        with contextlib.suppress(Exception):  # its reader gone
            relay.flush_all()


@contextlib.contextmanager
def silenced_on_stop(signums: tuple[int, ...]) -> Iterator[None]:
    """sys.stdout is a SilencedOnStop for the block (main thread only: the wakeup pipe is the main thread's)."""
    if not signums or threading.current_thread() is not threading.main_thread():
        yield
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous_fd, stream = signal.set_wakeup_fd(write, warn_on_full_buffer=False), sys.stdout
    sys.stdout = SilencedOnStop(stream, read, signums)
    try:
        yield
    finally:
        sys.stdout = stream
        signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)
