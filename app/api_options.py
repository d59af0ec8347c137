"""The query options of ``POST /json``, checked before the upload is read."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from app.uploads import UploadError
from utils.inference.tiling import MODES, TTA_CHOICES, WHOLE, Strategy, StrategyError


@dataclass(frozen=True)
class ApiOptions:
    rle: bool = False  # add each class's region as COCO RLE
    min_area_ratio: float = 0.0  # leave out classes with a smaller share of the image
    strategy: Strategy = WHOLE  # how the network sees the image (mode, tta, scale)


def parse_api_options(args: Mapping[str, str]) -> ApiOptions:
    """The options from the query string; an unusable value is a 400 naming the parameter."""
    return ApiOptions(rle=flag(args, "rle"), min_area_ratio=ratio(args, "min_area_ratio"), strategy=strategy(args))


def strategy(args: Mapping[str, str]) -> Strategy:
    mode, tta = choice(args, "mode", MODES), choice(args, "tta", TTA_CHOICES)
    raw_scale = args.get("scale")
    try:
        scale = None if raw_scale is None else float(raw_scale)
        return Strategy(mode=mode, tta=tta, scale=scale)
    except (ValueError, StrategyError) as error:
        reason = error if isinstance(error, StrategyError) else f"must be a number, not {raw_scale!r}"
        raise UploadError(f"query parameter scale: {reason}") from None


def choice(args: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    raw = args.get(name, choices[0])
    if raw not in choices:
        raise UploadError(f"query parameter {name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def flag(args: Mapping[str, str], name: str) -> bool:
    raw = args.get(name, "0")
    if raw not in ("0", "1"):
        raise UploadError(f"query parameter {name} must be 0 or 1, not {raw!r}")
    return raw == "1"


def ratio(args: Mapping[str, str], name: str) -> float:
    raw = args.get(name, "0")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise UploadError(f"query parameter {name} must be a number from 0 to 1, not {raw!r}")
    return value
