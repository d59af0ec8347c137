"""Train several configurations briefly under one torchrun launch (tests/test_ddp_matrix.py).

    torchrun --nproc_per_node=2 -m tests.ddp_matrix OUT.json WEIGHTS.pth COUNTS.json NAME... \
        -- TRAIN_OPTIONS... -- TRAIN_PY_OPTIONS... -- TEST_OPTIONS...

Each configuration goes through train.py's own set-up and epochs (``prepare``, ``run_epoch``),
all in one process group (a gloo group cannot be joined again once left); rank 0 writes, per
name, the epoch rows, whether every rank ended with the same parameters, and which epochs
changed the encoder's.  An error is recorded
and the next configuration runs: a configuration that DDP refuses fails on every rank alike.
Then train.py's ``main`` runs with TRAIN_PY_OPTIONS, the group kept for what follows, and test.py
with TEST_OPTIONS, last, as it leaves the group when done; their exit codes are recorded under
"train.py" and "test.py".  One launch for all: each rank's start costs seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist

import test as test_script
import train
from utils import distributed
from utils.fileio import write_text
from utils.training.prepare import Run, prepare
from utils.training.train import run_epoch


def configurations(weights: str, class_counts: str) -> dict[str, list[str]]:
    """Every registry architecture, and every option that changes which parameters learn (PSPNet over
    VGG is left to tests/test_pspnet_stages.py, which checks that every parameter gets a gradient)."""
    voc = ["--encoder-output-stride", "16", "--encoder-weights", weights]
    small = ["--base-width", "4"]
    return {
        "unet": ["--model", "unet", *small],
        "segnet": ["--model", "segnet", *small],
        "deeplabv3plus_mobilenetv2": ["--model", "deeplabv3plus_mobilenetv2"],
        "deeplabv3plus_xception": ["--model", "deeplabv3plus_xception"],
        "smp_unet": ["--model", "smp_unet"],
        "smp_fpn": ["--model", "smp_fpn"],
        "smp_pspnet": ["--model", "smp_pspnet"],
        "smp_pspnet_resnet18": ["--model", "smp_pspnet", "--encoder", "resnet18"],
        "deeplabv3_resnet50": ["--model", "deeplabv3_resnet50"],
        "deeplabv3_resnet101": ["--model", "deeplabv3_resnet101"],
        "deeplabv3_mobilenet_v3_large": ["--model", "deeplabv3_mobilenet_v3_large"],
        "fcn_resnet50": ["--model", "fcn_resnet50"],
        "fcn_resnet101": ["--model", "fcn_resnet101"],
        "lraspp_mobilenet_v3_large": ["--model", "lraspp_mobilenet_v3_large"],
        "deeplabv3_mobilenet_v3_large_aux": ["--model", "deeplabv3_mobilenet_v3_large", "--aux-loss"],
        "fcn_resnet50_aux": ["--model", "fcn_resnet50", "--aux-loss"],
        "smp_unet_frozen_encoder": ["--model", "smp_unet", "--encoder-weights", weights,
                                    "--freeze-encoder-epochs", "1", "--epochs", "2"],
        "smp_unet_voc_head_distill": ["--model", "smp_unet", *voc, "--voc-head", weights, "--distill-from", weights],
        "unet_class_weights": ["--model", "unet", *small, "--class-weights", class_counts, "--loss", "ce"],
        "unet_class_weights_focal": ["--model", "unet", *small, "--class-weights", class_counts],
    }


def parameter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def encoder_state(run: Run) -> list[torch.Tensor] | None:
    encoder = getattr(run.bare_model, "encoder", None)
    return None if encoder is None else [p.detach().clone() for p in encoder.parameters()]


def train_configuration(argv: list[str]) -> dict:
    run = prepare(train.parse_args(argv))
    rows, encoder_changed = [], []
    for epoch in range(1, run.args.epochs + 1):
        before = encoder_state(run)
        rows.append(run_epoch(run, epoch))
        after = encoder_state(run)
        if before is not None:
            encoder_changed.append(any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)))
    digests: list[str] = [""] * run.context.world_size
    dist.all_gather_object(digests, parameter_digest(run.bare_model))
    return {"rows": rows, "world_size": run.context.world_size, "same_on_every_rank": len(set(digests)) == 1,
            "encoder_changed": encoder_changed}


def train_py_in_the_group(options: list[str]) -> dict:
    """train.py's main under this launch, without its leaving the group (test.py, last, leaves it).
    Its logging set-up stays for the rest of the launch: test.py's lines go to its train.log too."""
    with mock.patch.object(distributed, "cleanup", lambda: None):
        code = train.main(options)
    if not dist.is_initialized():
        raise RuntimeError("train.py left the process group: its cleanup is no longer distributed.cleanup")
    return {"code": code}


def main(argv: list[str]) -> int:
    out, weights, class_counts, *rest = argv
    first, second, third = (index for index, word in enumerate(rest) if word == "--")
    names, common = rest[:first], rest[first + 1:second]
    train_py_options, evaluation = rest[second + 1:third], rest[third + 1:]
    known = configurations(weights, class_counts)
    results = {}

    def record(name: str, run, options: list[str]) -> None:
        try:
            results[name] = run(options)
        except Exception as error:  # recorded for the test to report; the next configuration still runs
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        if os.environ.get("RANK", "0") == "0":  # after each one, so a hang still leaves what ran
            write_text(out, json.dumps(results, indent=1))

    try:
        for name in names:
            record(name, train_configuration, common + known[name])
        record("train.py", train_py_in_the_group, train_py_options)
        record("test.py", lambda options: {"code": test_script.main(options)}, evaluation)
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
