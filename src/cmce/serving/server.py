"""`cmce serve`: load the query model and the index, bind the port, then run uvicorn with the reload poller.

Everything that can be wrong with the inputs (a missing or foreign index, a bad checkpoint, a taken port) is
found before the server starts, so the command fails with one line instead of a server that cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cmce.data.codec import pixel_limit
from cmce.data.readers import class_names
from cmce.errors import Terminated, escape_controls, forget_signals, not_ignored, unclaimed_ending_signals
from cmce.index import LoadedIndex
from cmce.serving.app import create_app
from cmce.serving.queries import Limits
from cmce.serving.state import Holder, QueryModelSource

log = logging.getLogger(__name__)
# a client sends a request head (a few hundred bytes) in well under a second, even on a slow mobile link; a
# connection that has not within 10 s is one of many held open to exhaust the server's file descriptors
HEAD_TIMEOUT_S = 10.0
# after the head deadline a body must keep arriving at this mean rate (as Apache's mod_reqtimeout MinRate): a body
# trickled a byte every few seconds met a per-chunk deadline and held its connection for ever
MIN_BODY_BYTES_PER_S = 500
# each piece of a body (a chunk, or one read of a sized body) costs the event loop its parsing and a copy: 2 MB sent in
# one-byte chunks (12 MB on the wire) took 10-14 s of CPU, and /healthz waited seconds. Past BODY_PIECES_FREE pieces a
# body must average MIN_BODY_PIECE_BYTES a piece (HTTP clients send kilobytes; 8 MB at that mean costs under a second)
BODY_PIECES_FREE = 4096
MIN_BODY_PIECE_BYTES = 64
DIGITS_LIMIT = 4300  # Python's default limit on the digits of an integer read from text
RESERVED_FDS = 64  # file descriptors kept for the server itself: index and model files, logs, the registry
MAX_BACKLOG = 2048  # uvicorn's default


@dataclass(frozen=True)
class ServeOptions:
    index: Path
    query_model: str  # a checkpoint path, or models:/NAME@ALIAS (followed while serving)
    dataset: Path | None = None  # for class names
    host: str = "127.0.0.1"
    port: int = 8000
    reload_interval_s: float = 2.0
    limits: Limits = Limits()
    access_log: bool = False
    search_threads: int = 1  # OpenMP threads of one FAISS search (see create_app)
    max_connections: int | None = None  # open connections served at once; None: what the file limit allows
    head_timeout_s: float = HEAD_TIMEOUT_S  # for a connection to deliver a whole request head


def connection_limits(max_connections: int | None = None) -> tuple[int, int]:
    """(open connections served at once, listen backlog), within the process's file limit (RLIMIT_NOFILE).
    asyncio accepts up to a backlog of sockets in one go before any is handed over (and closed when over the cap),
    so three backlogs and the server's own files are kept below the limit: accept() never runs out of descriptors."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    backlog = max(8, min(MAX_BACKLOG, soft // 16))
    cap = max(1, soft - 3 * backlog - RESERVED_FDS)
    return (cap if max_connections is None else max(1, min(cap, max_connections))), backlog


class EveryInterval(logging.Filter):
    """Lets through one record starting with `prefix` per `interval_s`, as one line with how many were dropped:
    out of file descriptors, asyncio logged its failed accept() with a traceback ~10,000 times a second."""

    def __init__(self, prefix: str, interval_s: float = 60.0):
        super().__init__()
        self.prefix, self.interval_s = prefix, interval_s
        self._last = -float("inf")
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._dropped += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = (f"{self.prefix}: {error or record.getMessage()}; new connections wait "
                      f"({self._dropped} more such errors since the last line; next at most in {self.interval_s:g} s)")
        record.args, record.exc_info, record.exc_text = (), None, None
        self._last, self._dropped = now, 0
        return True


@contextlib.contextmanager
def accept_errors_logged_once_per_minute() -> Iterator[None]:
    quiet = EveryInterval("socket.accept() out of system resource")
    logging.getLogger("asyncio").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("asyncio").removeFilter(quiet)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is an input error, not a server that exits."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # asyncio turns Nagle off only on sockets made with proto IPPROTO_TCP; without it a keep-alive response,
    # written as headers then body, waited ~40 ms for the client's delayed ACK (accepted sockets inherit this)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there: {err.strerror}") from None
    return sock


def dataset_check(dataset: Path) -> Callable[[LoadedIndex], None]:
    """check_dataset_of_index for the first index and every reload, against the dataset's splits as first read
    (see DatasetSplits)."""
    from cmce.search import DatasetSplits, check_dataset_of_index

    splits = DatasetSplits(dataset)
    return lambda index: check_dataset_of_index(splits, index)


