"""Train a segmentation model (default: 91-class U-Net with focal loss on COCO masks).

    python train.py --data-dir data/coco --mask-dir data/coco/masks [--epochs 10 ...]
    torchrun --nproc_per_node=N train.py ...     # DistributedDataParallel, one process per GPU/CPU share

Writes save/last.pth (every epoch), save/best.pth (best validation mIoU), save/model_final.pth,
save/log_train.csv, save/curves.png and save/train.log.  --resume continues from save/last.pth.
"""
from __future__ import annotations

import argparse
import sys

import config
from utils.cli import setup_logging, user_errors_exit
from utils.data.augment import PRESETS
from utils.data.datasets import add_dataset_arguments
from utils.precision import AUTOCAST_PRECISIONS
from utils.training.losses import CLASS_WEIGHT_MODES
from utils.training.options import add_architecture_arguments, encoder_models
from utils.training.train import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser)
    config.add_arguments(parser, "save_dir", "crop_size", "lr", "loss", "focal_alpha", "focal_gamma", "epochs",
                         "batch_size", "workers", "seed", "val_every")
    add_architecture_arguments(parser)
    parser.add_argument("--augment", choices=PRESETS, default="basic",
                        help="training augmentation preset (utils/data/augment.py): basic = scale, flip, crop; "
                             "photometric adds colour, blur/noise, JPEG; weather adds fog, sun flare, rain or "
                             "shadow; strong adds rotation/shift/scale and grid distortion (default: basic)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="long side the predictor resizes images to (default: the crop size); a fully "
                             "convolutional model trained on crops of full-size images is best served near that size")
    parser.add_argument("--weights", help="local file of pretrained weights (a full model or a backbone); "
                                          "never downloaded; without it training starts from scratch")
    encoder = parser.add_argument_group(f"pretrained encoders (--model {', '.join(encoder_models())})")
    encoder.add_argument("--encoder-weights", metavar="FILE|imagenet",
                         help="a torchvision classifier or segmentation state dict (key rule: "
                              "model/encoder_weights.py), or 'imagenet' to download torchvision's (online only)")
    encoder.add_argument("--encoder-lr-factor", type=float, default=0.1,
                         help="with --encoder-weights, encoder learning rate = --lr x this (default: 0.1)")
    encoder.add_argument("--freeze-encoder-epochs", type=int, default=0,
                         help="train only the decoder for this many epochs first (default: 0)")
    encoder.add_argument("--train-encoder-bn", action="store_true",
                         help="update the encoder's BatchNorm statistics (default: with --encoder-weights they "
                              "stay the pretrained ones, which batches of a few crops would estimate worse)")
    encoder.add_argument("--distill-from", metavar="FILE",
                         help="the DeepLabV3 MobileNetV2 VOC weights as a teacher: its 21 classes guide the "
                              "student's classes of the same names (utils/training/distillation.py)")
    encoder.add_argument("--distill-weight", type=float, default=1.0, help="weight of the distillation loss")
    parser.add_argument("--class-weights", help="conversion.json whose class_pixel_counts weight the loss "
                                                "(median frequency)")
    parser.add_argument("--class-weight-mode", choices=CLASS_WEIGHT_MODES, default="median_frequency",
                        help="how --class-weights turns pixel counts into weights")
    parser.add_argument("--best-by", choices=("miou", "loss"), default="miou", help="what best.pth keeps")
    parser.add_argument("--max-steps", type=int, default=None, help="at most this many batches per epoch")
    parser.add_argument("--resume", action="store_true", help="continue from <save-dir>/last.pth")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    parser.add_argument("--precision", choices=AUTOCAST_PRECISIONS, default="auto",
                        help="auto: fp16 AMP on CUDA, fp32 on CPU; bf16: bfloat16 autocast (CPUs with bf16)")
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.save_dir, "train.log")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
