"""Split, verify and look at a segmentation dataset (folder, VOC or COCO-mask layout).

    python tools/dataset.py split --data-dir ../shared/data/flood-area --out save/flood-splits [--ratios 8 1 1]
    python tools/dataset.py verify --dataset folder --data-dir ROOT --split-dir save/flood-splits \\
        --mask-mode binary --class-names background,flood [--split train]
    python tools/dataset.py visualize ... --out save/flood-overlays [--count 8]
    python tools/dataset.py visualize ... --out save/flood-overlays --augment weather [--crop-size 512]

`split` writes train/val/test lists (seeded, default 8:1:1) without moving any file; the
other commands take the same dataset options as train.py.  `visualize --augment PRESET` writes
`augment_<preset>.jpg` instead: each chosen image augmented three times, each crop beside its mask.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from utils.cli import setup_logging, user_errors_exit  # noqa: E402
from utils.data.augment import PRESETS, train_transform  # noqa: E402
from utils.data.dataset_tool import augmented_grid, format_class_shares, verify, visualize, write_splits  # noqa: E402
from utils.data.datasets import PairedDataset, add_dataset_arguments, build_dataset  # noqa: E402
from utils.fileio import atomic_path  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("split", "verify", "visualize"))
    add_dataset_arguments(parser)
    parser.add_argument("--split", choices=("train", "val"), default="train", help="verify/visualize: which split")
    parser.add_argument("--out", help="split: folder for the lists; visualize: folder for the overlays")
    parser.add_argument("--ratios", type=float, nargs="+", default=[8, 1, 1], help="split: train val [test]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=8, help="visualize: how many images")
    parser.add_argument("--augment", choices=PRESETS, help="visualize: a grid of this preset's training samples")
    config.add_arguments(parser, "crop_size")
    args = parser.parse_args(argv)
    if args.command in ("split", "visualize") and not args.out:
        parser.error(f"{args.command} needs --out")
    return args


def write_augmented_grid(args: argparse.Namespace, dataset: PairedDataset) -> None:
    grid = augmented_grid(dataset, train_transform(args.augment, args.crop_size), args.count, args.seed)
    path = Path(args.out) / f"augment_{args.augment}.jpg"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="JPEG", quality=90)
    print(f"wrote {path}")


def report_verification(dataset: PairedDataset) -> int:
    """Print the problems found and the class shares; 1 when there are problems."""
    problems, counts = verify(dataset)
    print(f"{len(dataset)} pairs, {len(problems)} with problems")
    print("\n".join(problems[:50]))
    print(format_class_shares(counts, dataset.class_names))
    return 1 if problems else 0


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.out or "save", "dataset.log")
    if args.command == "split":
        counts = write_splits(Path(args.data_dir), Path(args.out), args.ratios, args.seed, args.dataset == "voc")
        print(", ".join(f"{name}: {count}" for name, count in counts.items()) + f" -> {args.out}")
        return 0
    dataset = build_dataset(args, args.split)
    if args.command == "verify":
        return report_verification(dataset)
    if args.augment:
        write_augmented_grid(args, dataset)
    else:
        print(f"wrote {visualize(dataset, Path(args.out), args.count, args.seed)} overlays to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
