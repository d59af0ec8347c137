"""What a prediction holds, per class: the summary the service answers with."""
from __future__ import annotations

import numpy as np

from utils.inference.predictor import Prediction


def summarize(prediction: Prediction, class_names: list[str]) -> list[dict]:
    """One entry per class present (id, name, area in pixels, area_ratio, mean_confidence),
    largest area first."""
    class_ids = prediction.class_map.ravel()
    areas = np.bincount(class_ids, minlength=len(class_names))
    confidence_sums = np.bincount(class_ids, weights=prediction.confidence.ravel(), minlength=len(class_names))
    present = np.flatnonzero(areas)
    present = present[np.argsort(-areas[present], kind="stable")]
    return [{"id": int(class_id), "name": class_names[class_id], "area": int(areas[class_id]),
             "area_ratio": float(areas[class_id] / class_ids.size),
             "mean_confidence": float(confidence_sums[class_id] / areas[class_id])}
            for class_id in present]
