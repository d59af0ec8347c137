"""Prometheus metrics of the service, served at ``GET /metrics``.

Under gunicorn every worker is its own process: prometheus_client's multiprocess mode has each
write its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (app/gunicorn.conf.py makes a fresh one
before any worker starts), and ``/metrics`` adds up the files of every worker, so whichever worker
answers the scrape, it reports them all.  Without that variable (Flask's test client, ``make dev``)
the values are this process's own.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Requests take from a few ms (health checks) to tens of seconds (a 40-Mpixel photo on the CPU).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)

REQUESTS = Counter("seg_http_requests", "HTTP requests answered, by route, method and status",
                   ("route", "method", "status"))
LATENCY = Histogram("seg_http_request_duration_seconds", "Time to answer a request, by route", ("route",),
                    buckets=REQUEST_BUCKETS)
STAGES = Histogram("seg_stage_duration_seconds",
                   "Time of each stage of a segmentation: decode (upload to pixels), forward (the model's "
                   "prediction), postprocess (summary, overlay, stored files)", ("stage",), buckets=STAGE_BUCKETS)
IN_FLIGHT = Gauge("seg_http_requests_in_flight", "Requests being answered now", multiprocess_mode="livesum")
REFUSED = Counter("seg_uploads_refused", "Uploads refused, by reason", ("reason",))
# An info metric as a gauge of 1: prometheus_client's Info does not work in multiprocess mode.
# liveall: one sample per live worker, labelled with its pid, gone with the worker: during a
# reload both models show, after it only the new one.
MODEL = Gauge("seg_model_info", "The model each live worker serves (value 1)",
              ("architecture", "checkpoint", "sha256", "backend", "precision"), multiprocess_mode="liveall")
WORKER_RESTARTS = Counter("seg_worker_restarts", "gunicorn workers started after the first set "
                          "(a crashed or timed-out worker replaced, or a reload)")


def registry() -> CollectorRegistry:
    """Every worker's values when gunicorn's workers share a multiprocess directory, else this process's."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    collected = CollectorRegistry()
    multiprocess.MultiProcessCollector(collected)
    return collected


def exposition() -> Response:
    return Response(generate_latest(registry()), mimetype=CONTENT_TYPE_LATEST)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` of a segmentation."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGES.labels(name).observe(time.perf_counter() - started)


def refused(reason: str) -> None:
    REFUSED.labels(reason).inc()


def model_loaded(description: dict) -> None:
    MODEL.labels(description["architecture"], description["checkpoint"], description["checkpoint_sha256"],
                 description["backend"], description["precision"]).set(1)


def route() -> str:
    """The route's rule (``/results/<name>``, never the name itself: a bounded set of labels)."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def request_started() -> None:
    g.metrics_started = time.perf_counter()
    IN_FLIGHT.inc()


def request_finished(response: Response) -> Response:
    if "metrics_started" in g:
        LATENCY.labels(route()).observe(time.perf_counter() - g.metrics_started)
        REQUESTS.labels(route(), request.method, str(response.status_code)).inc()
    return response


def request_torn_down(_error: BaseException | None) -> None:
    # Teardown runs for every request that began, answered or not, so the gauge cannot drift.
    if g.pop("metrics_started", None) is not None:
        IN_FLIGHT.dec()


def init_app(app: Flask) -> None:
    app.before_request(request_started)
    app.after_request(request_finished)
    app.teardown_request(request_torn_down)
