# The segmentation service: nginx in front of gunicorn, as `make run` starts it.  Build and run (README "Docker"):
#   docker build -t segmentation .
#   docker run -p 8000:8000 segmentation                       # CPU
#   docker run --gpus all -p 8000:8000 segmentation            # GPU (NVIDIA Container Toolkit)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEG_BIND=0.0.0.0:8000

# nginx in front of gunicorn (serve.py): it reads slow clients' requests whole before a worker sees them.
RUN apt-get update && apt-get install -y --no-install-recommends nginx && rm -rf /var/lib/apt/lists/*

WORKDIR /srv
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN useradd --create-home --uid 10001 seg
COPY --chown=seg:seg . .
RUN mkdir -p save/results && chown -R seg:seg save
USER seg
# OpenVINO sends anonymous usage telemetry to Google Analytics unless its user opted out; the image
# opts out with OpenVINO's own command (README, "Serving").
RUN opt_in_out --opt_out

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# The launcher of `make run`: SIGTERM (docker stop) stops both, SIGHUP (docker kill -s HUP) reloads the model.
CMD ["python", "app/serve.py"]
