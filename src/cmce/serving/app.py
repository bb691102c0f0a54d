"""The HTTP API (FastAPI): POST /search, GET /healthz, /readyz, /version, /metrics (Prometheus; see metrics).

Errors are JSON `{"error": message, "field": name}`: 422 for a field that is malformed or out of range (another
dimension, a non-finite or zero vector, an undecodable image, k over --max-k) or a body that is not readable JSON
(field "body": a syntax error, a number past Python's digit limit), 409 for embeddings of another
query-model version, 413 for a body over --max-body-bytes or more queries than --max-queries, 415 for a compressed
body, 404 / 405 for another path or method (field "path" / "method"), 400 for malformed HTTP (field "request"),
503 when the bodies held at once reach --max-bodies-bytes (with Retry-After).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import faiss
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cmce import strict_json
from cmce.serving.budget import BodyBudget
from cmce.serving.metrics import ABSOLUTE_FORM, RequestMetrics, ServerMetrics, target_path
from cmce.serving.queries import (
    Limits,
    RequestError,
    answer,
    check_count,
    check_query_model,
    embeddings_query,
    images_query,
)
from cmce.serving.state import Holder

log = logging.getLogger(__name__)
# path → method; /openapi.json is FastAPI's schema of the API (its /docs and /redoc pages load their scripts from a
# CDN: blank on a server without internet, so they are off)
ROUTES = {"/search": "POST", "/healthz": "GET", "/readyz": "GET", "/version": "GET", "/metrics": "GET",
          "/openapi.json": "GET"}
ENDPOINTS = ", ".join(f"{method} {path}" for path, method in ROUTES.items())
BODY_WAIT_S = 5.0  # a client's usual timeout is longer; a busy server answers sooner than that


def _integral(value: Any) -> Any:
    """3.0 as 3; a float past 2^53 is left a float, refused as not an integer (1e308 was refused by its 309 digits)."""
    return int(value) if type(value) is float and value.is_integer() and abs(value) <= 2**53 else value


class SearchRequest(BaseModel):
    """Either `embeddings` (computed by the client's query model, tagged with its checkpoint's sha256) or
    `images` (base64 PNG/JPEG, embedded here)."""

    model_config = ConfigDict(extra="forbid")
    # strict: "1_000" was read as 1000.0 and `true` as 1.0 (answered 200); JSON numbers only, 3 as well as 3.0.
    # fail_fast: the answer names the first wrong value only, and pydantic listed every one, on the event loop: an
    # 8 MB body of strings where numbers go was 1.6 M errors, 23 s with every request and probe waiting, 2.3 GB
    embeddings: list[Annotated[list[Annotated[float, Field(strict=True)]], Field(fail_fast=True)]] | None = Field(
        None, fail_fast=True)
    query_model_sha256: str | None = None
    images: list[str] | None = Field(None, fail_fast=True)
    # strict: `true` and "3" are not 3; but JSON does not tell 3.0 from 3 (a client in JavaScript may send either)
    k: Annotated[int, BeforeValidator(_integral)] = Field(5, ge=1, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _first_unknown_key_only(cls, body: Any) -> Any:
        """The known fields and the first unknown key: pydantic refuses each unknown key as one more error (an 8 MB
        object of them, 800 k errors: seconds of the event loop), and the answer names the first."""
        if isinstance(body, dict) and (unknown := next((k for k in body if k not in cls.model_fields), None)):
            return {**{k: v for k, v in body.items() if k in cls.model_fields}, unknown: body[unknown]}
        return body


def _error(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # a lone surrogate from a JSON escape cannot be encoded as UTF-8: escaped, or the refusal itself failed (500)
    text = f"{field}: {message}".encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": text, "field": field}, status_code=status, headers=headers)


def _field(loc: tuple) -> str:
    """A pydantic error location as a field name: ("body", "embeddings", 2) → "embeddings[2]"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "body"


def _unreadable(cause: BaseException) -> str:
    """What stopped the JSON parser short of a syntax error (FastAPI hides it behind "error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


class RequestFraming:
    """What uvicorn passes on and the routes would misread. An absolute-form target (`POST http://host/search`,
    which RFC 9112 says a server must accept) was routed as a path: 404. A body framed by both Content-Length and
    chunked coding (the request-smuggling shape) was answered and the connection kept: refused, and closed. A
    compressed body was refused as unparsable: 415 naming Content-Encoding."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("http_version") not in ("1.0", "1.1"):  # HTTP/2's preface `PRI * HTTP/2.0` was a 404 for `/*`
            refusal = _error(505, "request", f"HTTP/{scope.get('http_version')} is not spoken here: HTTP/1.1 only "
                                             "(no HTTP/2 with prior knowledge)", {"connection": "close"})
            return await refusal(scope, receive, send)
        if (path := target_path(scope["path"])).startswith(ABSOLUTE_FORM):
            refusal = _error(400, "request", f"the request target {path[:200]!r} is not a valid absolute URL",
                             {"connection": "close"})
            return await refusal(scope, receive, send)
        if path != scope["path"]:
            scope = {**scope, "path": path, "raw_path": path.encode()}
        names = [name for name, _ in scope["headers"]]
        if b"content-length" in names and b"transfer-encoding" in names:
            refusal = _error(400, "request", "malformed HTTP: both Content-Length and Transfer-Encoding given",
                             {"connection": "close"})
            return await refusal(scope, receive, send)
        codings = [value.strip().lower() for name, value in scope["headers"] if name == b"content-encoding"]
        if any(coding not in (b"", b"identity") for coding in codings):
            shown = b", ".join(codings).decode("latin-1")
            refusal = _error(415, "content-encoding", f"{shown}: only an uncompressed body is read")
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)


