"""tools/dataset.py's engine: split lists, a verification report, and overlays to look at."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils.classes import IGNORE_INDEX
from utils.data.datasets import DatasetError, PairedDataset
from utils.data.layouts import LIST_PAIR_FOLDERS, LayoutError, pair_folders
from utils.data.transforms import TrainTransform
from utils.drawing import truth_overlay
from utils.fileio import atomic_path, write_text

SPLIT_NAMES = ("train", "val", "test")


def all_pairs(root: Path, voc: bool = False) -> list[tuple[Path, Path]]:
    """Every image/mask pair of a dataset that has no split yet (one image folder, one mask folder)."""
    candidates = [("JPEGImages", "SegmentationClass")] if voc else LIST_PAIR_FOLDERS
    for images, masks in candidates:
        if (root / images).is_dir() and (root / masks).is_dir():
            return pair_folders(root / images, root / masks)
    raise LayoutError(f"{root} has none of the folder pairs {', '.join('/'.join(c) for c in candidates)}")


def split_counts(total: int, ratios: list[float]) -> list[int]:
    """Sizes proportional to ``ratios`` that add up to ``total`` (largest remainders first)."""
    exact = [total * r / sum(ratios) for r in ratios]
    counts = [int(x) for x in exact]
    for index in sorted(range(len(ratios)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[index] += 1
    return counts


def write_splits(root: Path, out: Path, ratios: list[float], seed: int, voc: bool = False) -> dict[str, int]:
    """Shuffle the pairs (seeded) into train/val/test lists under ``out``; no file moves."""
    pairs = all_pairs(root, voc)
    random.Random(seed).shuffle(pairs)
    sizes = split_counts(len(pairs), ratios)
    written, start = {}, 0
    for name, size in zip(SPLIT_NAMES, sizes, strict=False):
        chosen = sorted(pairs[start:start + size])
        start += size
        lines = [f"{image.relative_to(root)} {mask.relative_to(root)}" for image, mask in chosen]
        write_text(out / f"{name}.txt", "\n".join(lines) + "\n")
        written[name] = len(chosen)
    return written


def verify(dataset: PairedDataset) -> tuple[list[str], np.ndarray]:
    """Problems found (one line each) and the pixel count per class over the whole split."""
    problems, counts = [], np.zeros(256, np.int64)
    for index in tqdm(range(len(dataset)), desc="verify", dynamic_ncols=True):
        try:
            _, mask = dataset.load(index)
        except DatasetError as error:
            problems.append(str(error))
            continue
        counts += np.bincount(mask.ravel(), minlength=256)
    return problems, counts


def format_class_shares(counts: np.ndarray, class_names: list[str]) -> str:
    total = counts.sum()
    lines = [f"{'id':>3}  {'class':<20} {'pixels':>14} {'share':>8}"]
    for class_id, name in enumerate(class_names):
        lines.append(f"{class_id:>3}  {name:<20} {counts[class_id]:>14,} {counts[class_id] / max(total, 1):8.2%}")
    lines.append(f"{'':>3}  {'(ignore)':<20} {counts[IGNORE_INDEX]:>14,} {counts[IGNORE_INDEX] / max(total, 1):8.2%}")
    return "\n".join(lines)


def visualize(dataset: PairedDataset, out: Path, count: int, seed: int) -> int:
    """Write ``count`` randomly chosen images with their mask blended in."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), min(count, len(dataset))))
    for index in tqdm(chosen, desc="visualize", dynamic_ncols=True):
        image, mask = dataset.load(index)
        overlay = truth_overlay(Image.fromarray(image), mask)
        with atomic_path(out / f"{dataset.pairs[index][0].stem}_overlay.jpg") as tmp:
            overlay.save(tmp, format="JPEG", quality=90)
    return len(chosen)


GRID_DRAWS = 3  # augmented draws of each image, side by side
GRID_CELL = 192  # pixels per cell side: a grid of 8 images stays a few MB


def unnormalise(image: torch.Tensor, transform: TrainTransform) -> np.ndarray:
    """A normalised 3xHxW tensor back to HxWx3 uint8."""
    mean, std = torch.tensor(transform.mean)[:, None, None], torch.tensor(transform.std)[:, None, None]
    return ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def augmented_grid(dataset: PairedDataset, transform: TrainTransform, count: int, seed: int) -> Image.Image:
    """One row per chosen image: GRID_DRAWS augmented samples, each as the crop and, beside it, its
    mask over it, so that a user sees what training will see before training."""
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), min(count, len(dataset))))
    grid = Image.new("RGB", (2 * GRID_DRAWS * GRID_CELL, len(chosen) * GRID_CELL), "white")
    for row, index in enumerate(tqdm(chosen, desc="augment", dynamic_ncols=True)):
        image, mask = dataset.load(index)
        for draw in range(GRID_DRAWS):
            tensor, labels = transform(image, mask, random.Random(f"{seed}/{index}/{draw}"))  # distinct for any index
            crop = Image.fromarray(unnormalise(tensor, transform))
            for column, cell in enumerate((crop, truth_overlay(crop, labels.numpy(), paint_ignore=True))):
                grid.paste(cell.resize((GRID_CELL, GRID_CELL), Image.Resampling.NEAREST),
                           ((2 * draw + column) * GRID_CELL, row * GRID_CELL))
    return grid
