"""A local run's workspace, and its clean ending: on an ending signal its task processes are stopped, the
workspace removed and the parent MLflow run closed; a workspace left by a run killed outright is removed by the
next run."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("pipeline")
WORKSPACE_PREFIX = "kfp-workspace-"
WORKSPACE_LOCK = ".cmce-run.lock"  # marks a workspace as a cmce run's; flock-held while the run lives


def hold(workspace: str) -> int:
    """The workspace's lock, taken before its file gets its name: another run never finds it free."""
    fd, unnamed = tempfile.mkstemp(dir=workspace)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(unnamed, os.path.join(workspace, WORKSPACE_LOCK))
    return fd


ROOT_LOCK = ".cmce-local-run.lock"


def hold_root(root: Path, shown: str) -> int:
    """The --root's lock, held while a local run writes there: a run's folder is told apart from others only as the
    newest there, so a second run at once reported the first's folder and results (exit 0), and a stop of one marked
    the other's MLflow run KILLED. Released by the OS however the run ends."""
    fd = os.open(root / ROOT_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"--root {shown}: another local run is writing there now; wait for it to end, or give "
                         "another --root") from None
    return fd


def remove_orphaned_workspaces() -> None:
    """The workspaces (with the tasks' temporary folders) of runs killed outright (SIGKILL, the OOM killer, a power
    cut) stayed in the temp folder for good. A run's workspace holds a lock while it lives: one whose lock can be
    taken belongs to no run, and is removed. Workspaces without the lock file (other KFP users') are left."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKSPACE_PREFIX}*"):
        try:
            fd = os.open(folder / WORKSPACE_LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run's
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s, the workspace of a run that was killed", folder)


@contextlib.contextmanager
def tasks_environment(workspace: str) -> Iterator[None]:
    """What the task processes inherit for the block: their temporary folder inside the workspace (this process's
    is fixed), and, where this process stops its tasks on Ctrl-C (stop), that they leave Ctrl-C to it
    (cmce.TASK_IGNORES_CTRL_C)."""
    from cmce import TASK_IGNORES_CTRL_C

    settings = {"TMPDIR": os.path.join(workspace, "tmp")}
    if signal.SIGINT in stopping.signals:
        settings[TASK_IGNORES_CTRL_C] = "1"
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Stopping:
    """What an ending signal must clean up: the workspace of the run under way, the parent MLflow run it opened
    (its folder is the one under root not in before); the signals taken."""
    workspace: str | None = None
    root: Path | None = None
    before: set[Path] = set()
    signals: tuple[int, ...] = ()


def close_parent_run(root: Path, before: set[Path], status: str,
                     warn: Callable[..., None] = log.warning) -> str:
    """End the parent MLflow run of the local run whose folder appeared under `root` (absent from `before`) as
    `status`, if it is still RUNNING: a run stopped or failed before its last task stayed RUNNING for good.
    Returns "; MLflow run ID marked STATUS" for the last line, or "" (none open, or the store cannot be reached:
    said in a warning)."""
    from cmce.tracking import TrackingInfo, end_if_running

    said = []
    for track in sorted(root.glob("*/start-tracking/tracking")):
        if track.parent.parent in before:
            continue
        try:
            info = TrackingInfo.read(track)
            if end_if_running(info, status):
                said.append(f"; MLflow run {info.run_id} marked {status}")
        except Exception as err:  # noqa: BLE001 - the run's own failure or stop is what to report
            from cmce.errors import first_line
            from cmce.redaction import redact

            warn("the MLflow run of %s stays open: %s", track.parent.parent.name, redact(first_line(err)))
    return "".join(said)


stopping = _Stopping()
STOP_WAIT_S = 10  # the tasks' own cleanups (a step's scratch files) before they are killed


def ending_signals() -> list[int]:
    """The signals the cmce commands stop on with their cleanups (SIGINT, SIGTERM, SIGHUP, SIGUSR1/2, and those
    ending the process where nobody else handles them)."""
    from cmce.errors import unclaimed_ending_signals

    return [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, *unclaimed_ending_signals()]


def stop(signum: int, _frame: object) -> None:
    """An ending signal during a local run: its task processes are stopped (each cleans up after itself), the
    workspace removed, one line logged, exit 128+signal. Here, not by unwinding: kfp.local's worker threads retry
    a stopped task after their back-off, and its pool waits for them (killed, the workspace stayed behind)."""
    from cmce.errors import LOG_FORMAT, OneLineFormatter, signal_name

    for sig in stopping.signals:  # a second signal must not cut this cleanup short
        signal.signal(sig, signal.SIG_IGN)
    # kfp.local's worker threads relay what the stopping tasks print and log their failure ("Retrying in 30.0s",
    # a task's traceback): a signal to the whole process group (Ctrl-C, twice) showed them above this one line.
    # Logging is off and stdout gone from here on; this function's own lines go straight to stderr.
    logging.disable(logging.CRITICAL)
    with contextlib.suppress(Exception):  # what the run printed before the signal still reaches its reader
        sys.stdout.flush()
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process, which ends below
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))

    def say(level: int, msg: str, *args: object) -> None:
        handler.handle(log.makeRecord(log.name, level, __file__, 0, msg, args, None))

    stopped = _stop_tasks()
    if stopping.workspace:
        shutil.rmtree(stopping.workspace, ignore_errors=True)
    closed = close_parent_run(stopping.root, stopping.before, "KILLED",
                              lambda *args: say(logging.WARNING, *args)) if stopping.root else ""
    say(logging.ERROR, "python -m pipeline run: interrupted (%s); %d task process(es) stopped, its temporary files "
        "removed%s", signal_name(signum), stopped, closed)
    os._exit(128 + signum)


def _stop_tasks() -> int:
    """SIGTERM to every task process, then SIGKILL to those still running after STOP_WAIT_S; watched until none
    runs, as a worker thread may start a branch's next task meanwhile. Returns how many there were."""
    import psutil

    def running(task: psutil.Process) -> bool:
        try:
            return task.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    me, seen = psutil.Process(), {}
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        try:
            new = [task for task in me.children(recursive=True) if task.pid not in seen]
        except psutil.Error:
            new = []
        for task in new:  # a shell's Python child is watched too: the shell may end first and orphan it
            seen[task.pid] = task
            with contextlib.suppress(psutil.Error):
                task.send_signal(signal.SIGTERM)
        alive = [task for task in seen.values() if running(task)]
        if not alive and not new:
            return len(seen)
        if time.monotonic() >= deadline:
            for task in alive:
                with contextlib.suppress(psutil.Error):
                    task.kill()
            psutil.wait_procs(alive, timeout=1)  # reaps those that are this process's children
            return len(seen)
        psutil.wait_procs(alive, timeout=0.2)
