"""HTTP routes: the upload page, the JSON API, result images, health and model information."""
from __future__ import annotations

import hmac
from pathlib import Path

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    jsonify,
    render_template,
    request,
    send_file,
    send_from_directory,
    url_for,
)
from werkzeug.exceptions import HTTPException

from app.api_options import ApiOptions, parse_api_options
from app.coco_rle import class_rles
from app.results import ResultFiles, is_result_name, media_type, prune_results
from app.segmenter import Segmentation, Segmenter
from app.uploads import UploadError, decode_image, upload_bytes
from utils.classes import palette

blueprint = Blueprint("main", __name__)


def segmenter() -> Segmenter:
    return current_app.extensions["segmenter"]


def wants_json() -> bool:
    return request.path.startswith(("/json", "/api", "/healthz", "/readyz"))


def token_ok() -> bool:
    """True when no token is configured or the request carries it (compared in constant time)."""
    token = current_app.config["API_TOKEN"]
    if not token:
        return True
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), token.encode())


def segment_upload(keep_photo: bool = False) -> tuple[Segmentation, ResultFiles]:
    """Decode the request's image, segment it, store the overlay and the class ids (and the
    photo when ``keep_photo``); returns the result and its files."""
    image = decode_image(upload_bytes(request), current_app.config["MAX_PIXELS"])
    result = segmenter().segment(image)
    files = ResultFiles(Path(current_app.config["RESULTS_DIR"]))
    files.save_jpeg("overlay", result.overlay)  # first: pruning dates a result by its overlay
    files.save_mask(result.class_map)
    if keep_photo:
        files.save_jpeg("photo", image)
    return result, files


def result_url(files: ResultFiles, kind: str, external: bool = True) -> str:
    """Absolute for API clients; the page links relatively, right behind any proxy."""
    return url_for("main.result_file", name=files.name(kind), _external=external)


def api_answer(result: Segmentation, files: ResultFiles, options: ApiOptions) -> str:
    """The API's JSON for ``result``, stored as the result's JSON file too; then old results are pruned."""
    classes = [entry for entry in result.classes if entry["area_ratio"] >= options.min_area_ratio]
    if options.rle:
        rles = class_rles(result.class_map, [entry["id"] for entry in classes])
        classes = [dict(entry, rle=rles[entry["id"]]) for entry in classes]
    described = segmenter().describe()
    text = current_app.json.dumps({
        "classes": classes, "image_url": result_url(files, "overlay"), "mask_url": result_url(files, "mask"),
        "json_url": result_url(files, "json"), "width": result.width, "height": result.height,
        "inference_ms": result.inference_ms,
        "model": {"architecture": described["architecture"], "checkpoint": described["checkpoint"]}})
    files.save_json(text)
    prune_results(files.folder, current_app.config["RESULTS_KEEP"], current_app.config["RESULTS_MAX_AGE_S"])
    return text


def legend_rows(classes: list[dict], num_classes: int) -> list[dict]:
    colours = palette(num_classes)
    return [dict(entry, colour="#" + bytes(colours[entry["id"]]).hex()) for entry in classes]


def render_page(action: str, status: int = 200, **context):
    return render_template("index.html", action=action, **context), status


@blueprint.get("/")
def page():
    return render_page(url_for("main.page"))


@blueprint.post("/")
def page_segment():
    if not (current_app.config["PAGE_PUBLIC"] or token_ok()):
        return render_page(url_for("main.page"), 401, error="this service needs an API token; use POST /json")
    result, files = segment_upload(keep_photo=True)
    api_answer(result, files, ApiOptions())  # the page's JSON download: what POST /json would answer
    urls = {f"{name}_url": result_url(files, kind, external=False)
            for name, kind in (("image", "overlay"), ("photo", "photo"), ("mask", "mask"), ("json", "json"))}
    legend = legend_rows(result.classes, len(segmenter().load().class_names))
    return render_page(url_for("main.page"), result=result, legend=legend, **urls)


@blueprint.get("/json")
def json_page():
    return render_page(url_for("main.json_segment"))


@blueprint.post("/json")
def json_segment():
    if not token_ok():
        response = jsonify(error="missing or wrong API token (send 'Authorization: Bearer <token>')")
        return response, 401, {"WWW-Authenticate": "Bearer"}
    options = parse_api_options(request.args)  # before the upload is read: a bad query costs nothing
    result, files = segment_upload()
    return Response(api_answer(result, files, options), mimetype="application/json")


@blueprint.get("/results/<name>")
def result_file(name: str):
    if not is_result_name(name):
        abort(404)
    response = send_from_directory(Path(current_app.config["RESULTS_DIR"]).resolve(), name,
                                   mimetype=media_type(name), max_age=3600)
    response.headers["X-Content-Type-Options"] = "nosniff"  # a result is only ever what its name says
    return response


@blueprint.get("/openapi.json")
def openapi():
    return send_file(Path(__file__).with_name("openapi.json"), mimetype="application/json")


@blueprint.get("/healthz")
def healthz():
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz():
    ready = segmenter().ready
    return jsonify(ready=ready), 200 if ready else 503


@blueprint.get("/api/model")
def model_info():
    return jsonify(segmenter().describe())


def register_error_handlers(app: Flask) -> None:
    """Every error is a short message (JSON on the API, the page otherwise); never a traceback."""

    def respond(message: str, status: int):
        if wants_json():
            return jsonify(error=message), status
        action = url_for("main.json_segment") if request.path.startswith("/json") else url_for("main.page")
        return render_page(action, status, error=message)

    @app.errorhandler(UploadError)
    def upload_error(error: UploadError):
        return respond(str(error), error.status)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if error.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            return respond(f"upload too large: the limit is {limit:,} bytes", 413)
        return respond(error.description or error.name, error.code or 500)

    @app.errorhandler(Exception)
    def internal_error(error: Exception):
        app.logger.exception("unhandled error on %s", request.path)
        return respond("internal error: the request could not be processed", 500)
