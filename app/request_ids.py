"""A request id on every request: the response's ``X-Request-ID``, the log lines of that request and
the JSON error body all name it, so that a user's report can be found in the log.

The id a client or proxy sent is kept only when it looks like an id (1 to 64 of ``A-Za-z0-9._:-``):
anything else, a header being hostile input, would let a client write what it likes into the log,
so it is replaced by a generated one.  The front (serve.py's nginx) applies the same rule before it
passes the id on.
"""
from __future__ import annotations

import logging
import re
import uuid

from flask import Flask, Response, g, has_request_context, request

HEADER = "X-Request-ID"
VALID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def valid_or_new(given: str | None) -> str:
    """``given`` when it is a well-formed id, else a new random one (32 hex digits)."""
    if given is not None and VALID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def current() -> str:
    """This request's id ("-" outside a request, e.g. at worker start)."""
    if not has_request_context():
        return "-"
    if "request_id" not in g:  # an error raised before before_request ran (a forged Host) still gets one
        g.request_id = valid_or_new(request.headers.get(HEADER))
    return g.request_id


class RequestIdFilter(logging.Filter):
    """Appends the request id to every record the app logs inside a request, whatever the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if has_request_context():
            record.msg = f"{record.msg} [request_id={current()}]"
        return True


def take() -> None:
    """Read (or make) the id first, so that every later log line of the request can name it.
    Returns None: a before_request function that returns a value answers the request with it."""
    current()


def add_header(response: Response) -> Response:
    response.headers[HEADER] = current()
    return response


def init_app(app: Flask) -> None:
    app.before_request(take)
    app.after_request(add_header)
    app.logger.addFilter(RequestIdFilter())
