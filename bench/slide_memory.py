"""Not a timing: the peak memory of slide mode on a large photo, against what its logits would take.

    python bench/slide_memory.py [--checkpoint save/default/model.pth] [--size 4000x3000] [--tta none]

Runs one Predictor.predict(..., Strategy(mode="slide")) in this process on the COCO photo resized
to --size (smooth noise without ../shared) and prints the process's peak RSS before the photo was
made and after the prediction, the photo's own bytes, and the C x H x W float32 logits a
whole-image blend would hold.  ``ratio`` is that logits size over the growth of the peak.
"""
from __future__ import annotations

import argparse
import io
import resource
import time

from benchlib import ROOT, machine, photo_jpeg
from PIL import Image

from utils.inference.predictor import Predictor
from utils.inference.tiling import TTA_CHOICES, Strategy


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "save" / "default" / "model.pth"))
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photo")
    parser.add_argument("--tta", choices=TTA_CHOICES, default="none")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.lower().split("x"))
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", precision="fp32", backend="torch")
    before = peak_rss_mb()
    photo = Image.open(io.BytesIO(photo_jpeg(width, height))).convert("RGB")
    strategy = Strategy(mode="slide", tta=args.tta)
    started = time.perf_counter()
    prediction = predictor.predict(photo, strategy)
    seconds = time.perf_counter() - started
    after = peak_rss_mb()
    logits_mb = predictor.num_classes * width * height * 4 / 2**20
    tiles = strategy.forwards((height, width), predictor.input_size, predictor.num_classes)
    print(machine())
    print(f"{width}x{height}, {predictor.num_classes} classes, tile {predictor.input_size}, tta {args.tta}: "
          f"{tiles} forwards in {seconds:.1f} s")
    print(f"peak RSS: {before:.0f} MB with the model loaded, {after:.0f} MB after the slide run "
          f"(+{after - before:.0f} MB; the photo itself {width * height * 3 / 2**20:.0f} MB as RGB)")
    print(f"C x H x W float32 logits would be {logits_mb:.0f} MB; class map {prediction.class_map.shape}")
    print(f"ratio: {logits_mb / max(after - before, 1):.2f}")


if __name__ == "__main__":
    main()