def _answer_and_close(transport: asyncio.BaseTransport, status: bytes, field: str, error: str) -> None:
    """A {error, field} JSON answer written straight to the socket, then closed: for a connection refused or cut
    outside any request cycle h11 could frame it in."""
    body = json.dumps({"error": error, "field": field}).encode()
    transport.write(b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d"
                    b"\r\n\r\n%s" % (status, len(body), body))
    transport.close()


REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/\d(\.\d)?")


class JsonErrorsH11(H11Protocol):
    """uvicorn answers a request it cannot parse (a negative or doubled Content-Length, TLS sent to the plain
    port) by itself, in plain text; this server's errors are {error, field} JSON, these too.

    Connections that send nothing held the server's file descriptors forever (uvicorn times out only an idle
    keep-alive after a response): one that has not delivered a whole request head within `head_timeout_s` is
    closed, and one over `max_connections` is answered 503 and closed at once. uvicorn's own limit_concurrency
    answers 503 only to a request, and keeps the socket, so it bounds neither."""

    max_connections = 1 << 20  # set by serve()
    head_timeout_s = HEAD_TIMEOUT_S
    max_body_bytes = Limits().max_body_bytes
    count_refusal: Callable[[str], None] = staticmethod(lambda reason: None)  # set by uvicorn_config: /metrics
    _refused = False
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _over_cap_logged = -float("inf")  # class-wide: when the cap was last logged

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._count_body_bytes()
        self._await_head()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused, self.transport = True, transport
        self.count_refusal("connection_cap")
        _answer_and_close(transport, b"503 Service Unavailable", "request",
                          f"request: the server holds its {self.max_connections} connections; try again")
        now = time.monotonic()
        if now - JsonErrorsH11._over_cap_logged >= 60:
            JsonErrorsH11._over_cap_logged = now
            log.warning("%d connections open, the most served at once: new ones are answered 503 and closed (logged "
                        "at most once a minute)", self.max_connections)

    def _await_head(self) -> None:
        """(Re)start the deadline for the next request head: on connecting and after each response."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no whole request head yet
            log.debug("closed a connection that sent no whole request head in %g s", self.head_timeout_s)
            self.transport.close()

    _body_started = 0.0
    _body_bytes = 0
    _body_pieces = 0
    _body_refused = False

    def _count_body_bytes(self) -> None:
        """Count the body's own bytes as h11 hands them over, not the bytes on the wire: chunk extensions
        (`1;eeee…` a second, 600 bytes for one of body) paid the rate below and held 20 connections for as long.
        Count its pieces too, and refuse a body in pieces too small (see BODY_PIECES_FREE): uvicorn reads every
        event h11 finds in what arrived before anything else runs, so the rest is left unparsed."""
        next_event = self.conn.next_event

        def counted() -> Any:
            if self._body_refused:
                return h11.NEED_DATA  # uvicorn's loop stops there; the connection is closing
            event = next_event()
            if isinstance(event, h11.Request):  # a body's time starts with its head
                self._body_started, self._body_bytes, self._body_pieces = time.monotonic(), 0, 0
            elif isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                self._body_pieces += 1
                if (self._body_pieces > BODY_PIECES_FREE
                        and self._body_bytes < MIN_BODY_PIECE_BYTES * self._body_pieces):
                    self._refuse_fragmented_body()
                    return h11.NEED_DATA
            return event

        self.conn.next_event = counted  # type: ignore[method-assign]

    def _refuse_fragmented_body(self) -> None:
        log.debug("refused a request body sent in %d pieces of %d bytes", self._body_pieces, self._body_bytes)
        self._refuse_body(b"400 Bad Request", "fragmented_body",
                          f"body: sent in more than {BODY_PIECES_FREE} pieces (chunks or packets) averaging under "
                          f"{MIN_BODY_PIECE_BYTES} bytes; send it in larger chunks")

    def _refuse_body(self, status: bytes, reason: str, error: str) -> None:
        """Stop reading the request's body: answered `status` and closed, or only closed where the app has begun
        its answer already (a 413: the rest is not read)."""
        self._body_refused = True
        self.count_refusal(reason)
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
        else:
            _answer_and_close(self.transport, status, "body", error)

    _first_line: bytes | None = b""  # the connection's first request line, until it is whole (then None)

    def _http09(self, data: bytes) -> bool:
        """An HTTP/0.9 request (`GET /healthz` and a line break, no version, no head to end) waited for the rest of
        a head that never comes and was closed unanswered: its line alone is refused, 400 in the JSON form."""
        if self._first_line is None:
            return False
        self._first_line += data
        line, newline, _ = self._first_line.partition(b"\n")
        if not newline:
            if len(self._first_line) > 65536:  # h11 refuses an overlong line itself
                self._first_line = None
            return False
        self._first_line = None
        if REQUEST_LINE.fullmatch(line.rstrip(b"\r")):
            return False
        self.count_refusal("http09")
        _answer_and_close(self.transport, b"400 Bad Request", "request",
                          "request: malformed HTTP: the request line is not `METHOD TARGET HTTP/1.1` (HTTP/0.9 and "
                          "other versions without one are not spoken)")
        return True

    def data_received(self, data: bytes) -> None:
        """A request whose body stops arriving held its connection for ever (a head with `Content-Length: 100` and
        no body got round the head deadline), as did one trickled a byte every few seconds: a body has
        `head_timeout_s` plus a second for each MIN_BODY_BYTES_PER_S bytes of it, and no gap that long."""
        if self._http09(data):
            return
        super().data_received(data)
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self._chunk_too_large():
            return
        now = time.monotonic()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        left = self._body_allowance() - (now - self._body_started)
        if left <= 0:
            self._body_overdue()
        else:
            self._body_timer = self.loop.call_later(min(self.head_timeout_s, left), self._body_overdue)

    def _chunk_too_large(self) -> bool:
        """A chunk declaring more than --max-body-bytes (`10000000000000000`, 2^64) is refused 413 as its size line
        arrives, as a Content-Length over it is: it waited for the body deadline and was answered 408, "too slow".
        The declared size is h11's reader's own (no public API); without it the body deadline still applies."""
        declared = getattr(getattr(self.conn, "_reader", None), "_bytes_in_chunk", 0)
        # 0: no chunk size line pending (a sized body over the limit is the app's to refuse: "a chunk declares 0")
        if not isinstance(declared, int) or declared == 0 or self._body_bytes + declared <= self.max_body_bytes:
            return False
        self._refuse_body(b"413 Content Too Large", "chunk_too_large", f"request body over {self.max_body_bytes} bytes "
                                                    f"(--max-body-bytes): a chunk declares {declared} bytes")
        return True

    def _body_allowance(self) -> float:
        return self.head_timeout_s + self._body_bytes / MIN_BODY_BYTES_PER_S

    def _body_overdue(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            log.debug("closed a connection whose request body stalled or came too slowly")
            self.count_refusal("body_timeout")
            _answer_and_close(self.transport, b"408 Request Timeout", "body",
                              f"body: it stopped for {self.head_timeout_s:g} s (--head-timeout) or came slower than "
                              f"{MIN_BODY_BYTES_PER_S} bytes/s after that")

    _write_timer: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        """A client that sends requests and never reads the answers (pipelined, a small receive window) held its
        connection for as long, and 22 of them the whole cap (other clients got 503 for 110 s): an answer that
        cannot be written for `head_timeout_s` closes the connection."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.head_timeout_s, self._write_overdue)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_overdue(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            log.debug("closed a connection that read none of its answer for %g s", self.head_timeout_s)
            self.transport.abort()  # its unread answers are dropped with it

    def shutdown(self) -> None:
        """A graceful stop: a body still arriving is the stop's to cut (503 after the grace period), not the body
        deadline's."""
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        if not self._refused:
            super().connection_lost(exc)

    def _unsupported_upgrade_warning(self) -> None:
        """An `Upgrade: websocket` request is answered as a plain one: uvicorn logged two warnings for each, one of
        them advice to install a WebSocket library, for a server that has no WebSocket endpoint."""
        log.debug("ignored an Upgrade header (no WebSocket endpoint here)")

    _answer_then_close = False

    def eof_received(self) -> bool | None:
        """A client may half-close its socket once its request is sent (shutdown(SHUT_WR), `nc -N`): the answer
        is still owed. uvicorn let asyncio close the connection at that EOF, and the client got nothing. With a
        whole request read and its answer pending, the connection stays open for writing until it is sent."""
        if (self.cycle is not None and not self.cycle.response_complete
                and self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)):  # MUST_CLOSE: it sent `Connection: close`
            self._answer_then_close = True
            return True
        return None

    def on_response_complete(self) -> None:
        """uvicorn starts the next request here when one is already buffered (pipelined): after a half-close the
        connection is closed only once no request is left to answer (the second of two was dropped 6 times in 10)."""
        answered = self.cycle
        super().on_response_complete()
        if self.transport.is_closing() or self.cycle is not answered:  # a pipelined request is being answered
            return
        if self._answer_then_close:
            self.transport.close()
        else:
            self._await_head()

    def send_400_response(self, msg: str) -> None:
        self.count_refusal("malformed")
        body = json.dumps({"error": f"request: malformed HTTP: {msg}", "field": "request"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _Server(uvicorn.Server):
    """A second stop signal, whichever, cuts the requests still running (503 to a body still arriving) instead of
    waiting out the 10 s graceful timeout; the stop then goes on as usual. uvicorn ignored a second SIGTERM (what
    a service manager sends when a stop hangs), and its forced exit on a second Ctrl-C logs tracebacks."""

    _loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            self._cut_requests()
        else:
            super().handle_exit(sig, frame)

    def stop(self) -> None:
        if self.should_exit:
            self._cut_requests()
        self.should_exit = True

    def _cut_requests(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: [task.cancel() for task in list(self.server_state.tasks)])


@contextlib.contextmanager
def _hangup_stops(server: _Server) -> Iterator[None]:
    """uvicorn stops gracefully on SIGINT and SIGTERM only; SIGHUP (a closed terminal) raised in the middle of
    the event loop dropped one request and left the server running, SIGUSR1 killed it with its downloads left.
    They are graceful stops here too, as are SIGALRM, SIGXCPU and the like (unless a caller handles them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, *unclaimed_ending_signals())
    previous = {signum: signal.signal(signum, lambda *_: server.stop()) for signum in not_ignored(stops)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def url(sock: socket.socket) -> str:
    """Where a client reaches the bound socket; an IPv6 address in brackets, as a URL needs it."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def uvicorn_config(app: Any, opts: ServeOptions) -> uvicorn.Config:
    max_connections, backlog = connection_limits(opts.max_connections)
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    count = (lambda reason: metrics.refused.labels(reason).inc()) if metrics else (lambda reason: None)
    protocol = type("JsonErrorsH11", (JsonErrorsH11,), {"max_connections": max_connections,
                                                        "head_timeout_s": opts.head_timeout_s,
                                                        "max_body_bytes": opts.limits.max_body_bytes,
                                                        "count_refusal": staticmethod(count)})
    return uvicorn.Config(app, http=protocol, ws="none", log_config=None, access_log=opts.access_log,
                          timeout_graceful_shutdown=10, backlog=backlog)


def serve(opts: ServeOptions, local_model: Callable[[str], Path], say: Callable[[str], None]) -> None:
    """Load, bind, `say` where it listens, and serve until SIGINT/SIGTERM, polling the index (a folder, or the
    s3:// prefix `opts.index` was downloaded from) and a query-model alias for a new version; a reloaded index is
    checked against --dataset as the first."""
    if not 0 < sys.get_int_max_str_digits() <= DIGITS_LIMIT:  # PYTHONINTMAXSTRDIGITS=0: no limit
        # a 3-million-digit number in a request body was converted for 175 s inside the event loop: every client
        # of the server waited; Python's own default is kept whatever the environment says
        sys.set_int_max_str_digits(DIGITS_LIMIT)
    sock = bind(opts.host, opts.port)  # first: a taken port or a foreign address is the one line, before any load
    try:
        check = None if opts.dataset is None else dataset_check(opts.dataset)
        holder = Holder(opts.index, QueryModelSource(opts.query_model, local_model), check)
        classes = None if opts.dataset is None else class_names(opts.dataset)
    except BaseException:
        sock.close()
        raise
    app = create_app(holder, opts.limits, classes, opts.search_threads)
    config = uvicorn_config(app, opts)
    # an s3:// index by its URI; a newline in the path would forge a second line for a script that reads this one
    say(f"serving {escape_controls(holder.source.shown)} on {url(sock)}\n")
    holder.start(opts.reload_interval_s)
    try:
        server = _Server(config)
        with (pixel_limit(opts.limits.max_image_pixels, "--max-image-pixels"), _hangup_stops(server),
              accept_errors_logged_once_per_minute()):
            server.run(sockets=[sock])
    except (KeyboardInterrupt, Terminated) as err:  # uvicorn shut down gracefully, then re-raised the signal
        forget_signals()  # a graceful stop is this command's success, not an interrupted step
        log.info("stopped (%s)", "SIGINT" if isinstance(err, KeyboardInterrupt) else err)
    finally:
        holder.stop()
        sock.close()
