"""What slide mode and test-time augmentation cost, side by side in one run: seconds per image
of each strategy against plain whole mode on the same photos, the strategies taking turns on
each photo so that drift and neighbours hit them alike.

    python bench/strategies.py --checkpoint save/flood-weather/best.pth --images DIR [--count 10]

Their gain is test.py's to measure (``test.py ... --mode slide``); this is the cost beside it.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchlib import background_load, machine, seconds_of
from PIL import Image

from utils.inference.predictor import Predictor
from utils.inference.tiling import Strategy

STRATEGIES = {"whole": Strategy(), "whole + flip": Strategy(tta="flip"),
              "whole + flip+scales": Strategy(tta="flip+scales"), "slide": Strategy(mode="slide"),
              "slide + flip": Strategy(mode="slide", tta="flip")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", required=True, help="a folder of photos (the first --count, by name)")
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    warning = background_load()
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu", precision="fp32", backend="torch")
    paths = sorted(path for path in Path(args.images).iterdir() if path.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = [Image.open(path).convert("RGB") for path in paths[:args.count]]
    seconds: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    forwards: dict[str, int] = dict.fromkeys(STRATEGIES, 0)
    for photo in photos:
        for name, strategy in STRATEGIES.items():
            seconds[name].append(seconds_of(lambda: predictor.predict(photo, strategy)))  # noqa: B023
            forwards[name] += strategy.forwards((photo.height, photo.width), predictor.input_size,
                                                predictor.num_classes)
    print(warning + machine())
    sizes = sorted(max(photo.size) for photo in photos)
    print(f"{args.checkpoint}: {len(photos)} photos, long side {sizes[0]}-{sizes[-1]} px (median "
          f"{statistics.median(sizes):.0f}), training size {predictor.input_size}")
    plain = statistics.fmean(seconds["whole"])
    for name in STRATEGIES:
        mean = statistics.fmean(seconds[name])
        print(f"{name:<22} {mean:7.2f} s per image, {forwards[name] / len(photos):6.1f} forwards, "
              f"{mean / plain:6.1f}x whole")
    print(f"ratio: {statistics.fmean(seconds['slide']) / plain:.2f}")


if __name__ == "__main__":
    main()
