"""Drawing class maps for people: colour maps, legends and image | truth | prediction panels."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from utils.classes import palette

IGNORE_COLOUR = (255, 255, 255)
SWATCH = 14


def colorize(class_map: np.ndarray, num_classes: int) -> Image.Image:
    """Class ids -> RGB with the project palette; 255 (ignore) drawn white."""
    colours = np.zeros((256, 3), np.uint8)
    colours[:num_classes] = palette(num_classes)
    colours[255] = IGNORE_COLOUR
    return Image.fromarray(colours[class_map.astype(np.uint8)])


def legend(class_ids: list[int], class_names: list[str], width: int) -> Image.Image:
    """A strip listing each class id with its colour and name, wrapped to ``width``."""
    colours = palette(len(class_names))
    entries = [(colours[i], f"{i} {class_names[i]}") for i in class_ids]
    column = 170
    per_row = max(1, width // column)
    rows = max(1, -(-len(entries) // per_row))
    strip = Image.new("RGB", (width, rows * (SWATCH + 6) + 6), "white")
    draw = ImageDraw.Draw(strip)
    for n, (colour, text) in enumerate(entries):
        x, y = 6 + (n % per_row) * column, 6 + (n // per_row) * (SWATCH + 6)
        draw.rectangle([x, y, x + SWATCH, y + SWATCH], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + SWATCH + 4, y + 1), text, fill="black")
    return strip


def panels(image: Image.Image, truth: np.ndarray | None, prediction: np.ndarray,
           class_names: list[str]) -> Image.Image:
    """image | ground truth | prediction side by side, with a legend of the classes present."""
    num_classes = len(class_names)
    tiles = [image] + ([colorize(truth, num_classes)] if truth is not None else [])
    tiles.append(colorize(prediction, num_classes))
    present = set(np.unique(prediction).tolist())
    if truth is not None:
        present |= set(np.unique(truth).tolist())
    ids = sorted(i for i in present if i < num_classes)
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    key = legend(ids, class_names, width)
    canvas = Image.new("RGB", (width, image.height + key.height), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 4
    canvas.paste(key, (0, image.height))
    return canvas
