"""Segmentation datasets: (image, mask) pairs read from disk and transformed together."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

import config
from utils.classes import COCO_CLASSES, IGNORE_INDEX, VOC_CLASSES
from utils.data.layouts import (
    LayoutError,
    MaskFormat,
    folder_pairs,
    images_by_stem,
    read_palette,
    size_mismatches,
    voc_pairs,
)
from utils.errors import UserError
from utils.fileio import ImageReadError, displayed_size, load_rgb

log = logging.getLogger("data")

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class DatasetError(UserError):
    """The data on disk is missing or inconsistent; the message names the file."""


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem."""
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    return images_by_stem(folder)


def check_mask(mask: np.ndarray, image_shape: tuple[int, int], num_classes: int, name: str) -> None:
    """Raise a DatasetError naming ``name`` if the mask does not fit its image or the classes."""
    if mask.shape != image_shape:
        raise DatasetError(f"{name}: image is {image_shape[1]}x{image_shape[0]} but its mask is "
                           f"{mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} (WxH)")
    invalid = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if invalid.any():
        values = sorted(set(np.unique(mask[invalid]).tolist()))[:10]
        raise DatasetError(f"{name}: mask holds values {values} outside 0..{num_classes - 1} "
                           f"(and {IGNORE_INDEX} = ignore)")


class PairedDataset(Dataset):
    """Images paired with masks; ``read_mask`` turns a mask file into an HxW uint8 array.

    ``resize_mismatched``: a mask whose size differs from its image is resized (nearest) to
    it, for datasets known to contain such pairs (warned about when the dataset is built);
    otherwise a mismatch is an error naming the file.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], read_mask: Callable[[Path], np.ndarray],
                 class_names: list[str], transform: Transform | None = None, resize_mismatched: bool = False
                 ) -> None:
        if not pairs:
            raise DatasetError("the dataset is empty: no image/mask pairs found")
        self.pairs = pairs
        self.read_mask = read_mask
        self.class_names = list(class_names)
        self.num_classes = len(class_names)
        self.transform = transform
        self.resize_mismatched = resize_mismatched

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (HxWx3 uint8 image, HxW uint8 mask), checked."""
        image_path, mask_path = self.pairs[index]
        try:
            image = np.asarray(load_rgb(image_path))
            mask = self.read_mask(mask_path)
        except (ImageReadError, OSError) as error:
            raise DatasetError(f"cannot read {image_path.name} or its mask: {error}") from error
        if self.resize_mismatched and mask.shape != image.shape[:2]:
            mask = cv2.resize(mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        check_mask(mask, image.shape[:2], self.num_classes, image_path.name)
        return image, mask

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) as displayed, read from the header only."""
        return displayed_size(self.pairs[index][0])

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transform is None:
            return image, mask
        return self.transform(image, mask)


def read_npy_mask(path: Path) -> np.ndarray:
    try:
        mask = np.load(path)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read mask {path}: {error}") from error
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D uint8 mask, got {mask.dtype} {mask.shape}")
    return mask


def coco_mask_dataset(image_dir: str | os.PathLike, mask_dir: str | os.PathLike,
                      transform: Transform | None = None) -> PairedDataset:
    """COCO images with the ``<stem>.npy`` masks written by cocomask_to_numpy.py."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images = list_images(image_dir)
    if not mask_dir.is_dir():
        raise DatasetError(f"mask folder not found: {mask_dir} (run cocomask_to_numpy.py first)")
    masks = {p.stem: p for p in mask_dir.glob("*.npy")}
    unmatched = sorted(set(images) - set(masks))
    if unmatched:
        raise DatasetError(f"{len(unmatched)} image(s) in {image_dir} have no mask in {mask_dir}, "
                           f"e.g. {unmatched[0]} (run cocomask_to_numpy.py on them)")
    return PairedDataset([(images[s], masks[s]) for s in sorted(images)], read_npy_mask, list(COCO_CLASSES),
                         transform)


