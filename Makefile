# The two commands of the README: `make run` and `make test`. Both set themselves up.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint dev default-model default-int8 flood-model demo-convert clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $(STAMP)

# The service on the shipped default model (save/default/model.pth), at http://127.0.0.1:8000/:
# nginx in front of gunicorn (app/serve.py; needs Debian's nginx: apt-get install nginx).
# SEG_CHECKPOINT=... serves another checkpoint; SEG_BIND=0.0.0.0:8000 listens on every interface.
run: $(STAMP)
	$(PYTHON) app/serve.py

# Flask's development server, one process.
dev: $(STAMP)
	$(PYTHON) app/main.py --host 127.0.0.1 --port 5000

# Rebuild the default model from ../shared/data and ../shared/weights (about an hour on 2 CPU cores; see MODEL_CARD.md).
default-model: $(STAMP)
	$(PYTHON) tools/default_model.py

# Only the default model's INT8 IR and its guard verdict (tools/quantize.py; minutes on 2 CPU cores).
default-int8: $(STAMP)
	$(PYTHON) tools/default_model.py --int8-only

# Flood areas with pretrained features: MobileNetV2 U-Net (ImageNet file), binary masks, Dice + CE,
# 30 epochs of 8 x 320 crops (17-22 minutes on 2 CPU cores), then test.py on the val split.
# The pairs whose mask size differs from the image are skipped (README, "Other datasets": why).
# AUGMENT=basic|photometric|weather|strong picks the preset; results in save/flood-$(AUGMENT)/.
SHARED  ?= ../shared
AUGMENT ?= weather
FLOOD   := --dataset folder --data-dir $(SHARED)/data/flood-area --split-dir data/flood-splits \
	--mask-mode binary --class-names background,flood --size-mismatch skip
flood-model: $(STAMP)
	test -f data/flood-splits/val.txt || $(PYTHON) tools/dataset.py split --data-dir $(SHARED)/data/flood-area --out data/flood-splits
	$(PYTHON) train.py $(FLOOD) --save-dir save/flood-$(AUGMENT) --augment $(AUGMENT) \
		--model smp_unet --encoder mobilenet_v2 --encoder-weights $(SHARED)/weights/mobilenet_v2-tf2ptq-6cf85aa2.pth \
		--loss ce_dice --crop-size 320 --input-size 512 --batch-size 8 --lr 1e-3 --encoder-lr-factor 0.1 \
		--epochs 30 --val-every 5 --precision bf16
	$(PYTHON) test.py $(FLOOD) --checkpoint save/flood-$(AUGMENT)/best.pth --save-dir save/flood-$(AUGMENT)

demo-convert: $(STAMP)
	$(PYTHON) -m tests.synthetic_coco save/demo --images 16
	$(PYTHON) cocomask_to_numpy.py --annotations save/demo/annotations/instances_train2017.json \
		--images save/demo/train2017 --out save/demo/masks/train2017

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A test process per core; whole files per process, so module fixtures (a trained model, a
# server) are built once.
test: $(STAMP) lint
	$(PYTHON) -m pytest -q -n auto --dist loadfile

clean:
	rm -rf save/demo .pytest_cache
