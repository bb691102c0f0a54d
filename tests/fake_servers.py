"""Small HTTP servers on 127.0.0.1 that answer like MLflow's REST API, and the run of a cmce command stopped once
such a server has seen the request a test waits for."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


@contextlib.contextmanager
def fake_mlflow(answers: dict[str, object], heard: list[str | None] | None = None) -> Iterator[int]:
    """A server answering each REST path of `answers` with its JSON (any other path with {}); the Authorization
    header of every request goes to `heard`. Yields its port."""

    class Store(Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer()

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer()

        def _answer(self):
            if heard is not None:
                heard.append(self.headers.get("Authorization"))
            body = json.dumps(answers.get(urlsplit(self.path).path, {})).encode()
            self.reply(200, body, (("Content-Type", "application/json"),))

    with serving(Store) as port:
        yield port


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """`handler` served on a free port of 127.0.0.1 in daemon threads; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


EMPTY_LISTING = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><KeyCount>0</KeyCount>'
                 b'<MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>')


class Quiet(BaseHTTPRequestHandler):
    """A fake server's handler that logs nothing and answers in one call."""

    def log_message(self, *_):
        pass

    def begin(self, length: int) -> None:
        """200 and a Content-Length of `length`; the body is left to the caller (to trickle it, or never end)."""
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def reply(self, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> None:
        """`status` with `headers` and `body` (its length sent unless a header gives it; no body to a HEAD)."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if not any(name == "Content-Length" for name, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class FakeObject(Quiet):
    """A fake S3 endpoint's start: HEAD of any key answers an object of `size` bytes; nothing is logged."""

    size = 4096

    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.reply(200, headers=(("Content-Length", str(self.size)), ("ETag", '"0123"'),
                                 ("Content-Type", "binary/octet-stream"),
                                 ("Last-Modified", "Sat, 05 Dec 2026 10:00:00 GMT")))

    def send_listing(self) -> None:
        """An empty listing: the object is no folder."""
        self.reply(200, EMPTY_LISTING)


def stopped_when(seen: threading.Event, argv: list[str], env: dict[str, str], wait_s: float = 0.0, signum: int = 15
                 ) -> tuple[int, float, str]:
    """Run `python -m cmce argv`, send it `signum` (SIGTERM) `wait_s` after `seen` is set (by a fake server's
    handler), and return its exit status, the seconds it took to end after the signal, and its stderr."""
    env = {**env, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "cmce", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert seen.wait(60), proc.stderr.read().decode() if proc.poll() is not None else "the request never came"
        time.sleep(wait_s)
        proc.send_signal(signum)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
        return proc.returncode, time.monotonic() - started, err.decode()
    finally:
        proc.kill()


def s3_env(port: int, **extra: str) -> dict[str, str]:
    """The environment of a cmce process that talks S3 to a fake server on `port` (no profile, no real keys)."""
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", **extra}
    env.pop("AWS_PROFILE", None)
    return env
