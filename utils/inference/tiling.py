"""How a network sees an image beyond one whole forward: sliding-window tiles blended with a
smooth window, and test-time augmentation (flips, scales) averaged over softmax probabilities.

``Strategy`` names the choice (``mode`` whole | slide, ``tta``); the Predictor applies it.  Slide
mode walks the image in tiles (default: the checkpoint's training size, overlapping by about a
third), weighs each tile's probabilities by a window that fades towards the tile's borders (so
that their seams do not show) and divides by the summed weights.  The blend never holds C x H x W
for the whole image: it works in vertical strips whose sums fit ``SLIDE_BUDGET_BYTES`` and in bands
of one tile row, keeping only the rows the next tile row still overlaps, and turns each finished
row into the class map and confidence at once.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.transforms import padded_size
from utils.errors import UserError

MODES = ("whole", "slide")
TTA_CHOICES = ("none", "flip", "scales", "flip+scales")
TTA_SCALES = (0.75, 1.0, 1.25)  # mmsegmentation's usual ratios around the training size
SLIDE_BUDGET_BYTES = 256 * 2**20  # one strip's blended probabilities: C x tile height x strip width floats
MIN_TILE, MIN_STRIDE = 16, 8  # pixels: below them a photo would cost tens of thousands of forwards
SCALE_RANGE = (0.05, 4.0)  # slide mode's scale of the image before tiling

# 1 x 3 x h x w input -> 1 x C x h x w logits, a tensor of the caller's own (network_probabilities
# writes the softmax over it): every backend returns fresh memory (OpenVINO a copy of its buffer).
Forward = Callable[[torch.Tensor], torch.Tensor]
TileProbabilities = Callable[[np.ndarray], torch.Tensor]  # h x w x 3 uint8 -> h x w x C probabilities


class StrategyError(UserError):
    """A mode, tile, stride, scale or TTA choice that cannot be applied."""


@dataclass(frozen=True)
class Strategy:
    """``mode``: "whole" (the long side scaled to the training size, one forward: the default) or
    "slide" (tiles at ``scale`` x the original resolution, default 1.0).  ``tile`` and ``stride``
    (pixels, square) default to the training size and two thirds of the tile.  ``tta``: "none",
    "flip" (horizontal), "scales" (TTA_SCALES) or "flip+scales".  An image smaller than a tile is
    one padded tile at its own size, where whole mode would enlarge it to the training size."""
    mode: str = "whole"
    tta: str = "none"
    tile: int | None = None
    stride: int | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise StrategyError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.tta not in TTA_CHOICES:
            raise StrategyError(f"tta must be one of {', '.join(TTA_CHOICES)}, not {self.tta!r}")
        slide_only = [name for name in ("tile", "stride", "scale") if getattr(self, name) is not None]
        if self.mode == "whole" and slide_only:
            raise StrategyError(f"{', '.join(slide_only)}: only in slide mode (whole scales to the training size)")
        for name, smallest in (("tile", MIN_TILE), ("stride", MIN_STRIDE)):
            value = getattr(self, name)
            if value is not None and not smallest <= value <= 8192:
                raise StrategyError(f"{name} must be {smallest}..8192 pixels, not {value}")
        if self.scale is not None and not SCALE_RANGE[0] <= self.scale <= SCALE_RANGE[1]:
            raise StrategyError(f"scale must be within {SCALE_RANGE[0]}..{SCALE_RANGE[1]}, not {self.scale}")
        if self.tile is not None and self.stride is not None and self.stride > self.tile:
            raise StrategyError(f"stride {self.stride} > tile {self.tile} would leave pixels unseen")

    @property
    def plain(self) -> bool:
        """Today's single forward: whole, no augmentation."""
        return self.mode == "whole" and self.tta == "none"

    def tile_and_stride(self, training_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tile height, width), (stride down, across): a third of the tile overlaps by default."""
        tile = (self.tile, self.tile) if self.tile is not None else training_size
        if self.stride is None:
            return tile, tuple(max(1, side - side // 3) for side in tile)
        if self.stride > min(tile):
            raise StrategyError(f"stride {self.stride} > tile {min(tile)} would leave pixels unseen")
        return tile, (self.stride, self.stride)

    def forwards(self, image_size: tuple[int, int], training_size: tuple[int, int], num_classes: int) -> int:
        """How many network forwards an image of (height, width) costs, as slide() runs them: what a
        service bounds."""
        views = (len(TTA_SCALES) if "scales" in self.tta else 1) * (2 if "flip" in self.tta else 1)
        if self.mode == "whole":
            return views
        tile, (down, across) = self.tile_and_stride(training_size)
        height, width = scaled_size(image_size, self.scale or 1.0)
        strips = strip_plan(width, tile[1], across, strip_width_of(tile, num_classes))
        return views * len(tile_starts(height, tile[0], down)) * sum(len(columns) for _, _, columns in strips)


WHOLE = Strategy()


def add_strategy_arguments(parser: argparse.ArgumentParser, modes: tuple[str, ...] = MODES,
                           mode_help: str = "") -> None:
    """--mode, --tile, --stride, --scale and --tta: the scripts' spelling of a Strategy (``modes``
    first is the default; test.py adds its own)."""
    group = parser.add_argument_group("how the network sees each image")
    group.add_argument("--mode", choices=modes, default=modes[0],
                       help=mode_help + "whole: the long side scaled to the training size, one pass; slide: tiles "
                            "of the training size over the image at its own resolution, blended (default: "
                            f"{modes[0]})")
    group.add_argument("--tile", type=int, default=None, help="slide: tile side in pixels (default: the training size)")
    group.add_argument("--stride", type=int, default=None,
                       help="slide: pixels between tiles (default: two thirds of the tile)")
    group.add_argument("--scale", type=float, default=None,
                       help="slide: the image's scale before tiling (default 1: its own resolution)")
    group.add_argument("--tta", choices=TTA_CHOICES, default="none",
                       help=f"test-time augmentation, softmax averaged: flip (2 passes), scales {TTA_SCALES} (3), "
                            "or flip+scales (6)")


def strategy_from_args(args: argparse.Namespace) -> Strategy:
    """The Strategy the options of add_strategy_arguments name (a StrategyError for a bad mix)."""
    return Strategy(mode=args.mode, tta=args.tta, tile=args.tile, stride=args.stride, scale=args.scale)


def tta_probabilities(forward: Forward, batch: torch.Tensor, tta: str, minimum: int = 1,
                      fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """1 x C x h x w softmax probabilities of ``batch`` (1 x 3 x h x w, normalised), averaged over
    the views ``tta`` asks for; each view is padded with ``fill`` (the normalised black pixel the
    Predictor pads with) to a size the network takes, and scaled views' probabilities are resized
    back (bilinear)."""
    height, width = batch.shape[-2:]
    scales = TTA_SCALES if "scales" in tta else (1.0,)
    flips = (False, True) if "flip" in tta else (False,)
    total = None
    for scale in scales:
        view = batch if scale == 1.0 else F.interpolate(
            batch, size=scaled_size((height, width), scale), mode="bilinear",
            align_corners=False)
        for flip in flips:
            probabilities = network_probabilities(forward, view.flip(-1) if flip else view, minimum, fill)
            probabilities = probabilities.flip(-1) if flip else probabilities
            if scale != 1.0:
                probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)
            total = probabilities if total is None else total.add_(probabilities)
    return total.div_(len(scales) * len(flips))


def network_probabilities(forward: Forward, batch: torch.Tensor, minimum: int,
                          fill: torch.Tensor | float) -> torch.Tensor:
    """Softmax over classes of ``forward(batch)``, the batch padded bottom/right with ``fill`` to
    a size the network accepts and the output cropped back."""
    height, width = batch.shape[-2:]
    padded_height, padded_width = padded_size(height, width, minimum=minimum)
    padded = batch
    if (padded_height, padded_width) != (height, width):
        padded = batch.new_empty(*batch.shape[:2], padded_height, padded_width).copy_(
            torch.as_tensor(fill, dtype=batch.dtype, device=batch.device).expand(*batch.shape[:2], 1, 1)
            .expand(*batch.shape[:2], padded_height, padded_width))
        padded[..., :height, :width] = batch
    logits = forward(padded.contiguous(memory_format=torch.channels_last))
    # Over pixel-major rows (channels_last logits viewed N x H x W x C): 3x faster than over dim 1.
    # In place: a 91-class 384x384 tile's fresh 53 MB output page-faulted for longer than the
    # softmax itself took (32 -> 17 ms, AMD EPYC avx512_bf16). NCHW logits (ONNX Runtime's) go
    # through PyTorch's own contiguous copy, as they did out of place.
    rows = logits.float().permute(0, 2, 3, 1)
    rows = torch.softmax(rows, dim=-1, out=rows)
    return rows.permute(0, 3, 1, 2)[..., :height, :width]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Where tiles start along a side of ``length``: every ``stride``, the last one flush with the
    end (one tile, at 0, when the side is shorter than a tile)."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


def smooth_window(height: int, width: int) -> torch.Tensor:
    """height x width weights: a separable squared sine, 1 in the middle, falling towards the
    borders without reaching 0 (so that a pixel seen by a single tile keeps a weight)."""
    def along(size: int) -> torch.Tensor:
        return torch.sin(torch.pi * (torch.arange(size, dtype=torch.float32) + 0.5) / size) ** 2
    return along(height)[:, None] * along(width)[None, :]


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A (height, width) or (width, height) times ``scale``, each side at least one pixel."""
    return tuple(max(1, round(side * scale)) for side in size)


