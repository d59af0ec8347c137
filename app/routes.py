"""HTTP routes: the upload page, the JSON API, result images, health and model information."""
from __future__ import annotations

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
from PIL import Image
from werkzeug.exceptions import HTTPException, SecurityError

from app import metrics, request_ids
from app.api_options import ApiOptions, parse_api_options
from app.coco_rle import class_rles
from app.results import ResultFiles, ResultsFull, ensure_room, is_result_name, media_type, prune_results
from app.security import result_access_ok, token_ok, url_signature
from app.segmenter import Segmentation, Segmenter
from app.uploads import UploadError, decode_image, upload_bytes
from utils.classes import palette
from utils.inference.tiling import Strategy

blueprint = Blueprint("main", __name__)


def segmenter() -> Segmenter:
    return current_app.extensions["segmenter"]


def wants_json() -> bool:
    return request.path.startswith(("/json", "/api", "/healthz", "/readyz", "/results", "/metrics"))


def error_json(message: str) -> Response:
    """The API's error body; the request id lets the operator find the request in the log."""
    return jsonify(error=message, request_id=request_ids.current())


def token_refused() -> tuple[Response, int, dict]:
    response = error_json("missing or wrong API token (send 'Authorization: Bearer <token>')")
    return response, 401, {"WWW-Authenticate": "Bearer"}


def segment_and_store(options: ApiOptions, keep_photo: bool = False) -> tuple[Segmentation, ResultFiles, str]:
    """Decode the request's image, segment it and store the result (overlay, class ids, the API's
    JSON and, when ``keep_photo``, the photo) all or nothing; then prune old results when due.
    Returns the result, its files and the API's answer."""
    config = current_app.config
    data = upload_bytes(request)
    with metrics.stage("decode"):
        image = decode_image(data, config["MAX_PIXELS"])
    files = ResultFiles(Path(config["RESULTS_DIR"]))
    ensure_room(files.folder, image.width * image.height, config["RESULTS_MIN_FREE_BYTES"])  # before the forward
    check_forwards(options.strategy, image, config["MAX_FORWARDS"])
    result = segmenter().segment(image, options.strategy)
    with files.writing(), metrics.stage("store"):
        files.save_jpeg("overlay", result.overlay)  # first: pruning dates a result by its overlay
        files.save_mask(result.class_map)
        if keep_photo:
            files.save_jpeg("photo", image)
        answer = api_answer(result, files, options)
        files.save_json(answer)
    if current_app.extensions["prune_schedule"].due():
        prune_results(files.folder, config["RESULTS_KEEP"], config["RESULTS_MAX_AGE_S"], config["RESULTS_MAX_BYTES"],
                      current=files.id)
    return result, files, answer


def query_options() -> ApiOptions:
    """The query's options; a bad one is refused as such (its reason in the metrics)."""
    try:
        return parse_api_options(request.args)
    except UploadError as error:
        raise UploadError(str(error), error.status, "bad_query") from error


def check_forwards(strategy: Strategy, image: Image.Image, limit: int) -> None:
    """Slide mode and TTA multiply a request's forwards: bounded, so that one request cannot hold a
    worker for minutes."""
    predictor = segmenter().load()
    forwards = strategy.forwards((image.height, image.width), predictor.input_size, predictor.num_classes)
    if forwards > limit:
        raise UploadError(f"mode={strategy.mode}, tta={strategy.tta} on a {image.width}x{image.height} image needs "
                          f"{forwards} network passes; this service allows {limit} (a smaller scale, or no tta)", 413,
                          "too_many_forwards")


def result_url(files: ResultFiles, kind: str, external: bool = True) -> str:
    """Absolute for API clients; the page links relatively, right behind any proxy.  Signed when
    the service has a token, so the URL alone fetches the file until the signature expires."""
    name = files.name(kind)
    return url_for("main.result_file", name=name, _external=external, **url_signature(name))


def api_answer(result: Segmentation, files: ResultFiles, options: ApiOptions) -> str:
    """The API's JSON for ``result`` (also stored as the result's JSON file)."""
    classes = [entry for entry in result.classes if entry["area_ratio"] >= options.min_area_ratio]
    if options.rle:
        rles = class_rles(result.class_map, [entry["id"] for entry in classes])
        classes = [dict(entry, rle=rles[entry["id"]]) for entry in classes]
    described = segmenter().describe()
    return current_app.json.dumps({
        "classes": classes, "image_url": result_url(files, "overlay"), "mask_url": result_url(files, "mask"),
        "json_url": result_url(files, "json"), "width": result.width, "height": result.height,
        "inference_ms": result.inference_ms,
        "model": {"architecture": described["architecture"], "checkpoint": described["checkpoint"]}})


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
    result, files, _ = segment_and_store(ApiOptions(), keep_photo=True)  # its JSON: what POST /json would answer
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
        return token_refused()
    options = query_options()  # before the upload is read: a bad query costs nothing
    _, _, answer = segment_and_store(options)
    return Response(answer, mimetype="application/json")


@blueprint.get("/results/<name>")
def result_file(name: str):
    if not is_result_name(name):
        abort(404)
    if not result_access_ok(name):
        return token_refused()
    response = send_from_directory(Path(current_app.config["RESULTS_DIR"]).resolve(), name,
                                   mimetype=media_type(name))
    # A result holds the user's photo: no shared cache may keep it, and none may outlive pruning.
    response.headers["Cache-Control"] = "private, no-store"
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


@blueprint.get("/metrics")
def prometheus_metrics():
    if not token_ok():  # the counts say how the service is used: not for strangers when a token is set
        return token_refused()
    return metrics.exposition()


@blueprint.get("/api/model")
def model_info():
    if not token_ok():  # it may load the model: no stranger should be able to make a worker do that
        return token_refused()
    return jsonify(segmenter().describe())


def register_error_handlers(app: Flask) -> None:
    """Every error is a short message (JSON on the API, the page otherwise); never a traceback."""

    def respond(message: str, status: int):
        if wants_json():
            return error_json(message), status
        action = url_for("main.json_segment") if request.path.startswith("/json") else url_for("main.page")
        return render_page(action, status, error=message)

    @app.errorhandler(UploadError)
    def upload_error(error: UploadError):
        metrics.refused(error.reason)
        return respond(str(error), error.status)

    @app.errorhandler(ResultsFull)
    def results_full(error: ResultsFull):
        app.logger.error("results not stored: %s", error)
        metrics.refused("disk_full")
        return respond(str(error), 507)

    @app.errorhandler(SecurityError)
    def untrusted_host(error: SecurityError):
        message = "the Host header names no host this service answers for (SEG_ALLOWED_HOSTS)"
        if wants_json():
            return error_json(message), 400
        # Plain text: a page would need URLs, and the only host to build them from is the one refused.
        return message + "\n", 400, {"Content-Type": "text/plain; charset=utf-8"}

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if error.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            metrics.refused("too_many_bytes")
            return respond(f"upload too large: the limit is {limit:,} bytes", 413)
        return respond(error.description or error.name, error.code or 500)

    @app.errorhandler(Exception)
    def internal_error(error: Exception):
        app.logger.exception("unhandled error on %s", request.path)
        return respond("internal error: the request could not be processed", 500)
