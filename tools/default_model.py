"""The recipe for the shipped default model: real COCO images from ../shared/data, our own
converter and train.py, evaluated on coco-tiny's val split.

    python tools/default_model.py [--setting imagenet] [--shared ../shared/data] [--work data/default] [--resume]

Steps: convert every source with cocomask_to_numpy, link images and masks into one train and
one val folder (an image is in one split only), train,
evaluate with test.py, and export the best checkpoint to save/default/model.pth (fp16 storage)
with save/default/model.json (its metrics, settings and sha256), then quantize it for OpenVINO
(tools/quantize.py: calibrated on training images, judged on the val split; the INT8 IR ships
beside the model only if its guard passed).  ``--int8-only`` redoes just that last step for the
shipped model.  Runs on a GPU unchanged (the INT8 step needs OpenVINO and NNCF, on the CPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from tools import quantize as quantize_tool  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.data.coco_convert import convert  # noqa: E402
from utils.fileio import atomic_path, file_sha256, load_rgb, write_text  # noqa: E402
from utils.inference.predictor import Predictor  # noqa: E402

# (name, annotation file, image folder) under ../shared/data.  tiny-coco's split names are
# swapped upstream; both halves are training data here, so that does not matter.
TRAIN_SOURCES = [
    ("coco128", "coco128/annotations/instances_train2017.json", "coco128/train2017"),
    ("coco-tiny-train", "coco-tiny/annotations/instances_train2017.json", "coco-tiny/train2017"),
    ("tiny-coco-a", "tiny-coco/annotations/instances_train2017.json", "tiny-coco/images/train2017"),
    ("tiny-coco-b", "tiny-coco/annotations/instances_val2017.json", "tiny-coco/images/val2017"),
    ("coco-val-panoptic", "coco-val-panoptic/annotations/instances_val2017.json", "coco-val-panoptic/val2017"),
]
VAL_SOURCE = ("coco-tiny-val", "coco-tiny/annotations/instances_val2017.json", "coco-tiny/val2017")

def load_script(name: str) -> ModuleType:
    """A top-level script as a module, loaded from its file: ``import test`` would shadow the standard
    library's ``test`` package for the rest of the process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_script = load_script("test")

WEIGHTS = {"imagenet": "mobilenet_v2-tf2ptq-6cf85aa2.pth", "deeplab": "deeplabv3_mobilenet_v2_voc-tfqat-eeae4f3a.pth"}


def recipe(epochs: int, *extra: str) -> list[str]:
    """train.py arguments: SMP's U-Net on MobileNetV2, 8 x 320 crops served at 640, bf16 on the CPU,
    plain CE, decoder lr 1e-3 and encoder lr 1e-4 with cosine annealing."""
    return ["--model", "smp_unet", "--encoder", "mobilenet_v2", "--crop-size", "320", "--input-size", "640",
            "--batch-size", "8", "--lr", "1e-3", "--encoder-lr-factor", "0.1", "--epochs", str(epochs),
            "--precision", "bf16", "--val-every", "5", "--workers", "2", "--loss", "ce", *extra]


IMAGENET_INIT = ("--encoder-weights", "{imagenet}")
DEEPLAB_INIT = ("--encoder-weights", "{deeplab}", "--encoder-output-stride", "16")
VOC_HEAD_AND_DISTILL = ("--voc-head", "{deeplab}", "--distill-from", "{deeplab}")
QUARTER_LOGITS = ("--logit-stride", "4")  # the decoder stops at 1/4: a quarter of the FLOPs (MODEL_CARD.md)
COMPARISON_EPOCHS = 2  # about 6 minutes each on 2 CPU cores: the settings side by side, same budget
DEFAULT_EPOCHS = 15
SETTINGS = {
    "scratch": recipe(COMPARISON_EPOCHS),
    "imagenet": recipe(COMPARISON_EPOCHS, *IMAGENET_INIT),
    "deeplab": recipe(COMPARISON_EPOCHS, *DEEPLAB_INIT),
    "deeplab-voc-head": recipe(COMPARISON_EPOCHS, *DEEPLAB_INIT, *VOC_HEAD_AND_DISTILL),
    "deeplab-voc-head-quarter": recipe(COMPARISON_EPOCHS, *DEEPLAB_INIT, *VOC_HEAD_AND_DISTILL, *QUARTER_LOGITS),
    # The default model shipped until 2026-12-02: the same, with the decoder run to full resolution.
    "full-resolution": recipe(DEFAULT_EPOCHS, *DEEPLAB_INIT, *VOC_HEAD_AND_DISTILL),
    "default": recipe(DEFAULT_EPOCHS, *DEEPLAB_INIT, *VOC_HEAD_AND_DISTILL, *QUARTER_LOGITS),  # the shipped model
}


def train_arguments(setting: str, weights_dir: Path) -> list[str]:
    """The setting's arguments with the weight files filled in."""
    places = {f"{{{k}}}": str(weights_dir / v) for k, v in WEIGHTS.items()}
    return [places.get(argument, argument) for argument in SETTINGS[setting]]


def convert_source(shared: Path, masks: Path, source: tuple[str, str, str]) -> Path:
    name, annotations, images = source
    out = masks / name
    convert(shared / annotations, shared / images, out, workers=2)
    return out


