"""Where the image/mask pairs of non-COCO datasets are, and how their masks are encoded.

Folder layouts, tried in this order for a split S under the dataset root:

    S_images/ + S_masks/           images/S/ + masks/S/         images/S/ + annotations/S/
    images_prepped_S/ + annotations_prepped_S/  (keras-segmentation)   S/ + Sannot/  (SegNet CamVid)

or a list file (``<split-dir>/S.txt``, else ``<root>/S.txt``) whose lines are
``image_path mask_path`` (relative to the root; absolute paths that do not exist are matched
by their last two components, as in SegNet's CamVid lists) or a bare stem.
Pascal-VOC: ``JPEGImages/``, ``SegmentationClass/`` and ``ImageSets/Segmentation/S.txt``.
Images and masks pair by file stem, whatever the extensions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.classes import IGNORE_INDEX, palette
from utils.errors import UserError
from utils.fileio import displayed_size

log = logging.getLogger("data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FOLDER_LAYOUTS = (("{s}_images", "{s}_masks"), ("images/{s}", "masks/{s}"), ("images/{s}", "annotations/{s}"),
                  ("images_prepped_{s}", "annotations_prepped_{s}"), ("{s}", "{s}annot"))
LIST_PAIR_FOLDERS = (("images", "masks"), ("Image", "Mask"), ("images", "annotations"),
                     ("JPEGImages", "SegmentationClass"))
BINARY_THRESHOLD = 128  # anti-aliased 0/255 masks: the edge greys go to the nearer side


class LayoutError(UserError):
    """The dataset's files are not where any known layout puts them."""


def images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def pair_folders(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Pairs by stem; images without a mask are reported, not silently dropped."""
    image_files, mask_files = images_by_stem(images), images_by_stem(masks)
    unmatched = sorted(set(image_files) - set(mask_files))
    if unmatched:
        log.warning("%d image(s) in %s have no mask in %s and are left out, e.g. %s",
                    len(unmatched), images, masks, unmatched[0])
    return [(image_files[s], mask_files[s]) for s in sorted(image_files) if s in mask_files]


def _resolve(root: Path, text: str) -> Path:
    path = Path(text)
    if not path.is_absolute():
        return root / path
    return path if path.exists() else root / Path(*path.parts[-2:])


def _find_by_stem(folder: Path, stem: str) -> Path:
    for extension in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{extension}"
        if candidate.exists():
            return candidate
    raise LayoutError(f"no image named {stem}.* in {folder}")


def pairs_from_list(root: Path, list_file: Path, stem_folders: tuple[str, str] | None = None
                    ) -> list[tuple[Path, Path]]:
    """Pairs from a split list: ``image mask`` per line, or a stem looked up in ``stem_folders``."""
    if stem_folders is None:
        stem_folders = next((f for f in LIST_PAIR_FOLDERS if (root / f[0]).is_dir() and (root / f[1]).is_dir()),
                            None)
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if len(fields) == 2:
            pairs.append((_resolve(root, fields[0]), _resolve(root, fields[1])))
        elif len(fields) == 1 and stem_folders:
            pairs.append((_find_by_stem(root / stem_folders[0], fields[0]),
                          _find_by_stem(root / stem_folders[1], fields[0])))
        elif fields:
            raise LayoutError(f"{list_file}:{number}: expected 'image mask' or a stem, got {line!r}")
    missing = [str(p) for pair in pairs for p in pair if not p.exists()]
    if missing:
        raise LayoutError(f"{list_file} names {len(missing)} missing file(s), e.g. {missing[0]}")
    return pairs


def split_list(root: Path, split: str, split_dir: Path | None) -> Path | None:
    for folder in (split_dir, root):
        if folder is not None and (folder / f"{split}.txt").is_file():
            return folder / f"{split}.txt"
    return None


def folder_pairs(root: Path, split: str, split_dir: Path | None = None) -> list[tuple[Path, Path]]:
    """The pairs of ``split`` in a folder dataset (see the module docstring for the layouts)."""
    if not root.is_dir():
        raise LayoutError(f"dataset folder not found: {root}")
    listed = split_list(root, split, split_dir)
    if listed is not None:
        return pairs_from_list(root, listed)
    for image_pattern, mask_pattern in FOLDER_LAYOUTS:
        images, masks = root / image_pattern.format(s=split), root / mask_pattern.format(s=split)
        if images.is_dir() and masks.is_dir():
            return pair_folders(images, masks)
    raise LayoutError(f"no '{split}' split in {root}: expected {split}_images/ + {split}_masks/ (or another "
                      f"layout in utils/data/layouts.py) or a list {split}.txt; "
                      "`python tools/dataset.py split` writes lists")


def voc_pairs(root: Path, split: str, split_dir: Path | None = None) -> list[tuple[Path, Path]]:
    listed = split_list(root / "ImageSets" / "Segmentation", split, split_dir)
    if listed is None:
        raise LayoutError(f"no ImageSets/Segmentation/{split}.txt under {root} (nor in --split-dir): "
                          "`python tools/dataset.py split --dataset voc` writes lists")
    return pairs_from_list(root, listed, ("JPEGImages", "SegmentationClass"))


# ------------------------------------------------------------------------------ masks


@dataclass(frozen=True)
class MaskFormat:
    """How mask files encode classes: ``ids`` (pixel = class id, palette PNGs included),
    ``binary`` (0/255, thresholded), or ``colour`` (RGB mapped through ``colours``)."""
    mode: str = "ids"
    colours: tuple[tuple[int, int, int], ...] = ()
    void_value: int | None = None  # a label value that means "ignore", e.g. CamVid's 11

    def read(self, path: Path) -> np.ndarray:
        with Image.open(path) as mask:
            if self.mode == "colour":
                labels = self._from_colours(np.asarray(mask.convert("RGB")), path)
            elif self.mode == "binary":
                labels = (np.asarray(mask.convert("L")) >= BINARY_THRESHOLD).astype(np.uint8)
            else:
                labels = np.asarray(mask if mask.mode in ("L", "P") else mask.convert("L")).astype(np.uint8)
        if self.void_value is not None:
            labels = np.where(labels == self.void_value, IGNORE_INDEX, labels).astype(np.uint8)
        return labels

    def _from_colours(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        labels = np.full(codes.shape, IGNORE_INDEX, np.uint8)
        for class_id, (r, g, b) in enumerate(self.colours):
            labels[codes == (r << 16 | g << 8 | b)] = class_id
        unknown = (labels == IGNORE_INDEX).mean()
        if unknown > 0.01:
            log.warning("%s: %.1f%% of pixels match no palette colour (set to ignore)", path.name, 100 * unknown)
        return labels


def read_palette(path: Path | None, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Colours from a file of ``r g b`` lines (one per class), else the VOC colour map."""
    if path is None:
        return tuple(tuple(int(c) for c in row) for row in palette(num_classes))
    rows = [tuple(int(v) for v in line.replace(",", " ").split()) for line in path.read_text().splitlines()
            if line.strip()]
    if any(len(row) != 3 for row in rows):
        raise LayoutError(f"{path}: each line must be 'r g b'")
    return tuple(rows)


def size_mismatches(pairs: list[tuple[Path, Path]]) -> list[int]:
    """Indices of pairs whose mask size differs from the displayed image's (headers only)."""
    return [index for index, (image, mask) in enumerate(pairs) if displayed_size(image) != displayed_size(mask)]
