"""GET /metrics: what an operator scrapes (Prometheus text format, prometheus_client), one registry per app.

- `cmce_http_requests_total{endpoint, method, status}` and `cmce_http_request_duration_seconds{endpoint}`: every
  answer, refusals by the middleware included (413, 415, 503), until its last byte is handed to the server.
  Paths and methods outside the API are counted as "other": a client must not grow the label set.
- `cmce_search_queries_total{input}`: queries answered, by what was sent (embeddings or images).
- From the reload poll's state at scrape time: `cmce_index_items`, `cmce_index_info{index_version,
  query_model_sha256, index_type}`, `cmce_index_reloads_total`, `cmce_index_problem` (1 while /readyz shows a
  problem), `cmce_index_poll_waiting_seconds` (how long the poll has waited on the registry or S3), and
  `cmce_request_body_bytes_held` (the bodies being answered, against --max-bodies-bytes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cmce.serving.budget import BodyBudget
from cmce.serving.state import Holder

# no `_created` series beside each counter and histogram (the library's default, process-wide): one more series per
# label set, stored by Prometheus as a gauge of start times that no query here asks for
disable_created_metrics()
METHODS = ("GET", "HEAD", "POST")
# a search over a flat index answers in milliseconds, one embedding 64 images in a second or more
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


ABSOLUTE_FORM = ("http://", "https://")


def target_path(target: str) -> str:
    """The path of a request target, absolute-form included (`http://host/search` → `/search`); an absolute
    target whose host cannot be parsed (`http://[::1/search`) is returned as it is (urlsplit's ValueError was a
    500 and a traceback, and the answer went uncounted)."""
    if not target.startswith(ABSOLUTE_FORM):
        return target
    try:
        return urlsplit(target).path or "/"
    except ValueError:
        return target


class ServerMetrics:
    """The app's registry: request counters it updates, and the served state read when scraped."""

    def __init__(self, holder: Holder, budget: BodyBudget):
        self.registry = CollectorRegistry()
        self.requests = Counter("cmce_http_requests", "HTTP requests answered", ["endpoint", "method", "status"],
                                registry=self.registry)
        self.duration = Histogram("cmce_http_request_duration_seconds", "Time from a request's arrival to its "
                                  "answer's last byte", ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.queries = Counter("cmce_search_queries", "Queries answered by /search, by what was sent", ["input"],
                               registry=self.registry)
        # answered by the HTTP layer and closed, before any request reached the app (so not in cmce_http_requests):
        # connection_cap (503), body_timeout (408), chunk_too_large (413), fragmented_body (400), http09 and
        # malformed (400)
        self.refused = Counter("cmce_http_refused", "Connections or requests refused by the HTTP layer, by reason",
                               ["reason"], registry=self.registry)
        self.registry.register(_ServedState(holder, budget))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when the scraper's Accept header asks for it, else the
        Prometheus text format."""
        try:
            encoder, content_type = choose_encoder(accept)
        except (TypeError, ValueError):  # `version=abc`: the library compares it as a number (a 500, a traceback)
            encoder, content_type = choose_encoder(None)
        return encoder(self.registry), content_type


class _ServedState(Collector):
    def __init__(self, holder: Holder, budget: BodyBudget):
        self.holder, self.budget = holder, budget

    def collect(self) -> Iterator[Metric]:
        served, holder = self.holder.current, self.holder
        yield GaugeMetricFamily("cmce_index_items", "Gallery items in the served index", len(served.index.ids))
        info = InfoMetricFamily("cmce_index", "The served index and the query model it was built for")
        info.add_metric([], {"index_version": served.version,
                             "query_model_sha256": served.index.meta["query_model_sha256"],
                             "index_type": served.index.meta.get("index_type", "flat")})
        yield info
        yield CounterMetricFamily("cmce_index_reloads", "New indexes (or query models) swapped in", holder.reloads)
        yield GaugeMetricFamily("cmce_index_problem", "1 while the reload poll reports a problem (/readyz "
                                "last_reload_error)", int(holder.last_error is not None))
        waiting = holder.in_progress
        yield GaugeMetricFamily("cmce_index_poll_waiting_seconds", "How long the reload poll has waited on the "
                                "registry, S3 or a download (0: not waiting)", waiting["for_s"] if waiting else 0.0)
        yield GaugeMetricFamily("cmce_request_body_bytes_held", "Bytes of request bodies being answered "
                                "(--max-bodies-bytes caps them)", self.budget.total - self.budget.free)


class RequestMetrics:
    """Counts every answer and its duration, outermost (a refusal by another middleware is an answer too), by
    endpoint: one of the API's `paths`, else "other"."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: tuple[str, ...],
                 clock: Callable[[], float] = time.perf_counter):
        self.app, self.metrics, self.paths, self.clock = app, metrics, paths, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, done = self.clock(), None, False
        path = target_path(scope["path"])
        endpoint = path if path in self.paths else "other"
        method = scope["method"] if scope["method"] in METHODS else "other"

        def count(code: int) -> None:
            nonlocal done
            done = True
            self.metrics.requests.labels(endpoint, method, str(code)).inc()
            self.metrics.duration.labels(endpoint).observe(self.clock() - started)

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not done:
                count(status or 500)

        try:
            return await self.app(scope, receive, counted)
        except Exception:
            if not done:  # Starlette's error middleware, outside this one, answers 500 (or cuts a begun answer)
                count(500)
            raise
