"""MS-COCO instance annotations -> one per-pixel class mask per image (see RULES_TEXT)."""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as coco_mask
from tqdm import tqdm

from utils.classes import IGNORE_INDEX, NUM_COCO_CLASSES
from utils.errors import UserError
from utils.fileio import save_npy, write_text

CROWD_CHOICES = ("ignore", "label", "skip")
OVERLAP_CHOICES = ("smaller-wins", "ignore")
METADATA_NAME = "conversion.json"
RULES_TEXT = """\
Masks are uint8 HxW arrays at the image's own size: 0 = background, 1..90 = COCO category id,
255 = ignore. Default rule: crowd regions (iscrowd=1) are painted 255 first; then ordinary
instances in descending order of their 'area' field (ties by annotation id), so where
instances overlap the smaller one, usually in front, wins. --crowd label paints crowd regions
with their category like any instance; --crowd skip drops them. --overlap ignore sets pixels
covered by two or more instances to 255 (as torchvision's reference scripts do)."""


class ConversionError(UserError):
    """The annotations or images cannot be converted; the message says why."""


@dataclass(frozen=True)
class Rules:
    crowd: str = "ignore"
    overlap: str = "smaller-wins"

    def __post_init__(self) -> None:
        if self.crowd not in CROWD_CHOICES:
            raise ConversionError(f"--crowd must be one of {CROWD_CHOICES}, not {self.crowd!r}")
        if self.overlap not in OVERLAP_CHOICES:
            raise ConversionError(f"--overlap must be one of {OVERLAP_CHOICES}, not {self.overlap!r}")


DEFAULT_RULES = Rules()


@dataclass
class ImageTask:
    """Everything a worker needs for one image (picklable, no global state)."""
    image_id: int
    file_name: str
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)


@dataclass
class ImageResult:
    pixel_counts: np.ndarray  # 256 bins, so the ignore value is counted too
    annotations: int = 0
    degenerate_polygons: int = 0
    skipped_annotations: int = 0
    reused: bool = False


# ---------------------------------------------------------------- reading the JSON

