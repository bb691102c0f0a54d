"""Library errors shown as one line: the clients cmce calls (torch, arrow, MLflow, faiss) raise messages that run
to several lines, sometimes a server's whole reply or a C++ stack."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator

# the packages of the clients a step talks to (MLflow, its database and HTTP stacks, boto): their errors are bad
# input or an unreachable service, told in one line; cmce's own arrive as ValueError or OSError
CLIENT_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3", "botocore", "boto3",
                  "google.protobuf")  # MLflow parses a server's JSON with protobuf: a bad answer raises its ParseError


def from_client(err: BaseException) -> bool:
    return type(err).__module__.startswith(CLIENT_MODULES)


def causes(err: BaseException | None, limit: int = 8) -> Iterator[BaseException]:
    """`err` and the errors behind it, nearest first: s3transfer's `last_exception` (its RetriesExceededError holds
    the real one there), else `__cause__`, else `__context__`; at most `limit` (a chain may loop)."""
    for _ in range(limit):
        if err is None:
            return
        yield err
        err = getattr(err, "last_exception", None) or err.__cause__ or err.__context__


def first_line(err: BaseException, limit: int = 300) -> str:
    """The line that says what went wrong (the first), cut to `limit` characters at a word's end; the type when
    it is empty."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    if len(lines[0]) <= limit:
        return lines[0]
    cut = lines[0][:limit - 1]  # at a word's end: a word cut short reads as another word
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + "…"


def joined_lines(err: BaseException, limit: int = 300) -> str:
    """All of a short multi-line message on one line: torch's load_state_dict puts its heading on the first
    line and the keys at fault on the next ones."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return (text[:limit - 1] + "…" if len(text) > limit else text) or type(err).__name__


def last_line(err: BaseException, limit: int = 300) -> str:
    """faiss puts its stack first and the reason last."""
    lines = str(err).strip().splitlines()
    return lines[-1][:limit] if lines else type(err).__name__


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that a killed step runs
    its cleanups (temporary files, scratch downloads) instead of dying with them in place."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    """SIGTERM, …; a real-time signal, which Python's enum names only at the ends, as SIGRTMIN+n."""
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}" if hasattr(signal, "SIGRTMIN") else f"signal {signum}"


_received: list[int] = []  # the ending signals raise_terminated has taken in this command


def raise_terminated(signum: int, _frame: object) -> None:
    _received.append(signum)
    raise Terminated(signum)


def received_signal() -> int | None:
    """The first ending signal of this command, even where its Terminated was lost: raised inside a C extension's
    import (pandas, lazily imported by pyarrow) it was swallowed, the step wrote its output and exited 0, or
    it surfaced later as an unrelated error (`partially initialized module 'pandas'`) with a traceback."""
    return _received[0] if _received else None


