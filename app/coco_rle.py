"""Class regions as COCO run-length encoding, the form COCO tooling (pycocotools) reads."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pycocotools import mask as coco_mask


def class_rles(class_map: np.ndarray, class_ids: Iterable[int]) -> dict[int, dict]:
    """``{id: {"size": [h, w], "counts": str}}``: each class's pixels in pycocotools' compressed
    string form, so that ``pycocotools.mask.decode`` gives back exactly those pixels."""
    # COCO runs go down the columns: one column-major copy, then each comparison keeps that order.
    columns_first = np.asfortranarray(class_map)
    rles = {}
    for class_id in class_ids:
        rle = coco_mask.encode((columns_first == class_id).view(np.uint8))
        rles[class_id] = {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return rles
