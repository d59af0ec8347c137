"""Images/s of cocomask_to_numpy against the tutorial way, side by side on the same input.

    python bench/convert.py [--annotations FILE --images DIR] [--repeat 3]

The tutorial way: one process, ``COCO.annToMask`` per annotation, painted into the mask,
``np.save``.  Defaults to ../shared/data/coco128.  Last line: ``ratio: X.XX``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.data.coco_convert import convert  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def tutorial_convert(annotation_file: str, out_dir: Path) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotation_file)
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
            mask[coco.annToMask(annotation) > 0] = annotation["category_id"]
        np.save(out_dir / (Path(info["file_name"]).stem + ".npy"), mask)
    return len(coco.getImgIds())


def timed(function) -> tuple[int, float]:
    start = time.perf_counter()
    images = function()
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default=str(SHARED / "annotations" / "instances_train2017.json"))
    parser.add_argument("--images", default=str(SHARED / "train2017"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    parser.add_argument("--copies", type=int, default=4,
                        help="list every image this many times (as new ids) for a longer, steadier run")
    args = parser.parse_args()
    if not Path(args.annotations).is_file():
        sys.exit(f"no annotations at {args.annotations}: pass --annotations and --images")

    with tempfile.TemporaryDirectory() as workdir:
        annotations, images = replicate(Path(args.annotations), Path(args.images), args.copies, Path(workdir))
        ours, tutorial, count = compare(str(annotations), images, args.workers, args.repeat)
    print(f"input: {args.annotations} x{args.copies} ({count} images), {os.cpu_count()} cores, "
          f"best of {args.repeat}")
    print(f"tutorial (1 process, annToMask per annotation): {count / tutorial:8.1f} images/s")
    print(f"cocomask_to_numpy ({args.workers} workers):        {count / ours:8.1f} images/s")
    print(f"ratio: {tutorial / ours:.2f}")


def replicate(annotations: Path, images: Path, copies: int, workdir: Path) -> tuple[Path, Path]:
    """A COCO set listing every image ``copies`` times (symlinked files, fresh ids)."""
    data = json.loads(annotations.read_text())
    image_dir = workdir / "images"
    image_dir.mkdir()
    new_images, new_annotations = [], []
    for copy in range(copies):
        offset = copy * 10**9
        for image in data["images"]:
            name = f"{copy}_{image['file_name']}"
            (image_dir / name).symlink_to((images / image["file_name"]).resolve())
            new_images.append({**image, "id": image["id"] + offset, "file_name": name})
        new_annotations += [{**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset}
                            for a in data["annotations"]]
    path = workdir / "instances.json"
    path.write_text(json.dumps({**data, "images": new_images, "annotations": new_annotations}))
    return path, image_dir


def compare(annotations: str, images: Path, workers: int, repeat: int) -> tuple[float, float, int]:
    """Best wall time of ours and of the tutorial's way, and the image count."""
    ours_best = tutorial_best = float("inf")
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            count, seconds = timed(lambda: convert(annotations, images, tmp, workers=workers)["images"])
            ours_best = min(ours_best, seconds)
        with tempfile.TemporaryDirectory() as tmp:
            count, seconds = timed(lambda: tutorial_convert(annotations, Path(tmp)))
            tutorial_best = min(tutorial_best, seconds)
    return ours_best, tutorial_best, count


if __name__ == "__main__":
    main()
