"""What the service tells its operator, through the test client: request ids (given or generated,
on the response, in the error body and in the log) and the Prometheus metrics of one process.
tests/test_front.py checks both on the real server, where every gunicorn worker counts."""
from __future__ import annotations

import logging
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.request_ids import valid_or_new
from tests.test_app import encoded, photo, post_file


def samples(client, **headers) -> dict[tuple[str, tuple], float]:
    """Every sample of ``GET /metrics``: (name, sorted labels) -> value (the text must parse)."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True))
            for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("given", ["abc-123", "0f" * 32, "trace.id:7_x"])
def test_a_well_formed_request_id_is_kept(given):
    assert valid_or_new(given) == given


@pytest.mark.parametrize("given", [None, "", "a" * 65, "bad id", "line\nbreak", "x%sy", "café", "<script>"])
def test_anything_else_is_replaced_by_a_new_id(given):
    made = valid_or_new(given)
    assert made != given and re.fullmatch(r"[0-9a-f]{32}", made)
    assert valid_or_new(given) != made  # each one new


def test_every_response_carries_the_request_id_given_or_a_new_one(make_client):
    client = make_client()
    assert client.get("/healthz", headers={"X-Request-ID": "user-42"}).headers["X-Request-ID"] == "user-42"
    first, second = (client.get("/healthz").headers["X-Request-ID"] for _ in range(2))
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second
    forged = client.get("/healthz", headers={"X-Request-ID": "a b;" + "x" * 80}).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", forged)


def test_an_error_body_and_its_log_line_name_the_request(make_client, monkeypatch, caplog):
    client = make_client()
    refused = post_file(client, b"not an image", headers={"X-Request-ID": "report-7"})
    assert refused.status_code == 415 and refused.get_json()["request_id"] == "report-7"
    monkeypatch.setattr(client.application.extensions["segmenter"], "segment", lambda image, strategy: 1 / 0)
    with caplog.at_level(logging.ERROR):
        failed = post_file(client, encoded(photo(40, 30)), headers={"X-Request-ID": "report-8"})
    assert failed.status_code == 500 and failed.get_json()["request_id"] == "report-8"
    assert failed.headers["X-Request-ID"] == "report-8"
    logged = [record.getMessage() for record in caplog.records if "unhandled error" in record.getMessage()]
    assert logged and all("request_id=report-8" in line for line in logged)


def test_metrics_count_requests_stages_and_refusals(make_client):
    client = make_client()
    before = samples(client)
    assert post_file(client, encoded(photo(40, 30))).status_code == 200
    assert post_file(client, encoded(photo(40, 30))).status_code == 200
    assert post_file(client, b"not an image").status_code == 415
    assert client.post("/json?rle=2", data=b"x").status_code == 400
    after = samples(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("seg_http_requests_total", route="/json", method="POST", status="200") == 2
    assert grew("seg_http_requests_total", route="/json", method="POST", status="415") == 1
    assert grew("seg_http_request_duration_seconds_count", route="/json") == 4
    assert grew("seg_stage_duration_seconds_count", stage="forward") == 2
    assert grew("seg_stage_duration_seconds_count", stage="postprocess") == 2
    assert grew("seg_stage_duration_seconds_count", stage="decode") == 3  # the refused one was tried
    assert grew("seg_uploads_refused_total", reason="unsupported_format") == 1
    assert grew("seg_uploads_refused_total", reason="bad_query") == 1
    assert value(after, "seg_http_requests_in_flight") == 1  # the scrape itself
    model = [labels for (name, labels) in after if name == "seg_model_info"]
    described = client.get("/api/model").get_json()
    assert dict(model[-1])["sha256"] == described["checkpoint_sha256"] and len(described["checkpoint_sha256"]) == 64


def test_too_many_bytes_is_counted_as_such(make_client):
    client = make_client(MAX_CONTENT_LENGTH=1000)
    before = value(samples(client), "seg_uploads_refused_total", reason="too_many_bytes")
    assert post_file(client, b"\xff" * 5000).status_code == 413
    assert value(samples(client), "seg_uploads_refused_total", reason="too_many_bytes") == before + 1


def test_metrics_need_the_token_when_one_is_set(make_client):
    client = make_client(API_TOKEN="s3cret")
    refused = client.get("/metrics")
    assert refused.status_code == 401 and "request_id" in refused.get_json()
    assert value(samples(client, Authorization="Bearer s3cret"), "seg_http_requests_total",
                 route="/metrics", method="GET", status="401") >= 1