def _require(record: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ConversionError(f"{what} lacks key(s) {', '.join(missing)}: {str(record)[:200]}")


def load_tasks(annotation_file: str | os.PathLike) -> list[ImageTask]:
    """Parse and check a COCO instances JSON; one task per image, sorted by image id."""
    try:
        with open(annotation_file) as handle:
            data = json.load(handle)
    except FileNotFoundError as error:
        raise ConversionError(f"annotation file not found: {annotation_file}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{annotation_file} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ConversionError(f"{annotation_file}: expected a JSON object at the top level")
    _require(data, ("images", "annotations"), f"{annotation_file}")

    tasks: dict[int, ImageTask] = {}
    for image in data["images"]:
        _require(image, ("id", "file_name", "height", "width"), "image record")
        tasks[image["id"]] = ImageTask(image["id"], image["file_name"], image["height"], image["width"])
    for annotation in data["annotations"]:
        _require(annotation, ("id", "image_id", "category_id", "segmentation"), "annotation")
        task = tasks.get(annotation["image_id"])
        if task is None:
            raise ConversionError(
                f"annotation {annotation['id']} points to image_id {annotation['image_id']}, "
                "which is not in 'images'")
        if not 1 <= annotation["category_id"] < NUM_COCO_CLASSES:
            raise ConversionError(
                f"annotation {annotation['id']} has category_id {annotation['category_id']}, "
                f"outside 1..{NUM_COCO_CLASSES - 1}")
        task.annotations.append(annotation)
    return [tasks[image_id] for image_id in sorted(tasks)]


def check_inputs(tasks: list[ImageTask], images_dir: Path) -> None:
    """Fail before any work if an image file is missing or two images share a mask name."""
    missing = [t.file_name for t in tasks if not (images_dir / t.file_name).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ConversionError(f"{len(missing)} image file(s) missing in {images_dir}: {shown}")
    stems: dict[str, str] = {}
    for task in tasks:
        stem = Path(task.file_name).stem
        if stem in stems:
            raise ConversionError(f"{stems[stem]} and {task.file_name} would share the mask {stem}.npy")
        stems[stem] = task.file_name


# ---------------------------------------------------------------- rasterising

def _valid_polygons(segmentation: list) -> list:
    return [polygon for polygon in segmentation if len(polygon) >= 6]  # at least 3 points


def _to_rle(segmentation, height: int, width: int) -> dict | None:
    """One RLE for a polygon list, uncompressed or compressed RLE (None: nothing to paint)."""
    if isinstance(segmentation, list):
        polygons = _valid_polygons(segmentation)
        if not polygons:
            return None
        return coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return coco_mask.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        return segmentation  # already compressed RLE
    raise ConversionError(f"unknown segmentation format: {str(segmentation)[:100]}")


def _paint_order(annotations: list[dict], rules: Rules) -> tuple[list[dict], list[dict]]:
    """Split into (crowd regions painted as ignore, instances in painting order)."""
    crowd = [a for a in annotations if a.get("iscrowd", 0)]
    instances = [a for a in annotations if not a.get("iscrowd", 0)]
    if rules.crowd == "label":
        instances, crowd = instances + crowd, []
    elif rules.crowd == "skip":
        crowd = []
    instances.sort(key=lambda a: (-a.get("area", 0), a["id"]))
    return crowd, instances


def tally(task: ImageTask, rules: Rules) -> ImageResult:
    """What converting ``task`` uses and skips, read from the annotations alone."""
    crowd, instances = _paint_order(task.annotations, rules)
    result = ImageResult(np.zeros(256, np.int64), annotations=len(task.annotations))
    result.skipped_annotations = len(task.annotations) - len(crowd) - len(instances)
    for annotation in crowd + instances:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):
            valid = _valid_polygons(segmentation)
            result.degenerate_polygons += len(segmentation) - len(valid)
            result.skipped_annotations += not valid
    return result


def _paint(mask: np.ndarray, rle: dict, value: int, coverage: np.ndarray | None) -> None:
    """Paint one region; only its bounding box is touched, which is most of the speed."""
    x, y, w, h = coco_mask.toBbox(rle)
    rows = slice(int(y), int(np.ceil(y + h)))
    cols = slice(int(x), int(np.ceil(x + w)))
    region = coco_mask.decode(rle)[rows, cols].view(bool)
    np.copyto(mask[rows, cols], value, where=region)
    if coverage is not None:
        coverage[rows, cols] += region


def rasterize(task: ImageTask, rules: Rules) -> np.ndarray:
    """The class mask of one image under ``rules``."""
    crowd, instances = _paint_order(task.annotations, rules)
    # Fortran order matches pycocotools' decoded masks, so painting copies contiguous columns.
    mask = np.zeros((task.height, task.width), np.uint8, order="F")
    coverage = np.zeros_like(mask) if rules.overlap == "ignore" else None
    layers = [(a, IGNORE_INDEX, None) for a in crowd] + [(a, a["category_id"], coverage) for a in instances]
    for annotation, value, counter in layers:
        rle = _to_rle(annotation["segmentation"], task.height, task.width)
        if rle is not None:
            _paint(mask, rle, value, counter)
    if coverage is not None:
        mask[coverage > 1] = IGNORE_INDEX
    return np.ascontiguousarray(mask)


def pixel_counts(mask: np.ndarray) -> np.ndarray:
    """Pixels per value 0..255 (OpenCV's histogram is several times faster than bincount)."""
    return cv2.calcHist([mask], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def mask_path(out_dir: Path, task: ImageTask) -> Path:
    return out_dir / (Path(task.file_name).stem + ".npy")


def convert_one(task: ImageTask, out_dir: Path, rules: Rules) -> ImageResult:
    """Write ``<out_dir>/<stem>.npy`` unless a complete one is already there."""
    result = tally(task, rules)
    path = mask_path(out_dir, task)
    if path.exists():  # written atomically, so an existing file is complete
        mask = np.load(path)
        result.reused = True
    else:
        mask = rasterize(task, rules)
        save_npy(path, mask)
    result.pixel_counts = pixel_counts(mask)
    return result


# ---------------------------------------------------------------- the whole run

def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> (i, n)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as error:
        raise ConversionError(f"--shard must look like I/N (for example 0/4), not {text!r}") from error
    if not 0 <= index < count:
        raise ConversionError(f"--shard {text}: I must be in 0..N-1")
    return index, count


def _metadata_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    return out_dir / (METADATA_NAME if count == 1 else f"conversion.shard-{index}-of-{count}.json")


def _check_same_rules(out_dir: Path, rules: Rules) -> None:
    """Refuse to mix masks made under different rules in one folder."""
    for path in out_dir.glob("conversion*.json"):
        previous = json.loads(path.read_text()).get("rules")
        if previous is not None and previous != asdict(rules):
            raise ConversionError(
                f"{out_dir} holds masks made with {previous} ({path.name}); "
                f"use another --out for {asdict(rules)} or delete the old masks")


def _run(tasks: list[ImageTask], out_dir: Path, rules: Rules, workers: int) -> list[ImageResult]:
    progress = dict(total=len(tasks), unit="img", desc="masks", dynamic_ncols=True)
    if workers <= 1:
        return [convert_one(t, out_dir, rules) for t in tqdm(tasks, **progress)]
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    try:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            jobs = pool.map(convert_one, tasks, [out_dir] * len(tasks), [rules] * len(tasks),
                            chunksize=chunk)
            return list(tqdm(jobs, **progress))
    except BrokenProcessPool as error:
        raise ConversionError(
            "a worker process died (killed or out of memory); masks written so far are "
            "complete: re-run the same command to finish") from error


def summarize(tasks: list[ImageTask], results: list[ImageResult], rules: Rules,
              annotation_file: str, shard: tuple[int, int]) -> dict:
    counts = np.sum([r.pixel_counts for r in results], axis=0) if results else np.zeros(256, np.int64)
    return {
        "annotations_file": str(annotation_file),
        "rules": asdict(rules),
        "rules_text": RULES_TEXT,
        "shard": list(shard),
        "images": len(tasks),
        "masks_written": sum(not r.reused for r in results),
        "masks_reused": sum(r.reused for r in results),
        "empty_images": sum(not t.annotations for t in tasks),
        "annotations": sum(r.annotations for r in results),
        "skipped_annotations": sum(r.skipped_annotations for r in results),
        "degenerate_polygons": sum(r.degenerate_polygons for r in results),
        "class_pixel_counts": counts[:NUM_COCO_CLASSES].tolist(),
        "ignore_pixels": int(counts[IGNORE_INDEX]),
    }


def convert(annotation_file: str | os.PathLike, images_dir: str | os.PathLike,
            out_dir: str | os.PathLike, rules: Rules = DEFAULT_RULES, workers: int = 1,
            shard: tuple[int, int] = (0, 1)) -> dict:
    """Convert every image of ``annotation_file`` (or one shard of them); returns the summary.

    Re-running after an interruption converts only what is missing.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    tasks = load_tasks(annotation_file)[shard[0]::shard[1]]
    check_inputs(tasks, images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_rules(out_dir, rules)
    for leftover in out_dir.glob(".*.tmp"):  # from a run that was killed mid-write
        leftover.unlink(missing_ok=True)
    results = _run(tasks, out_dir, rules, workers)
    summary = summarize(tasks, results, rules, str(annotation_file), shard)
    write_text(_metadata_path(out_dir, shard), json.dumps(summary, indent=1))
    return summary