DATASET_KINDS = ("coco", "folder", "voc")
MASK_MODES = ("ids", "binary", "colour")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which dataset a script reads: one definition for every script."""
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", choices=DATASET_KINDS, default="coco",
                       help="coco: images + .npy masks from cocomask_to_numpy.py; folder: image/mask folders or "
                            "lists; voc: Pascal-VOC layout")
    config.add_arguments(group, "data_dir", "mask_dir")
    group.add_argument("--train-split", help="training split name (default: train2017 for coco, else train)")
    group.add_argument("--val-split", help="validation split name (default: val2017 for coco, else val)")
    group.add_argument("--split-dir", help="folder of <split>.txt lists (tools/dataset.py split writes them)")
    group.add_argument("--mask-mode", choices=MASK_MODES, default="ids",
                       help="folder/voc masks: class ids (default; palette PNGs too), binary 0/255 (threshold "
                            "128), or RGB colours mapped through --palette")
    group.add_argument("--palette", help="file of 'r g b' lines, one per class (default: the VOC colour map)")
    group.add_argument("--class-names", help="comma-separated class names, index 0 first (e.g. background,flood)")
    group.add_argument("--classes", help="file with one class name per line (default: <root>/classes.txt)")
    group.add_argument("--void-value", type=int, help="mask value meaning 'ignore' (e.g. 11 for CamVid)")
    group.add_argument("--size-mismatch", choices=("resize", "skip"), default="resize",
                       help="a mask whose size differs from its image: resized nearest (default) or skipped")


def split_name(args, split: str) -> str:
    chosen = args.train_split if split == "train" else args.val_split
    if chosen:
        return chosen
    suffix = "2017" if args.dataset == "coco" else ""
    return ("train" if split == "train" else "val") + suffix


def class_names_of(args, root: Path) -> list[str]:
    """From --class-names, --classes, <root>/classes.txt (or class_names.txt), or the format's defaults."""
    if args.class_names:
        return [name.strip() for name in args.class_names.split(",")]
    files = [Path(args.classes)] if args.classes else [root / "classes.txt", root / "class_names.txt"]
    for path in files:
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if args.classes:
        raise DatasetError(f"class name file not found: {args.classes}")
    if args.dataset == "voc":
        return list(VOC_CLASSES)
    if args.mask_mode == "binary":
        return ["background", "foreground"]
    raise DatasetError(f"no class names for {root}: pass --class-names a,b,... or --classes FILE")


def without_mismatches(pairs: list[tuple[Path, Path]], policy: str) -> list[tuple[Path, Path]]:
    """Warn about every pair whose mask size differs from its image; drop them if asked to."""
    mismatched = size_mismatches(pairs)
    if mismatched:
        names = ", ".join(pairs[i][0].name for i in mismatched[:10])
        action = "skipped" if policy == "skip" else "masks resized (nearest) to their images"
        log.warning("%d image/mask pair(s) differ in size (%s): %s", len(mismatched), names, action)
    if policy == "skip":
        dropped = set(mismatched)
        return [pair for index, pair in enumerate(pairs) if index not in dropped]
    return pairs


def build_dataset(args, split: str, transform: Transform | None = None) -> PairedDataset:
    """The ``split`` ("train" or "val") of the dataset the command-line ``args`` describe."""
    name = split_name(args, split)
    if args.dataset == "coco":
        return coco_mask_dataset(Path(args.data_dir) / name, Path(args.mask_dir) / name, transform)
    root = Path(args.data_dir)
    split_dir = Path(args.split_dir) if args.split_dir else None
    try:
        pairs = (voc_pairs if args.dataset == "voc" else folder_pairs)(root, name, split_dir)
        names = class_names_of(args, root)
        colours = read_palette(Path(args.palette) if args.palette else None, len(names))
    except (LayoutError, OSError) as error:
        raise DatasetError(str(error)) from error
    mask_format = MaskFormat(args.mask_mode, colours, args.void_value)
    return PairedDataset(without_mismatches(pairs, args.size_mismatch), mask_format.read, names, transform,
                         resize_mismatched=True)
