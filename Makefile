# The two commands of the README: `make run` and `make test`. Both set themselves up.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint dev default-model demo-convert clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(STAMP)

# The service on the shipped default model (save/default/model.pth), at http://127.0.0.1:8000/
# SEG_CHECKPOINT=... serves another checkpoint; SEG_BIND=0.0.0.0:8000 listens on every interface.
run: $(STAMP)
	SEG_BIND=$${SEG_BIND:-127.0.0.1:8000} $(VENV)/bin/gunicorn -c app/gunicorn.conf.py "app:create_app()"

# Flask's development server, one process.
dev: $(STAMP)
	$(PYTHON) app/main.py --host 127.0.0.1 --port 5000

# Rebuild the default model from ../shared/data and ../shared/weights (about an hour on 2 CPU cores; see MODEL_CARD.md).
default-model: $(STAMP)
	$(PYTHON) tools/default_model.py

demo-convert: $(STAMP)
	$(PYTHON) -m tests.synthetic_coco save/demo --images 16
	$(PYTHON) cocomask_to_numpy.py --annotations save/demo/annotations/instances_train2017.json \
		--images save/demo/train2017 --out save/demo/masks/train2017

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PYTHON) -m pytest -q

clean:
	rm -rf save/demo .pytest_cache
