"""Small synthetic COCO-format datasets for tests and demos.

Each image is a noisy background with a few polygons, filled with a colour that belongs to
the polygon's category, so a small network can learn it.  The annotations cover what real
COCO files contain: multi-part polygons, a degenerate polygon part, uncompressed-RLE crowd
regions, compressed RLE, overlapping instances and images without annotations.

    python -m tests.synthetic_coco OUT_DIR [--images N]
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from utils.data.coco_convert import convert

CATEGORY_COLOURS = {1: (220, 40, 40), 3: (40, 200, 40), 18: (40, 60, 220), 44: (230, 210, 30)}
CATEGORY_NAMES = {1: "person", 3: "car", 18: "dog", 44: "bottle"}


@dataclass
class SyntheticCoco:
    annotation_file: Path
    image_dir: Path


def _random_polygon(rng: random.Random, height: int, width: int) -> list[float]:
    """A convex-ish polygon of 3-7 points around a random centre."""
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    radius = rng.uniform(0.15, 0.35) * min(height, width)
    count = rng.randint(3, 7)
    angles = sorted(rng.uniform(0, 2 * np.pi) for _ in range(count))
    points = []
    for angle in angles:
        r = radius * rng.uniform(0.6, 1.0)
        points += [round(min(max(cx + r * np.cos(angle), 0), width - 1), 2),
                   round(min(max(cy + r * np.sin(angle), 0), height - 1), 2)]
    return points


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def _annotation_for(kind: str, rng: random.Random, height: int, width: int) -> dict:
    if kind == "multi":
        return {"segmentation": [_random_polygon(rng, height, width),
                                 _random_polygon(rng, height, width)]}
    if kind == "degenerate":  # one real part and one of two points, which must be skipped
        return {"segmentation": [_random_polygon(rng, height, width), [1.0, 1.0, 5.0, 5.0]]}
    region = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(
        [_random_polygon(rng, height, width)], height, width)))
    if kind == "crowd":
        return {"segmentation": _uncompressed_rle(region), "iscrowd": 1}
    if kind == "compressed":
        rle = coco_mask.encode(np.asfortranarray(region))
        return {"segmentation": {"counts": rle["counts"].decode(), "size": rle["size"]}}
    return {"segmentation": [_random_polygon(rng, height, width)]}


def _decoded(annotation: dict, height: int, width: int) -> np.ndarray:
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects([p for p in segmentation if len(p) >= 6],
                                                    height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle).astype(bool)


def _draw_image(rng: np.random.Generator, height: int, width: int, annotations: list[dict]
                ) -> np.ndarray:
    image = rng.integers(60, 140, size=(height, width, 3), dtype=np.uint8)
    for annotation in sorted(annotations, key=lambda a: (-a["area"], a["id"])):
        region = _decoded(annotation, height, width)
        colour = np.array(CATEGORY_COLOURS[annotation["category_id"]], np.int16)
        noise = rng.integers(-12, 13, size=(int(region.sum()), 3))
        image[region] = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return image


KINDS = ("polygon", "polygon", "multi", "compressed", "crowd", "degenerate")


def make_coco(root: str | Path, num_images: int = 8, size: tuple[int, int] = (64, 80),
              seed: int = 0, split: str = "train2017", max_objects: int = 4) -> SyntheticCoco:
    """Write ``root/<split>/*.jpg`` and ``root/annotations/instances_<split>.json``.

    Image 0 has no annotations; sizes vary by up to a quarter around ``size``.
    """
    root = Path(root)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        height = int(size[0] * rng.uniform(0.75, 1.25))
        width = int(size[1] * rng.uniform(0.75, 1.25))
        image_id = 1000 + index
        own = []
        for _ in range(0 if index == 0 else rng.randint(1, max_objects)):
            annotation = _annotation_for(rng.choice(KINDS), rng, height, width)
            annotation.update(id=len(annotations) + len(own) + 1, image_id=image_id,
                              category_id=rng.choice(sorted(CATEGORY_COLOURS)),
                              iscrowd=annotation.get("iscrowd", 0))
            annotation["area"] = float(_decoded(annotation, height, width).sum())
            own.append(annotation)
        annotations += own
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(_draw_image(np_rng, height, width, own)).save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    categories = [{"id": i, "name": n, "supercategory": "thing"} for i, n in CATEGORY_NAMES.items()]
    annotation_file = root / "annotations" / f"instances_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return SyntheticCoco(annotation_file, image_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the dataset into")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--split", default="train2017")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    made = make_coco(args.out, args.images, split=args.split, seed=args.seed)
    print(f"wrote {args.images} images to {made.image_dir} and {made.annotation_file}")


def make_training_root(root: Path, **options) -> Path:
    """A synthetic set (``make_coco`` options) with its masks converted, in the layout train.py
    reads: ``<root>/train2017/*.jpg`` and ``<root>/masks/train2017/*.npy``."""
    made = make_coco(root, **options)
    convert(made.annotation_file, made.image_dir, root / "masks" / "train2017")
    return root
