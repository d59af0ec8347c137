"""Convert MS-COCO instance annotations into one uint8 class mask (.npy) per image.

    python cocomask_to_numpy.py --annotations instances_train2017.json \\
        --images train2017 --out masks/train2017 [--workers N] [--shard I/N]

See utils/data/coco_convert.py for the overlap rules; README.md for the layout.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.cli import user_errors_exit
from utils.data.coco_convert import CROWD_CHOICES, OVERLAP_CHOICES, Rules, convert, parse_shard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", required=True, help="COCO instances_*.json")
    parser.add_argument("--images", required=True, help="folder holding the JSON's images")
    parser.add_argument("--out", required=True, help="folder for <stem>.npy masks")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (default: all cores)")
    parser.add_argument("--crowd", choices=CROWD_CHOICES, default="ignore",
                        help="crowd regions: 255 (ignore, default), their class (label), or dropped (skip)")
    parser.add_argument("--overlap", choices=OVERLAP_CHOICES, default="smaller-wins",
                        help="where instances overlap: the smaller wins (default) or 255 (ignore)")
    parser.add_argument("--shard", default="0/1", help="convert only shard I of N (0-based), e.g. 1/4")
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = convert(args.annotations, args.images, args.out, Rules(args.crowd, args.overlap),
                      args.workers, parse_shard(args.shard))
    present = sum(count > 0 for count in summary["class_pixel_counts"][1:])
    print(f"{summary['images']} images ({summary['masks_written']} written, "
          f"{summary['masks_reused']} already done, {summary['empty_images']} without annotations), "
          f"{summary['annotations']} annotations, {summary['skipped_annotations']} skipped, "
          f"{summary['degenerate_polygons']} degenerate polygons, {present} classes present, "
          f"{summary['ignore_pixels']} ignore pixels -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