def link_split(shared: Path, work: Path, split: str, sources: list[tuple[str, str, str]],
               exclude: set[str]) -> int:
    """Symlink each source's images and masks into ``work/<split>`` and ``work/masks/<split>``;
    returns how many images the split holds (a re-run links nothing new)."""
    images, masks = work / split, work / "masks" / split
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for source in sources:
        mask_dir = convert_source(shared, work / "masks-by-source", source)
        for mask in sorted(mask_dir.glob("*.npy")):
            image = shared / source[2] / f"{mask.stem}.jpg"
            if mask.stem in exclude or (images / image.name).exists():
                continue
            (images / image.name).symlink_to(image.resolve())
            (masks / mask.name).symlink_to(mask.resolve())
    return len(list(masks.glob("*.npy")))


def prepare(shared: Path, work: Path) -> tuple[int, int]:
    val_stems = {p.stem for p in (shared / VAL_SOURCE[2]).glob("*.jpg")}
    val = link_split(shared, work, "val", [VAL_SOURCE], set())
    train_count = link_split(shared, work, "train", TRAIN_SOURCES, val_stems)
    return train_count, val


def export(checkpoint: Path, out: Path, report: dict, setting: str, seconds: float, counts: tuple[int, int]) -> str:
    """fp16 weights (loading casts them back to fp32) plus metadata; returns the sha256."""
    source = load_checkpoint(checkpoint)
    state = {k: v.half() if v.is_floating_point() else v for k, v in source["model"].items()}
    metrics = {"pixel_accuracy": report["pixel_accuracy"], "miou": report["miou"],
               "iou": report["iou"], "support": report["support"]}
    save_checkpoint(out, {"model": state, "meta": dict(source["meta"], metrics=metrics)})
    digest = file_sha256(out)
    card = {"sha256": digest, "setting": setting, "train_args": SETTINGS[setting], "train_images": counts[0],
            "val_images": counts[1], "wall_seconds": round(seconds), "device": "cuda" if torch.cuda.is_available()
            else f"cpu ({torch.get_num_threads()} threads)", **metrics}
    write_text(out.with_suffix(".json"), json.dumps(card, indent=1))
    return digest


REFERENCE_IMAGE = "coco-tiny/val2017/000000324614.jpg"  # a person brushing her teeth


def write_reference(checkpoint: Path, shared: Path) -> None:
    """The fp32 class map of a fixed real image, saved next to the checkpoint and named in its
    JSON record, so a test notices any silent change to preprocessing or the model."""
    predictor = Predictor.from_checkpoint(checkpoint, precision="fp32")
    class_map = predictor.predict(load_rgb(shared / REFERENCE_IMAGE)).class_map
    reference = checkpoint.with_suffix(".reference.png")
    with atomic_path(reference) as tmp:
        Image.fromarray(class_map).save(tmp, format="PNG")
    record_path = checkpoint.with_suffix(".json")
    record = json.loads(record_path.read_text())
    record["reference"] = {"image": REFERENCE_IMAGE, "prediction": reference.name,
                           "classes": sorted(set(np.unique(class_map).tolist()))}
    write_text(record_path, json.dumps(record, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="default")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--weights", type=Path, default=ROOT.parent / "shared" / "weights",
                        help="folder of the pretrained MobileNetV2 files (see its SOURCE.md)")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "default")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="training outputs (default: save/recipe-<setting>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the exported model (default: save/default/model.pth for the default setting, "
                             "else <save-dir>/model.pth)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from <save-dir>/last.pth (train.py --resume)")
    parser.add_argument("--int8-only", action="store_true",
                        help="only quantize the exported model and judge the INT8 IR (minutes, not an hour)")
    args = parser.parse_args()
    if not args.shared.is_dir():
        print(f"error: {args.shared} not found: the recipe trains on ../shared/data", file=sys.stderr)
        return 2
    started = time.time()
    train_count, val_count = prepare(args.shared, args.work)
    print(f"data: {train_count} training and {val_count} validation images in {args.work}")
    save_dir = args.save_dir or ROOT / "save" / f"recipe-{args.setting}"
    out = args.out or (ROOT / "save" / "default" / "model.pth" if args.setting == "default" else save_dir / "model.pth")
    data = ["--data-dir", str(args.work), "--mask-dir", str(args.work / "masks")]
    if args.int8_only:
        return quantize(out, data)
    common = [*data, "--save-dir", str(save_dir)]
    settings = train_arguments(args.setting, args.weights)
    resume = ["--resume"] if args.resume else []
    if train.main(common + settings + ["--train-split", "train", "--val-split", "val", *resume]) != 0:
        return 2
    best = save_dir / "best.pth"
    if test_script.main(["--checkpoint", str(best), "--val-split", "val"] + common) != 0:
        return 2
    report = json.loads((save_dir / "metrics.json").read_text())
    digest = export(best, out, report, args.setting, time.time() - started, (train_count, val_count))
    write_reference(out, args.shared)
    print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {digest}); {headline(report)}")
    return quantize(out, data)


def quantize(checkpoint: Path, data: list[str]) -> int:
    """tools/quantize.py on the exported model: its INT8 IR and guard verdict beside it."""
    return quantize_tool.main(["--checkpoint", str(checkpoint), *data, "--train-split", "train", "--val-split", "val"])


GOOD_IOU = 0.3  # the model card counts the classes a model gets at least this right


def headline(report: dict) -> str:
    """The figures the model card compares settings by."""
    names, iou = report["class_names"], report["iou"]
    good = [f"{names[i]} {value:.2f}" for i, value in enumerate(iou) if i and value is not None and value >= GOOD_IOU]
    return (f"val pixel accuracy {report['pixel_accuracy']:.4f}, mIoU {report['miou']:.4f} over "
            f"{len(report['classes_counted'])} classes, person IoU {iou[1]:.3f}, {len(good)} classes besides "
            f"background with IoU >= {GOOD_IOU}: {', '.join(good) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
