"""All drawing of class maps: colour maps, overlays on photos, legends and image | truth | prediction panels.

A shared helper rather than part of a stage: the dataset tool (data), the best/worst figures
(evaluation) and the Predictor's users (inference) all draw the same way.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from utils.classes import IGNORE_INDEX, palette
from utils.fileio import to_rgb

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


def render_overlay(image: Image.Image, class_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with each class's palette colour blended in at ``alpha``; background stays the photo."""
    photo = to_rgb(image)
    if (photo.height, photo.width) != class_map.shape:
        raise ValueError(f"class map {class_map.shape} does not match the image {(photo.height, photo.width)}")
    # PIL blends and composites in C, several times faster than the same arithmetic in numpy floats.
    return Image.composite(Image.blend(photo, colour_image(class_map), alpha), photo, Image.fromarray(class_map > 0))


def colour_image(class_map: np.ndarray) -> Image.Image:
    """The RGB image of each pixel's palette colour."""
    if class_map.dtype != np.uint8:
        return Image.fromarray(palette(int(class_map.max()) + 1)[class_map])
    # A palette image is expanded to RGB in C, about 3x faster than indexing the table in numpy.
    return class_map_image(class_map).convert("RGB")


def class_map_image(class_map: np.ndarray) -> Image.Image:
    """The class ids as an image whose pixel values are the ids: a palette image carrying the
    class colours for uint8 maps (so viewers show colours), 16-bit grayscale for wider ones."""
    if class_map.dtype != np.uint8:
        return Image.fromarray(class_map.astype(np.uint16))
    indexed = Image.fromarray(class_map)
    indexed.putpalette(palette(int(class_map.max()) + 1).tobytes())
    return indexed


def truth_overlay(image: Image.Image, mask: np.ndarray, paint_ignore: bool = False) -> Image.Image:
    """A ground-truth mask over its photo: classes in their palette colours, background the plain
    photo; ignore pixels the plain photo too or, with ``paint_ignore``, IGNORE_COLOUR."""
    overlay = render_overlay(image, np.where(mask == IGNORE_INDEX, 0, mask).astype(np.uint8))
    if not paint_ignore:
        return overlay
    pixels = np.array(overlay)
    pixels[mask == IGNORE_INDEX] = IGNORE_COLOUR
    return Image.fromarray(pixels)
