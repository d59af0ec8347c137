"""Segmentation datasets: (image, mask) pairs read from disk and transformed together."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.classes import COCO_CLASSES, IGNORE_INDEX
from utils.fileio import ImageReadError, load_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
EXIF_ORIENTATION = 0x0112

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class DatasetError(ValueError):
    """The data on disk is missing or inconsistent; the message names the file."""


def list_images(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem."""
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: {folder}")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


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
    """Images paired with masks; ``read_mask`` turns a mask file into an HxW uint8 array."""

    def __init__(self, pairs: list[tuple[Path, Path]], read_mask: Callable[[Path], np.ndarray],
                 num_classes: int, transform: Transform | None = None) -> None:
        if not pairs:
            raise DatasetError("the dataset is empty: no image/mask pairs found")
        self.pairs = pairs
        self.read_mask = read_mask
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (HxWx3 uint8 image, HxW uint8 mask), checked."""
        image_path, mask_path = self.pairs[index]
        try:
            image = np.asarray(load_rgb(image_path))
        except ImageReadError as error:
            raise DatasetError(str(error)) from error
        mask = self.read_mask(mask_path)
        check_mask(mask, image.shape[:2], self.num_classes, image_path.name)
        return image, mask

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) as displayed (EXIF orientation applied), read from the header only."""
        with Image.open(self.pairs[index][0]) as image:
            width, height = image.size
            transposed = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        return (width, height) if transposed else (height, width)

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
                      num_classes: int = 91, transform: Transform | None = None) -> PairedDataset:
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
    return PairedDataset([(images[s], masks[s]) for s in sorted(images)], read_npy_mask,
                         num_classes, transform)


def build_dataset(args, split: str, transform: Transform | None = None) -> PairedDataset:
    """The ``split`` ("train" or "val") of the dataset the command-line ``args`` describe.

    COCO layout: images in ``<data_dir>/<split name>``, masks in ``<mask_dir>/<split name>``.
    """
    split_name = args.train_split if split == "train" else args.val_split
    dataset = coco_mask_dataset(Path(args.data_dir) / split_name, Path(args.mask_dir) / split_name,
                                len(COCO_CLASSES), transform)
    dataset.class_names = list(COCO_CLASSES)
    return dataset