class StrictJSONRequest(Request):
    """A request whose JSON body is read by strict_json: a key given twice in one object is refused (the parser
    kept the last silently: `"k": 1, "k": 2`, or a wrong query_model_sha256 pin followed by the right one, answered
    200). Read once, by the route (a check before it parsed every body a second time)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):  # in a worker thread: 8 MB of objects take the event loop half a second
            self._json = await run_in_threadpool(strict_json.loads, await self.body())
            _refuse_too_many_queries(self._json, self.app.state.limits)
        return self._json


def _refuse_too_many_queries(body: Any, limits: Limits) -> None:
    """--max-queries, checked on the parsed body before pydantic validates its rows on the event loop: 2 M one-value
    rows (8 MB) were validated first, 1.3 s of every request and probe waiting and 420 MB, then refused."""
    if isinstance(body, dict):
        for field in ("embeddings", "images"):
            if isinstance(rows := body.get(field), list) and len(rows) > limits.max_queries:
                check_count(field, len(rows), limits)


class StrictJSONRoute(APIRoute):
    """FastAPI's route, handed a StrictJSONRequest (FastAPI's documented way to change how a body is read)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict


class BodyLimit:
    """Refuses a request body over `max_bytes` (413) from its Content-Length, or while it streams in, before
    anything parses it; uvicorn itself bounds only the headers. A whole body is then held in `budget` until its
    answer is sent (parsed, it takes several times its size): past `wait_s` without room, 503 (busy)."""

    def __init__(self, app: ASGIApp, max_bytes: int, budget: BodyBudget, wait_s: float):
        self.app, self.max_bytes, self.budget, self.wait_s = app, max_bytes, budget, wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large()(scope, receive, send)
        chunks, size = [], 0
        while True:
            try:
                message = await receive()
            except asyncio.CancelledError:  # a stop's graceful timeout ran out while this body was arriving
                log.info("a request whose body was still arriving was cut: the server is stopping")
                refusal = _error(503, "body", "the server stopped before the request body arrived",
                                 {"connection": "close"})
                return await refusal(scope, receive, send)  # not a traceback in the log of a routine stop
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        del chunks
        # charged whole, once arrived: a slow upload holds no room (4 trickling 8 MB bodies would hold it for hours)
        if not await self.budget.take(len(body), self.wait_s):
            return await self._busy(len(body))(scope, receive, send)
        try:
            return await self.app(scope, self._replaying(body, receive), send)
        finally:
            self.budget.give(len(body))

    def _too_large(self) -> JSONResponse:
        return _error(413, "body", f"request body over {self.max_bytes} bytes (--max-body-bytes)")

    def _busy(self, size: int) -> JSONResponse:
        return _error(503, "body", f"the request bodies being answered reached --max-bodies-bytes "
                                   f"({self.budget.total} bytes): no room for this one's {size} bytes within "
                                   f"{self.wait_s:g} s; retry", {"retry-after": "1"})

    @staticmethod
    def _replaying(body: bytes, receive: Receive) -> Receive:
        """The body as one message, then the connection's own messages (a disconnect)."""
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


