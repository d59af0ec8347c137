# The two commands of the README: `make run` and `make test`. Both set themselves up.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint demo-convert clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(STAMP)

# Until the web service lands, the main job is the conversion demo below.
run: demo-convert

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
