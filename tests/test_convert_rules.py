"""Guards for the conversion reference test, and the tie-break of the painting order.

tests/test_convert.py compares our masks with an independent computation on the synthetic set;
that comparison checks a rule only if the data has a case where the rule decides a pixel.  The
guards below fail when a change to tests/synthetic_coco.py leaves such a case out.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from utils.data.coco_convert import convert

PaintOrder = Callable[[list[dict]], list[dict]]


def smaller_wins(instances: list[dict]) -> list[dict]:
    return sorted(instances, key=lambda a: (-a["area"], a["id"]))


def larger_wins(instances: list[dict]) -> list[dict]:
    return sorted(instances, key=lambda a: (a["area"], -a["id"]))


def painted(coco: COCO, image: dict, order: PaintOrder, crowd_last: bool = False) -> np.ndarray:
    """One image's mask with pycocotools: crowd regions as 255 (first, or over everything), then
    the instances in ``order``; later paint covers earlier paint."""
    mask = np.zeros((image["height"], image["width"]), np.uint8)
    annotations = coco.imgToAnns[image["id"]]
    crowd = [(a, 255) for a in annotations if a["iscrowd"]]
    instances = [(a, a["category_id"]) for a in order([a for a in annotations if not a["iscrowd"]])]
    for annotation, value in instances + crowd if crowd_last else crowd + instances:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # pycocotools would read a 2-point part as a box
            annotation = dict(annotation, segmentation=[p for p in segmentation if len(p) >= 6])
        mask[coco.annToMask(annotation) == 1] = value
    return mask


def differing_images(annotation_file: Path, first: dict, second: dict) -> list[int]:
    """Ids of the images whose masks differ between two ways of painting (``painted`` options)."""
    coco = COCO(str(annotation_file))
    return [image["id"] for image in coco.dataset["images"]
            if not np.array_equal(painted(coco, image, **first), painted(coco, image, **second))]


def test_synthetic_overlaps_decide_pixels_by_size(synthetic_coco):
    """Overlapping instances of different classes: smaller-wins and larger-wins disagree."""
    assert differing_images(synthetic_coco.annotation_file, {"order": smaller_wins}, {"order": larger_wins})


def test_synthetic_crowd_regions_lie_over_instances(synthetic_coco):
    """A crowd region overlaps an instance: painting it first or last gives different masks."""
    assert differing_images(synthetic_coco.annotation_file, {"order": smaller_wins},
                            {"order": smaller_wins, "crowd_last": True})


def square(left: int, top: int, side: int) -> list[list[float]]:
    right, bottom = left + side, top + side
    return [[left, top, right, top, right, bottom, left, bottom]]


def two_equal_squares(root: Path, first_id: int, second_id: int) -> tuple[Path, Path]:
    """One 20x20 image with two overlapping 8x8 squares of equal area: category 1 with annotation
    id ``first_id`` listed first, category 3 with ``second_id``."""
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(images / "a.jpg")
    annotations = [
        {"id": first_id, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 64.0, "segmentation": square(2, 2, 8)},
        {"id": second_id, "image_id": 1, "category_id": 3, "iscrowd": 0, "area": 64.0,
         "segmentation": square(6, 6, 8)},
    ]
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}], "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(data))
    return annotation_file, images


def test_equal_areas_are_painted_by_annotation_id_so_the_higher_id_wins(tmp_path):
    for first_id, second_id, winner in ((9, 4, 1), (4, 9, 3)):
        annotation_file, images = two_equal_squares(tmp_path / f"{first_id}-{second_id}", first_id, second_id)
        convert(annotation_file, images, tmp_path / f"out-{first_id}", workers=1)
        mask = np.load(tmp_path / f"out-{first_id}" / "a.npy")
        assert mask[3, 3] == 1 and mask[12, 12] == 3  # outside the overlap each square keeps its class
        assert (mask[7:9, 7:9] == winner).all(), (first_id, second_id)
