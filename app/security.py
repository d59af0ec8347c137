"""The service's edge: the API token, signed result URLs, and the headers on every response.

With ``SEG_API_TOKEN`` set, the API, the model information and the result files need the token
(``Authorization: Bearer <token>``).  Result URLs that the service hands out carry a signature
that expires (``SEG_RESULT_URL_TTL_S``), so that the page's ``<img>`` tags and a client that
got a URL from ``POST /json`` can fetch that one result without sending the token.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping

from flask import Flask, Response, current_app, request

# The page's own script, styles and images only: no inline script or style, no framing, no
# plugins; images may also be the canvas's blob/data URLs.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def token_ok() -> bool:
    """True when no token is configured or the request carries it (compared in constant time)."""
    token = current_app.config["API_TOKEN"]
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), token.encode())


def signature(name: str, expires: int, token: str) -> str:
    message = f"{name}\n{expires}".encode()
    return hmac.new(token.encode(), b"result-url\n" + message, hashlib.sha256).hexdigest()


def url_signature(name: str) -> dict[str, str]:
    """The query arguments that let a result URL be fetched without the token (none without one)."""
    token = current_app.config["API_TOKEN"]
    if not token:
        return {}
    expires = int(time.time()) + current_app.config["RESULT_URL_TTL_S"]
    return {"expires": str(expires), "sig": signature(name, expires, token)}


def signature_ok(name: str, args: Mapping[str, str]) -> bool:
    """True when ``args`` carry an unexpired signature of ``name`` made with this service's token."""
    token = current_app.config["API_TOKEN"]
    expires, given = args.get("expires", ""), args.get("sig", "")
    # Only what url_signature makes is read: ASCII digits of a sane length, a hex digest.
    if not (token and re.fullmatch(r"[0-9]{1,12}", expires) and re.fullmatch(r"[0-9a-f]{64}", given)):
        return False
    return int(expires) >= time.time() and hmac.compare_digest(given, signature(name, int(expires), token))


def result_access_ok(name: str) -> bool:
    return token_ok() or signature_ok(name, request.args)


def init_app(app: Flask) -> None:
    app.after_request(add_security_headers)
