"""The inference web service: ``create_app(config)`` is the application factory."""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask

from app import metrics, request_ids, security, settings
from app.results import PruneSchedule
from app.segmenter import Segmenter


def create_app(config: dict | None = None) -> Flask:
    """Build the app from the environment (``SEG_*``), overridden by ``config``."""
    app = Flask(__name__)
    app.config.update(settings.from_environment())
    app.config.update(config or {})
    Path(app.config["RESULTS_DIR"]).mkdir(parents=True, exist_ok=True)
    app.extensions["segmenter"] = Segmenter(app.config["CHECKPOINT"], app.config["TORCH_THREADS"],
                                            app.config["PRECISION"], app.config["COMPILE"], app.config["DEVICE"],
                                            app.config["BACKEND"])
    app.extensions["prune_schedule"] = PruneSchedule(app.config["RESULTS_PRUNE_INTERVAL_S"])

    from app import routes
    app.register_blueprint(routes.blueprint)
    routes.register_error_handlers(app)
    security.init_app(app)
    request_ids.init_app(app)
    metrics.init_app(app)
    if not app.logger.handlers or app.logger.level == logging.NOTSET:
        app.logger.setLevel(logging.INFO)
    return app