def strip_width_of(tile: tuple[int, int], num_classes: int, budget_bytes: int | None = None) -> int:
    """The widest strip whose C x tile height sums fit ``budget_bytes`` (default SLIDE_BUDGET_BYTES),
    at least a tile."""
    budget_bytes = SLIDE_BUDGET_BYTES if budget_bytes is None else budget_bytes
    return max(tile[1], budget_bytes // (4 * num_classes * tile[0]))


def strip_plan(width: int, tile_width: int, across: int, strip_width: int) -> list[tuple[int, int, list[int]]]:
    """(left, right, the tile columns reaching it) of each vertical strip: at most ``strip_width``
    wide, each border where a tile column ends, so that only the tiles across a border run twice."""
    columns, plan, left = tile_starts(width, tile_width, across), [], 0
    while left < width:
        ends = [x + tile_width for x in columns if left < x + tile_width <= left + strip_width]
        right = min(width, max(ends) if ends else left + strip_width)
        plan.append((left, right, [x for x in columns if x < right and x + tile_width > left]))
        left = right
    return plan


def slide(pixels: np.ndarray, probabilities: TileProbabilities, tile: tuple[int, int], stride: tuple[int, int],
          num_classes: int, budget_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H x W class ids, H x W confidence) of the H x W x 3 image ``pixels``: every tile's
    ``probabilities`` weighted by the smooth window, summed and divided by the weights, in strips
    whose sums fit ``budget_bytes`` (strip_width_of).  Beside the sums and the H x W results, the
    peak holds one tile at a time: the network's activations and its logits, softmaxed in place
    (C x tile floats; with TTA, the views' running sum and the largest view's logits)."""
    height, width = pixels.shape[:2]
    rows = tile_starts(height, tile[0], stride[0])
    window = smooth_window(*tile)
    class_ids = torch.empty(height, width, dtype=torch.int32)
    confidence = torch.empty(height, width, dtype=torch.float32)
    for left, right, inside in strip_plan(width, tile[1], stride[1], strip_width_of(tile, num_classes, budget_bytes)):
        for top, bottom, blended in strip_bands(pixels, probabilities, window, rows, inside, (left, right),
                                                num_classes):
            class_ids[top:bottom, left:right], confidence[top:bottom, left:right] = top_of(blended)
    return class_ids, confidence


def strip_bands(pixels: np.ndarray, probabilities: TileProbabilities, window: torch.Tensor, rows: list[int],
                columns: list[int], span: tuple[int, int],
                num_classes: int) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
    """(top, bottom, (h x w x C weighted sums, h x w weights)) of the columns ``span`` of the image, a band of
    finished rows after each tile row: the rows the next tile row does not reach.  The band is a view
    of buffers the next tile row writes over: read it before asking for the next."""
    height = pixels.shape[0]
    left, right = span
    tile_height, tile_width = window.shape
    # One tile row's rows, the buffers' first row always the current tile row's first; kept from
    # row to row: a fresh pair per tile row page-faulted in for longer than the sums took.
    sums = torch.empty(min(height, tile_height), right - left, num_classes)  # pixel-major, as tiles come
    weights = torch.empty(sums.shape[:2])
    held = 0  # rows at the top that carry the previous tile row's sums already
    for index, y in enumerate(rows):
        bottom = min(height, y + tile_height)
        sums[held:bottom - y].zero_()
        weights[held:bottom - y].zero_()
        for x in columns:
            # Passed straight in: no name holds the tile's probabilities while the next tile's forward runs.
            add_tile(probabilities(pixels[y:bottom, x:x + tile_width]), window, x - left, sums, weights)
        done = rows[index + 1] if index + 1 < len(rows) else bottom
        yield y, done, (sums[:done - y], weights[:done - y])
        held = bottom - done  # the rows the next tile row overlaps move to the top
        if held:  # nothing is carried past the last tile row (nor by an empty image, whose move would be by 0 rows)
            for buffer in (sums, weights):
                move_rows_up(buffer, done - y, bottom - y)


def add_tile(tile: torch.Tensor, window: torch.Tensor, column: int, sums: torch.Tensor,
             weights: torch.Tensor) -> None:
    """``tile`` (h x w x C probabilities) times ``window`` added into the top rows of ``sums`` and the
    window into those of ``weights``, the tile's first column at their ``column``; the tile's columns
    outside them (``column`` may be negative) are left out."""
    seen = slice(max(0, -column), min(sums.shape[1] - column, tile.shape[1]))
    target = (slice(0, tile.shape[0]), slice(column + seen.start, column + seen.stop))
    weight = window[:tile.shape[0], seen]
    sums[target].addcmul_(tile[:, seen], weight[..., None])  # in place: no tile-sized temporary
    weights[target] += weight


def move_rows_up(buffer: torch.Tensor, start: int, stop: int) -> None:
    """Rows ``start:stop`` of ``buffer`` copied to its top, in blocks no taller than ``start``: no
    block overlaps where it goes, so nothing is cloned (a clone raised the peak of a 91-class slide
    over 2000 x 1500 by about 20 MB)."""
    for row in range(start, stop, start):
        end = min(stop, row + start)
        buffer[row - start:end - start] = buffer[row:end]


def top_of(blended: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The class with the largest blended probability, and that probability.  A pixel's weight
    divides all its classes alike, so the largest sum is the largest probability: only the maximum
    is divided, not C classes per pixel.  Where two sums within an ulp would divide to the same
    probability, the class of the larger sum wins."""
    sums, weights = blended
    largest, class_ids = sums.max(dim=-1)
    return class_ids.to(torch.int32), largest.div_(weights)
