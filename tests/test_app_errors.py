"""The HTML page's answer to an internal error: a 500 page with the upload form and a short
message; the cause goes to the log, never to the visitor."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app import create_app
from tests.test_app import encoded, photo, post_file
from tests.tiny_checkpoint import make_checkpoint

MESSAGE = "internal error: the request could not be processed"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture()
def client(checkpoint, tmp_path):
    app = create_app({"CHECKPOINT": str(checkpoint), "RESULTS_DIR": str(tmp_path / "results"), "TESTING": True})
    return app.test_client()


def test_the_page_answers_an_internal_error_with_a_short_500_page(client, monkeypatch, caplog):
    segmenter = client.application.extensions["segmenter"]
    monkeypatch.setattr(segmenter, "segment", lambda image, strategy: 1 / 0)
    with caplog.at_level(logging.ERROR):
        response = post_file(client, encoded(photo()), url="/")
    assert response.status_code == 500 and response.mimetype == "text/html"
    html = response.data.decode()
    assert f'<p class="error" id="error" role="alert">{MESSAGE}</p>' in html
    assert 'action="/"' in html and 'type="file"' in html  # the form, to try again
    assert "ZeroDivisionError" not in html and "Traceback" not in html and 'id="result-image"' not in html
    assert "ZeroDivisionError" in caplog.text  # the cause is logged for the operator