def _schema_without_head(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema, each GET+HEAD route documented once, as its GET: FastAPI gave both operations the route's
    one operation id, and a client generator refuses (or merges) duplicate ids."""
    if app.openapi_schema is None:
        routes = []
        for route in app.routes:
            if isinstance(route, APIRoute) and "HEAD" in route.methods and len(route.methods) > 1:
                route = copy.copy(route)
                route.methods = route.methods - {"HEAD"}
            routes.append(route)
        app.openapi_schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=routes)
    return app.openapi_schema


def create_app(holder: Holder, limits: Limits, classes: list[str] | None = None, search_threads: int = 1,
               body_wait_s: float = BODY_WAIT_S) -> FastAPI:
    """`body_wait_s`: how long a whole body waits for room under --max-bodies-bytes before a 503.
    `search_threads`: OpenMP threads of one FAISS search. Requests run in parallel on the thread pool already;
    with more threads per search, the idle OpenMP workers spin between requests and took the cores from the
    server (one client: 28 ms p50 instead of 2 ms on 2 busy cores, benchmarks/serving.py)."""
    # no redirect of `/search/` to `/search`: Starlette built its Location from the Host header, sending a client
    # that follows redirects (its query with it) to whatever host the request named
    app = FastAPI(title="cmce", summary="asymmetric image retrieval: search a gallery index with query "
                                        "embeddings or images", redirect_slashes=False, docs_url=None, redoc_url=None)
    app.router.route_class = StrictJSONRoute
    app.openapi = lambda: _schema_without_head(app)  # type: ignore[method-assign]
    budget = BodyBudget(limits.max_bodies_bytes)
    metrics = ServerMetrics(holder, budget)
    app.state.metrics = metrics  # the HTTP layer counts its own refusals there (server.uvicorn_config)
    app.state.limits = limits  # read by StrictJSONRequest as it parses a body
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, budget=budget, wait_s=body_wait_s)
    app.add_middleware(RequestFraming)
    # added last: runs first, and sees every answer
    app.add_middleware(RequestMetrics, metrics=metrics, paths=tuple(ROUTES))

    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> JSONResponse:
        return _error(err.status, err.field, err.message)

    @app.exception_handler(StarletteHTTPException)
    async def unparsable(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return _error(404, "path", f"{request.url.path}: no such endpoint; there are {ENDPOINTS}")
        if err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            return _error(405, "method", f"{request.method} is not allowed on {request.url.path} (allowed: "
                                         f"{allowed})", err.headers)
        if isinstance(err.__cause__, RequestError):  # refused as the body was read (too many queries)
            return _error(err.__cause__.status, err.__cause__.field, err.__cause__.message)
        if isinstance(err.__cause__, strict_json.DuplicateKeyError):  # prefixed with the field, as every refusal
            return _error(422, err.__cause__.key, "given twice in one JSON object; give it once")
        if err.status_code == 400 and err.__cause__ is not None:  # FastAPI's "error parsing the body", from json's
            return _error(422, "body", f"not readable JSON: {_unreadable(err.__cause__)}")
        return _error(err.status_code, "body", str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":  # its location is a character position, not a field
            return _error(422, "body", f"not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        if first.get("type") == "string_unicode":  # where a key holds it, pydantic gives no location
            where = _field(tuple(first["loc"]))
            return _error(422, where, f"{first['input']!r} is not valid Unicode (a lone surrogate escape such as "
                                      "\\ud800)")
        if tuple(first["loc"]) == ("body",):  # not a JSON object (or not sent as JSON: curl -d sends a form)
            return _error(422, "body", f"a JSON object with content-type application/json expected: {first['msg']}")
        return _error(422, _field(tuple(first["loc"])), first["msg"])

    # the probes are answered on the event loop, not queued behind searches in the thread pool: a busy server's
    # probe must answer within the probe's timeout
    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD: what many health probes send
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> JSONResponse:
        served = holder.current
        body = {"ready": served is not None, "index_version": served.version if served else None,
                "reloads": holder.reloads, "last_reload_error": holder.last_error, "in_progress": holder.in_progress}
        return JSONResponse(body, status_code=200 if served is not None else 503)

    @app.api_route("/version", methods=["GET", "HEAD"])
    def version() -> dict:
        return {**holder.current.describe(), "class_names": classes is not None}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    def prometheus(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    # a plain def: FastAPI runs it in its thread pool. It answers a JSONResponse, encoded there too: a returned dict is
    # encoded on the event loop (1 M hits, what --max-queries 10000 --max-k 100 allow: 0.8 s of every client's time)
    @app.post("/search", response_model=dict[str, Any])
    def search(req: SearchRequest) -> JSONResponse:
        served = holder.current  # read once: a reload during this request does not change its answer
        if (req.embeddings is None) == (req.images is None):
            raise RequestError("body", "give exactly one of 'embeddings' (with 'query_model_sha256') or 'images'")
        if req.k > limits.max_k:
            raise RequestError("k", f"{req.k} is over the {limits.max_k} neighbours a query may ask for (--max-k)")
        faiss.omp_set_num_threads(search_threads)  # an OpenMP setting of the calling thread: set in each worker
        warnings: list[str] = []  # what the answer must say about its queries (first frame only, converted)
        if req.embeddings is not None:
            queries = embeddings_query(req.embeddings, req.query_model_sha256, served, limits)
        else:
            if req.query_model_sha256 is not None:  # "" too: refused as with embeddings (was ignored, 200)
                check_query_model(req.query_model_sha256, served, "images sent for", "send the served model's "
                                  "sha256 (GET /version), or none")
            queries, warnings = images_query(req.images or [], served, limits)
        results = answer(served, queries, req.k, classes)
        metrics.queries.labels("embeddings" if req.embeddings is not None else "images").inc(len(results))
        return JSONResponse({"index_version": served.version, "query_model_sha256": served.index.meta[
            "query_model_sha256"], "results": results, "warnings": warnings})

    return app
