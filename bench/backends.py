"""Every backend and precision this machine can run, side by side in one run: forward time, the
whole ``Predictor.predict`` of a JPEG photo (decode to class map and confidence), and the argmax
agreement of each with torch fp32 on real photos.

    python bench/backends.py [--checkpoint save/default/model.pth] [--photos 8] [--repeat 5]

Rows: torch fp32 (channels_last: the service's torch path), torch bf16 (only where the CPU has
native bf16), onnxruntime fp32, OpenVINO fp32, OpenVINO bf16 (native only) and OpenVINO INT8
(an INT8 IR whose guard verdict passed, from tools/quantize.py; or one it refused and kept with
--keep-refused, timed here but never served: the row says "refused").  A row that cannot run
here says why.  The photos are the first --photos of ../shared/data/coco-tiny/val2017 (a
synthetic photo when ../shared is absent); the forward and predict times are medians on a
640x480 photo, the rows taking turns so that drift hits them alike.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from benchlib import ROOT, background_load, cores, machine, photo_jpeg, seconds_of
from PIL import Image

from app.uploads import decode_image
from utils.errors import UserError
from utils.inference.openvino_runtime import OpenVINOForward, int8_xml, openvino
from utils.inference.predictor import Predictor
from utils.precision import cpu_supports_bf16

PHOTOS = ROOT.parent / "shared" / "data" / "coco-tiny" / "val2017"
MAX_PIXELS = 40_000_000


def rows() -> list[tuple[str, dict, str | None]]:
    """(name, Predictor options, why it cannot run here or None)."""
    native = None if cpu_supports_bf16() else "no native bf16 on this CPU (emulated bf16 is slower than fp32)"
    onnx = None if all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript")) else \
        "pip install -r requirements-dev.txt"
    openvino = None if importlib.util.find_spec("openvino") else "pip install -r requirements.txt"
    return [("torch fp32", {"backend": "torch", "precision": "fp32"}, None),
            ("torch bf16", {"backend": "torch", "precision": "bf16"}, native),
            ("onnxruntime fp32", {"backend": "onnxruntime", "precision": "fp32"}, onnx),
            ("openvino fp32", {"backend": "openvino", "precision": "fp32"}, openvino),
            ("openvino bf16", {"backend": "openvino", "precision": "bf16"}, openvino or native),
            ("openvino int8", {"backend": "openvino", "precision": "int8"}, openvino)]


def refused_int8(checkpoint: str, threads: int) -> Predictor | None:
    """A predictor on the INT8 IR that tools/quantize.py --keep-refused left, for timing only."""
    xml = int8_xml(checkpoint)
    if not xml.exists():
        return None
    fp32 = Predictor.from_checkpoint(checkpoint, device="cpu", threads=threads, precision="fp32", backend="openvino")
    ir = openvino().Core().read_model(str(xml))
    refused = Predictor(fp32.model, fp32.meta, fp32.device, "int8", OpenVINOForward(ir, threads, "int8"), "openvino")
    refused.warm_up()
    return refused


def photos(count: int) -> list[Image.Image]:
    paths = sorted(PHOTOS.glob("*.jpg"))[:count]
    if not paths:
        print(f"{PHOTOS} is absent: agreement on one synthetic photo")
        return [decode_image(photo_jpeg(), MAX_PIXELS)]
    return [Image.open(path).convert("RGB") for path in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "save" / "default" / "model.pth"))
    parser.add_argument("--photos", type=int, default=8, help="real photos the agreement is measured on")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each row (medians reported)")
    parser.add_argument("--threads", type=int, default=cores())
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    print(background_load() + machine())
    jpeg = photo_jpeg(640, 480)
    loaded = {}
    for name, options, missing in rows():
        if missing:
            print(f"{name}: skipped ({missing})")
            continue
        try:
            loaded[name] = Predictor.from_checkpoint(args.checkpoint, device="cpu", threads=args.threads, **options)
        except UserError as error:
            refused = refused_int8(args.checkpoint, args.threads) if name == "openvino int8" else None
            if refused is None:
                print(f"{name}: skipped ({error})")
            else:
                loaded[f"{name} (refused)"] = refused
    batches = {name: predictor.preprocess(decode_image(jpeg, MAX_PIXELS))[0] for name, predictor in loaded.items()}
    forward = {name: [] for name in loaded}
    predict = {name: [] for name in loaded}
    with torch.inference_mode():
        for name, predictor in loaded.items():  # twice: OpenVINO compiles a size's own graph when it comes back
            for _ in range(2):
                predictor.forward(batches[name])
        for _ in range(args.repeat):
            for name, predictor in loaded.items():
                forward[name].append(seconds_of(lambda p=predictor, b=batches[name]: p.forward(b)) * 1000)
                predict[name].append(seconds_of(lambda p=predictor: p.predict(decode_image(jpeg, MAX_PIXELS))) * 1000)
    images = photos(args.photos)
    reference = [loaded["torch fp32"].predict(image).class_map for image in images]
    base_forward, base_predict = np.median(forward["torch fp32"]), np.median(predict["torch fp32"])
    print(f"\n{Path(args.checkpoint).name}, 640x480 photo, {args.threads} threads, medians of {args.repeat}; "
          f"agreement with torch fp32 on {len(images)} photos")
    print(f"{'row':<24}{'forward ms':>11}{'x':>6}{'predict ms':>12}{'x':>6}{'agreement':>11}{'worst photo':>13}")
    for name, predictor in loaded.items():
        agreements = [float((predictor.predict(image).class_map == ref).mean()) for image, ref in zip(images, reference,
                                                                                                    strict=True)]
        f, p = np.median(forward[name]), np.median(predict[name])
        print(f"{name:<24}{f:>11.0f}{base_forward / f:>5.2f}x{p:>12.0f}{base_predict / p:>5.2f}x"
              f"{np.mean(agreements):>11.4%}{min(agreements):>13.4%}")


if __name__ == "__main__":
    main()