def raise_if_terminated() -> None:
    """Before an output is renamed in: a step whose stop signal was swallowed commits nothing."""
    if _received:
        raise Terminated(_received[0])


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Inside the block a first ending signal is only recorded, and raised once it ends: for a short commit that,
    cut half-way, would leave neither the old output nor the new one (an s3:// folder: S3 has no rename). A second
    signal is raised at once (a commit crawling over a 60 B/s link held two Ctrl-Cs and a SIGTERM for minutes), and
    once one is recorded no request is retried (stop_pending). Only the main thread can change handlers; elsewhere
    the block runs as is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(signum: int, _frame: object) -> None:
        _held.append(signum)
        if len(_held) > 1:  # asked twice: stop now, whatever the commit leaves (the last line says which)
            raise_terminated(_held[0], _frame)

    swapped = {}
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(signum) in (raise_terminated, signal.default_int_handler):
                swapped[signum] = signal.signal(signum, record)
    try:
        yield
    finally:
        for signum, handler in swapped.items():
            signal.signal(signum, handler)
        _received.extend(s for s in _held if s not in _received)
        _held.clear()
    raise_if_terminated()


_held: list[int] = []  # the signals stop_deferred recorded in the block under way


def stop_pending() -> bool:
    """An ending signal was taken, raised or held by stop_deferred, or a Ctrl-C is unwinding (stopping_on): a failed
    request is not retried."""
    return bool(_received or _held or _interrupted)


_interrupted: list[bool] = []  # a KeyboardInterrupt is unwinding: Python's own SIGINT handler records nothing


def stopping_on(err: BaseException) -> None:
    """Called where a stop (`Terminated` or `KeyboardInterrupt`) is caught on its way out, with work left running
    in other threads (a download's workers): from now on stop_pending() holds for them."""
    if isinstance(err, KeyboardInterrupt):
        _interrupted.append(True)


def not_ignored(signums: object) -> list[int]:
    """The signals of `signums` the caller has not set to be ignored: `nohup` ignores SIGHUP (and `trap '' TERM`
    SIGTERM) so that a command outlives its terminal; a handler of cmce's stopped it all the same."""
    import signal

    return [signum for signum in signums if signal.getsignal(signum) is not signal.SIG_IGN]


_left_running: list[bool] = []  # threads were left in a request (a silent or trickling server): nothing joins them


def threads_left_running() -> None:
    """Worker threads were left blocked in a read: this command's process ends without the interpreter's shutdown,
    which would join them (and wait as long as the server trickles)."""
    _left_running.append(True)


def threads_are_left() -> bool:
    return bool(_left_running)


def exit_process(code: int, at_once: bool = False) -> None:
    """End a command's process with `code`. After a stop (128 + signal), or `at_once`, without the interpreter's
    shutdown, its cleanups done: a transfer's worker thread still in a read of a slow download (s3transfer's, or
    MLflow's) held the exit until that read ended, 112 s after a Ctrl-C on a 1.5 KB/s link; a thread left in C++
    code aborted it on its way back. Nothing such a thread does is wanted any more."""
    import os

    if code < 128 and not at_once and not _left_running:
        _exit_code[:] = [code]  # for a `starting` process, its exit handlers run, then it ends: no teardown
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or its reader gone
            stream.flush()
    logging.shutdown()
    os._exit(code)


@contextlib.contextmanager
def starting(command: str) -> Iterator[None]:
    """Around a command's whole process: its libraries (torch, pyarrow) take seconds to import, before its main
    can catch anything, and a Ctrl-C or a memory limit (`ulimit -v`) hit there was a 20–33-line traceback. Told in
    one line instead (with --debug, the traceback). A stop main caught itself never reaches here."""
    _begun.clear()
    _finished.clear()
    _stop_outside_main()
    drop_empty_thread_settings()  # before torch loads libgomp, which warns about them and goes on
    if (bad := thread_settings_error() or open_file_limit_error()) is not None:
        log_to_stderr()
        logging.getLogger("cmce").error("%s: %s", command, bad)
        exit_process(2)
    try:
        yield
    except Terminated as err:  # while the libraries load, or before main took the signals itself
        if "--debug" in sys.argv:
            raise
        log_to_stderr()
        logging.getLogger("cmce").error("%s: interrupted (%s)%s", command, signal_name(err.signum),
                                        "" if _begun else " while starting; nothing was done")
        exit_process(128 + err.signum)
    except (KeyboardInterrupt, MemoryError, ImportError) as err:
        # under a memory limit a shared library fails to load (`libtorch_cpu.so: failed to map segment from shared
        # object`) or Python runs out; any other ImportError is a broken installation: its traceback is wanted
        unmapped = isinstance(err, ImportError) and "failed to map segment" in str(err)
        if "--debug" in sys.argv or (isinstance(err, ImportError) and not unmapped):
            raise
        log_to_stderr()
        say = logging.getLogger("cmce").error
        if isinstance(err, KeyboardInterrupt):  # after main began: a second Ctrl-C during its cleanup, say
            say("%s: interrupted (SIGINT)%s", command, "" if _begun else " while starting; nothing was done")
            exit_process(130)
        if _begun and not unmapped:
            say("%s: out of memory", command)
        else:
            say("%s: out of memory while loading its libraries%s; is a memory limit (ulimit -v) set too low?",
                command, f" ({first_line(err)})" if unmapped else "")
        exit_process(1, at_once=True)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
THREAD_COUNTS = re.compile(r"[1-9][0-9]{0,5}(,[1-9][0-9]{0,5})*")  # OpenMP's form: a positive count per nesting level


MIN_OPEN_FILES = 64  # the libraries, a step's inputs and outputs, its loader workers' pipes, with room to spare


def open_file_limit_error() -> str | None:
    """Why the process cannot have the open files a step needs, or None. Under `ulimit -n 20` a step with loader
    workers failed after its libraries loaded, with 117 worker tracebacks (exit 1); under 7, `[Errno 24] Too many
    open files` naming nothing. A soft limit below MIN_OPEN_FILES is raised to it where the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= MIN_OPEN_FILES:
        return None
    if hard == resource.RLIM_INFINITY or hard >= MIN_OPEN_FILES:
        resource.setrlimit(resource.RLIMIT_NOFILE, (MIN_OPEN_FILES, hard))
        return None
    return (f"the open-file limit is {soft} (ulimit -n); a cmce step needs at least {MIN_OPEN_FILES} (its libraries, "
            "inputs, outputs and loader workers); raise it")


def drop_empty_thread_settings() -> None:
    """An empty OMP_NUM_THREADS or MKL_NUM_THREADS means the libraries' default: removed from the environment
    before they load (libgomp warned about it twice, as about `abc`)."""
    for name in THREAD_VARIABLES:
        if name in os.environ and not os.environ[name].strip():
            del os.environ[name]


def thread_settings_error() -> str | None:
    """Why OMP_NUM_THREADS or MKL_NUM_THREADS cannot be used, or None (unset or empty: the libraries' default):
    libgomp printed `Invalid value for environment variable OMP_NUM_THREADS` twice and ran with its own count (the
    thread count decides a model's bytes)."""
    for name in THREAD_VARIABLES:
        raw = os.environ.get(name, "").strip()
        if raw and not THREAD_COUNTS.fullmatch(raw):
            return (f"environment variable {name}={os.environ[name]!r}: a thread count from 1 to 999999 expected "
                    "(or unset it)")
    return None


_begun: list[bool] = []  # the command's main has begun (its libraries are loaded)


def command_begun() -> None:
    """At the start of a command's main (tests and callers run many in one process): it has left no thread yet."""
    _begun.append(True)
    _finished.clear()
    _left_running.clear()


_finished: list[bool] = []  # the command's main has given back the signals it took: its work is done


def command_finished() -> None:
    """Called by a command's main as it gives back the signals it took (its outputs are in place, or refused)."""
    _finished.append(True)


# the signals whose default action ends the process (SIGUSR1 left a half-written temporary), taken by a command's
# main; the others (SIGALRM: a caller may time the command with it) are taken only where nobody handles them
TERMINATING_NAMES = ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")


def terminate_by_exception() -> dict[int, object]:
    """The TERMINATING_NAMES signals raise Terminated in the main thread (as SIGINT raises KeyboardInterrupt), so
    the cleanups run; returns the handlers they replace, restored when the command ends."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    ending = (*(getattr(signal, name) for name in TERMINATING_NAMES),
              *unclaimed_ending_signals())  # SIGALRM, SIGXCPU, …: unless a caller handles them
    return {signum: signal.signal(signum, raise_terminated) for signum in not_ignored(ending)}


def _stop_outside_main() -> None:
    """A process's handler of SIGINT and TERMINATING_NAMES outside its command's main, where the caller left
    them to their default. Before main takes them (the libraries load for seconds) a stop raises, and is told
    in one line by `starting`. After main gave them back, the work is done: a stop there ended the process with
    143 and no line, its outputs already published; it is said, and the process ends at once (a hang in a
    cleanup, a thread joined at exit, stays stoppable). The interpreter's own teardown, where no Python handler
    runs (torch's: half a second), is skipped once the exit handlers have run (see exit_process)."""
    import signal

    def outside_main(signum: int, _frame: object) -> None:
        if not _finished:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise_terminated(signum, _frame)
        logging.getLogger("cmce").error("cmce: interrupted (%s) as the command ended, after its work; each output "
                                        "is whole or not written", signal_name(signum))
        exit_process(128 + signum, at_once=True)

    for name in ("SIGINT", *TERMINATING_NAMES):
        signum = getattr(signal, name)
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, outside_main)

    def end_without_teardown() -> None:
        if _exit_code:  # exit_process began the exit: nothing the teardown does is wanted
            exit_process(_exit_code[0], at_once=True)

    import atexit

    atexit.register(end_without_teardown)  # the first registered runs last: after the libraries' own exit handlers


_exit_code: list[int] = []  # the status exit_process is ending the process with


def forget_signals() -> None:
    """A new command in this process (tests run many) starts with no signal taken."""
    _received.clear()
    _interrupted.clear()


def unclaimed_ending_signals() -> list[int]:
    """The other signals whose default action ends the process (SIGALRM, a CPU-time limit's SIGXCPU, the
    profiling timers, SIGPWR, SIGSTKFLT, SIGIO, SIGSYS, SIGTRAP, SIGABRT sent by `kill`, the real-time signals), where
    nobody but cmce handles them: a caller's own handler (a SIGALRM watchdog around a command) is kept. SIGXFSZ
    Python ignores already: the write then fails with EFBIG, reported as such. Faults (SIGSEGV, SIGBUS, …) are
    not taken: a Python handler cannot resume after them."""
    import signal

    names = ("SIGALRM", "SIGXCPU", "SIGVTALRM", "SIGPROF", "SIGPWR", "SIGQUIT", "SIGSTKFLT", "SIGIO", "SIGSYS",
             "SIGTRAP", "SIGABRT")  # SIGQUIT: Ctrl-backslash; SIGIO is SIGPOLL; SIGABRT as a watchdog's kill sends it
    # (an abort() in C code still ends the process: abort() raises SIGABRT again once a handler returns)
    found = [getattr(signal, name) for name in names if hasattr(signal, name)]
    if hasattr(signal, "SIGRTMIN"):  # the real-time signals end a process by default too (`kill -s RTMIN+2`)
        found += range(signal.SIGRTMIN, signal.SIGRTMAX + 1)
    return [signum for signum in found if signal.getsignal(signum) in (signal.SIG_DFL, raise_terminated)]


# C0 and C1 controls, and what str.splitlines() or a terminal also reads as a line break or a reordering: NEL,
# the line and paragraph separators, the bidirectional overrides and isolates
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape_controls(text: str) -> str:
    """Control characters as Python escapes: a newline in a path or key cannot forge a second log line, nor a
    terminal escape reach the operator's terminal."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    """Every log record one line: its message's control characters escaped (a traceback, when logged, follows);
    no credential in it, nor in its traceback (cmce.redaction); a scratch copy of an s3:// file named by its URI
    (`wrote /tmp/cmce-scratch-…/run1/data/dataset.parquet` named a file removed as the command ended)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        storage = sys.modules.get("cmce.storage")  # loaded by every command that has scratch copies
        message = storage.restore_uris(record.message) if storage is not None else record.message
        record.message = escape_controls(message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        from cmce.redaction import conceal

        return conceal(super().format(record))


def log_to_stderr() -> None:
    """The commands' logging: INFO and up, one line per record, on standard error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def set_up_command() -> None:
    """What every entry point (cmce, cmce.dvc_stage, the KFP components' runner, `python -m pipeline`) sets first."""
    log_to_stderr()
    deprecations_stay_warnings()
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a dozen "setup plugin" lines each time a store opens


def deprecations_stay_warnings() -> None:
    """Under PYTHONWARNINGS=error (or -W error, as CI jobs set it) a dependency's deprecation notice became an
    error: SQLAlchemy's, raised inside MLflow's registry, failed every `models:/` lookup. Deprecations are not the
    user's input, nor anything they can change: they are ignored, as Python does by default; other warnings
    keep the action the user asked for."""
    if any(action == "error" for action, *_ in warnings.filters):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
