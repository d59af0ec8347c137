"""Class names and colours: the one place they are defined."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The 80 COCO "thing" categories by their official ids (1..90, with 10 ids never used).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

# Pascal VOC's 20 classes and background, in VOC's label order.
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# VOC names that COCO spells otherwise; the other 14 VOC classes carry the COCO name itself.
VOC_TO_COCO_NAMES = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
                     "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}

NUM_COCO_CLASSES = 91  # background + ids 1..90
IGNORE_INDEX = 255  # mask value for "do not learn or score this pixel", in every dataset


def _unused_name(class_id: int) -> str:
    return f"unused-{class_id}"


# Index = class id in our masks: 0 = background, 1..90 = COCO category id.
COCO_CLASSES: tuple[str, ...] = ("background",) + tuple(
    COCO_CATEGORIES.get(i, _unused_name(i)) for i in range(1, NUM_COCO_CLASSES)
)
COCO_UNUSED_IDS: tuple[int, ...] = tuple(
    i for i in range(1, NUM_COCO_CLASSES) if i not in COCO_CATEGORIES
)


def never_labelled_ids(class_names: Sequence[str]) -> list[int]:
    """The indices of ``class_names`` that are COCO ids COCO never uses (``unused-12``...): no
    annotation can teach them, so a model must never answer them."""
    placeholders = {_unused_name(class_id) for class_id in COCO_UNUSED_IDS}
    return [index for index, name in enumerate(class_names) if name in placeholders]


def teacher_groups(teacher_classes: Sequence[str], student_classes: Sequence[str]) -> list[int]:
    """For each student class, the index of the teacher class it belongs to (0 = the teacher's
    background, for student classes the teacher does not know)."""
    by_name = {VOC_TO_COCO_NAMES.get(name, name): index for index, name in enumerate(teacher_classes)}
    groups = [by_name.get(name, 0) for name in student_classes]
    if len(set(groups)) < 2:
        raise ValueError("the teacher shares no class name with the student: nothing to distil")
    return groups


def palette(num_classes: int) -> np.ndarray:
    """A (num_classes, 3) uint8 colour table, the Pascal-VOC bit-interleaved scheme.

    Class 0 is black; neighbouring ids get clearly different colours.
    """
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for class_id in range(num_classes):
        value, r, g, b = class_id, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[class_id] = (r, g, b)
    return colours
