"""`cmce serve`: load the query model and the index, bind the port, then run uvicorn with the reload poller.

Everything that can be wrong with the inputs (a missing or foreign index, a bad checkpoint, a taken port) is
found before the server starts, so the command fails with one line instead of a server that cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from cmce.data.codec import pixel_limit
from cmce.errors import Terminated, forget_signals, unclaimed_ending_signals
from cmce.serving.app import create_app
from cmce.serving.queries import Limits, class_names
from cmce.serving.state import Holder, QueryModelSource
from cmce.storage import origin

log = logging.getLogger(__name__)


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


def check_dataset_of_index(dataset: Path, meta: dict, split_of: Callable[[str], dict]) -> None:
    """The class names must come from the dataset the gallery was embedded from: its split's ids digest, which
    build-index records from the gallery (an index built before it was recorded is not checked)."""
    from cmce.data.loader import same_split

    source, split = meta.get("source"), meta.get("split")
    if not source or not split:
        log.warning("the index records no dataset digest (built before it did); class names from %s are not "
                    "checked", dataset)
        return
    if not same_split(split_of(split), source):
        raise ValueError(f"--dataset {dataset}: its '{split}' split is not the one the index's gallery was embedded "
                         "from (another dataset or version); class names would be wrong")


def dataset_check(dataset: Path) -> Callable[[dict], None]:
    """check_dataset_of_index for the first index and every reload, against the dataset's splits as first read:
    the class names are read once, at start-up, so a dataset file replaced later must not vouch for an index."""
    from cmce.data.loader import split_source

    split_of = functools.cache(lambda split: split_source(dataset, split))
    return lambda meta: check_dataset_of_index(dataset, meta, split_of)


class JsonErrorsH11(H11Protocol):
    """uvicorn answers a request it cannot parse (a negative or doubled Content-Length, TLS sent to the plain
    port) by itself, in plain text; this server's errors are {error, field} JSON, these too."""

    def _unsupported_upgrade_warning(self) -> None:
        """An `Upgrade: websocket` request is answered as a plain one: uvicorn logged two warnings for each, one of
        them advice to install a WebSocket library, for a server that has no WebSocket endpoint."""
        log.debug("ignored an Upgrade header (no WebSocket endpoint here)")

    _answer_then_close = False

    def eof_received(self) -> bool | None:
        """A client may half-close its socket once its request is sent (shutdown(SHUT_WR), `nc -N`): the answer
        is still owed. uvicorn let asyncio close the connection at that EOF, and the client got nothing. With a
        whole request read and its answer pending, the connection stays open for writing until it is sent."""
        if self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE:
            self._answer_then_close = True
            return True
        return None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._answer_then_close and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
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
    previous = {signum: signal.signal(signum, lambda *_: server.stop()) for signum in stops}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def url(sock: socket.socket) -> str:
    """Where a client reaches the bound socket; an IPv6 address in brackets, as a URL needs it."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(opts: ServeOptions, local_model: Callable[[str], Path], say: Callable[[str], None],
          watch: bool = True) -> None:
    """Load, bind, `say` where it listens, and serve until SIGINT/SIGTERM. `watch`: poll the index folder
    (and a query-model alias) for a new version; a reloaded index is checked against --dataset as the first."""
    check = None if opts.dataset is None else dataset_check(opts.dataset)
    holder = Holder(opts.index, QueryModelSource(opts.query_model, local_model), check)
    classes = None if opts.dataset is None else class_names(opts.dataset)
    sock = bind(opts.host, opts.port)
    app = create_app(holder, opts.limits, classes, opts.search_threads)
    config = uvicorn.Config(app, http=JsonErrorsH11, ws="none", log_config=None, access_log=opts.access_log,
                            timeout_graceful_shutdown=10)
    say(f"serving {origin(opts.index)} on {url(sock)}\n")  # an s3:// index by its URI
    holder.start(opts.reload_interval_s if watch else 0)
    try:
        server = _Server(config)
        with pixel_limit(opts.limits.max_image_pixels, "--max-image-pixels"), _hangup_stops(server):
            server.run(sockets=[sock])
    except (KeyboardInterrupt, Terminated) as err:  # uvicorn shut down gracefully, then re-raised the signal
        forget_signals()  # a graceful stop is this command's success, not an interrupted step
        log.info("stopped (%s)", "SIGINT" if isinstance(err, KeyboardInterrupt) else err)
    finally:
        holder.stop()
        sock.close()
