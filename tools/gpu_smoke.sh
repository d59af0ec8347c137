#!/usr/bin/env bash
# The GPU paths end to end, in under 10 minutes on one GPU host: run it on a machine with a GPU
# before trusting training or serving there (and after changing CUDA, torch or the training loop).
#
#     tools/gpu_smoke.sh            # from the repository root; PYTHON=... to use another interpreter
#
# One line per check (PASS / FAIL / SKIP with the reason), then a summary; logs in a temporary
# folder it names.  Without a GPU it says so, runs the checks a CPU can run and skips the rest;
# it exits 1 only when a check that ran failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d -t gpu-smoke.XXXXXX)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
passed=0 failed=0 skipped=0 skipped_names=()

check() {  # check NAME COMMAND...: run it, log to $WORK/NAME.log, print one line
    local name=$1 started=$SECONDS
    shift
    if "$@" >"$WORK/$name.log" 2>&1; then
        passed=$((passed + 1)); echo "PASS $name ($((SECONDS - started)) s)"
    else
        failed=$((failed + 1)); echo "FAIL $name ($((SECONDS - started)) s): see $WORK/$name.log"
    fi
}

skip() {  # skip NAME REASON
    skipped=$((skipped + 1)); skipped_names+=("$1"); echo "SKIP $1: $2"
}

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$GPUS" -gt 0 ]; then
    DEVICE=cuda
    echo "GPU: $GPUS found ($("$PY" -c "import torch; print(torch.cuda.get_device_name(0))"))"
else
    DEVICE=cpu
    echo "NO GPU FOUND: the checks that need CUDA are skipped; the others run on the CPU"
fi
echo "logs: $WORK"

"$PY" -c "
import sys; from pathlib import Path; sys.path.insert(0, '.')
from tests.synthetic_coco import make_training_root
make_training_root(Path('$WORK/data'), num_images=8, size=(96, 128), seed=0)" >"$WORK/data.log" 2>&1
DATA=(--data-dir "$WORK/data" --mask-dir "$WORK/data/masks" --train-split train2017 --val-split train2017)
TRAIN=(train.py "${DATA[@]}" --workers 0 --model smp_unet --crop-size 64 --batch-size 2 --max-steps 3)

gpu_tests() {  # the GPU tests must pass, and not one of them may be skipped
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_path.py tests/test_predictor.py \
        tests/test_training.py::test_cuda_path_runs_where_cuda_exists -k "cuda or gpu or amp" &&
        ! grep -q "skipped" "$WORK/gpu_tests.log"
}
if [ "$DEVICE" = cuda ]; then check gpu_tests gpu_tests; else skip gpu_tests "no GPU"; fi

check train "$PY" "${TRAIN[@]}" --device "$DEVICE" --epochs 1 --save-dir "$WORK/run"
check resume "$PY" "${TRAIN[@]}" --device "$DEVICE" --epochs 2 --resume --save-dir "$WORK/run"
if [ "$DEVICE" = cuda ]; then
    cpu_then_gpu() {
        "$PY" "${TRAIN[@]}" --device cpu --epochs 1 --save-dir "$WORK/cpu-run" &&
            "$PY" "${TRAIN[@]}" --device cuda --epochs 2 --resume --save-dir "$WORK/cpu-run"
    }
    check resume_cpu_checkpoint_on_gpu cpu_then_gpu
else
    skip resume_cpu_checkpoint_on_gpu "no GPU"
fi
MODEL="$WORK/run/model_final.pth"
check test_py "$PY" test.py --checkpoint "$MODEL" "${DATA[@]}" --workers 0 --device "$DEVICE" --save-dir "$WORK/test"
check test_draw_timing "$PY" test_draw.py compute_time --checkpoint "$MODEL" "${DATA[@]}" --count 10 \
    --warmup 2 --save-dir "$WORK/draw"

predictor_in() {  # predictor_in PRECISION: the Predictor runs in it and gives a valid class map
    "$PY" -c "
import sys; sys.path.insert(0, '.')
import numpy as np
from PIL import Image
from utils.inference.predictor import Predictor
predictor = Predictor.from_checkpoint('$MODEL', device='$DEVICE', precision='$1')
prediction = predictor.predict(Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)))
assert prediction.class_map.shape == (120, 160) and np.isfinite(prediction.confidence).all()
print(predictor.device, predictor.precision, f'{prediction.inference_ms:.1f} ms')"
}
check predictor_fp32 predictor_in fp32
check predictor_auto predictor_in auto
if [ "$DEVICE" = cuda ] || "$PY" -c "import sys; from utils.precision import cpu_supports_bf16; sys.exit(not cpu_supports_bf16())"; then
    check predictor_bf16 predictor_in bf16
else
    skip predictor_bf16 "this CPU has no native bf16"
fi
if [ "$DEVICE" = cuda ]; then check predictor_fp16 predictor_in fp16; else skip predictor_fp16 "fp16 runs on CUDA only"; fi

service_json() {  # gunicorn with one worker answers POST /json with the classes of a photo
    local port
    port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    SEG_CHECKPOINT="$MODEL" SEG_BIND="127.0.0.1:$port" SEG_WORKERS=1 SEG_RESULTS_DIR="$WORK/results" \
        .venv/bin/gunicorn -c app/gunicorn.conf.py "app:create_app()" >"$WORK/gunicorn.log" 2>&1 &
    local server=$! answer=""
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break
        sleep 0.5
    done
    answer=$(curl -sf -F "file=@$(ls "$WORK"/data/train2017/*.jpg | head -1)" "http://127.0.0.1:$port/json")
    kill "$server"
    wait "$server" 2>/dev/null
    echo "$answer"
    echo "$answer" | "$PY" -c "import json, sys; assert json.load(sys.stdin)['classes']"
}
check service_json service_json

if [ "$GPUS" -ge 2 ]; then
    check torchrun_all_gpus "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" "${TRAIN[@]}" \
        --device cuda --epochs 1 --save-dir "$WORK/ddp"
else
    skip torchrun_all_gpus "needs 2 or more GPUs, found $GPUS"
fi

echo "summary: $passed passed, $failed failed, $skipped skipped${skipped_names:+ (${skipped_names[*]})}"
[ "$DEVICE" = cuda ] || echo "no GPU found: run this again on a GPU host for the skipped checks"
[ "$failed" -eq 0 ]
