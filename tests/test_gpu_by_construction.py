"""The GPU paths that hold by construction, checked on the CPU: what runs on CUDA is decided by
code that runs here too (flags, arguments, chunking), so a regression shows without a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test as test_script
from model import build_model, model_meta
from tests.synthetic_coco import make_training_root
from utils import distributed
from utils.checkpoint import save_checkpoint
from utils.classes import COCO_CLASSES
from utils.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.evaluation import loop as evaluation
from utils.inference.predictor import PIXELS_PER_CHUNK, rows_per_chunk, top_class_and_confidence
from utils.training import train as training
from utils.training.losses import CrossEntropyDiceLoss


class FlagRecorder(nn.Module):
    """Logits of zeros; records cudnn.benchmark at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.backends.cudnn.benchmark)
        return images.new_zeros(images.shape[0], 3, *images.shape[2:])


def test_validation_runs_with_cudnn_benchmark_off_and_restores_it(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = FlagRecorder()
    batches = [(torch.zeros(1, 3, h, w), torch.zeros(1, h, w, dtype=torch.int64)) for h, w in ((8, 8), (9, 12))]
    training.evaluate(model, batches, 3, distributed.Context())
    assert model.seen == [False, False]
    assert torch.backends.cudnn.benchmark


def test_the_process_group_is_bound_to_the_local_gpu(monkeypatch):
    calls = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **options: calls.update(backend=backend, **options))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    context = distributed.setup()
    assert calls == {"set_device": torch.device("cuda", 1), "backend": "nccl", "device_id": torch.device("cuda", 1)}
    assert context.device == torch.device("cuda", 1)


class FakeBar(list):
    def __init__(self, loader, **_) -> None:
        super().__init__(loader)
        self.postfixes: list[dict] = []
        BARS.append(self)

    def set_postfix(self, **values) -> None:
        self.postfixes.append(values)


BARS: list[FakeBar] = []


def test_the_loss_is_read_every_few_steps_only(monkeypatch):
    monkeypatch.setattr(training, "tqdm", FakeBar)
    monkeypatch.setattr(training, "LOSS_SHOWN_EVERY", 2)
    torch.manual_seed(0)
    model = nn.Conv2d(3, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))) for _ in range(5)]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    loss = training.train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, scheduler,
                                    torch.amp.GradScaler("cpu", enabled=False), distributed.Context(), 1, None)
    assert len(BARS[-1].postfixes) == 3  # steps 0, 2 and 4 of 5
    assert loss > 0


def test_the_dice_and_cross_entropy_losses_never_test_a_tensor_for_truth(monkeypatch):
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    targets = [torch.randint(0, 4, (2, 6, 6)), torch.full((2, 6, 6), 255)]  # the second: all ignored
    tested = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: tested.append(1) or original(self))
    losses = [CrossEntropyDiceLoss(weight=torch.ones(4))(logits, target) for target in targets]
    monkeypatch.undo()
    assert tested == []
    assert losses[1].item() == 0 and losses[1].requires_grad
    expected = F.cross_entropy(logits, targets[0]) + CrossEntropyDiceLoss().dice(logits, targets[0])
    torch.testing.assert_close(losses[0], expected)


def test_confidence_is_one_pass_on_a_gpu_and_chunked_on_the_cpu():
    assert rows_per_chunk(torch.device("cuda", 0), 640 * 480) == 640 * 480
    assert rows_per_chunk(torch.device("cpu"), 640 * 480) == PIXELS_PER_CHUNK
    logits = torch.randn(5, 70, 90)
    class_ids, confidence = top_class_and_confidence(logits)
    reference = torch.softmax(logits, dim=0).max(0)
    assert torch.equal(class_ids, reference.indices)
    torch.testing.assert_close(confidence, reference.values)


@pytest.fixture(scope="module")
def tiny_coco_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = make_training_root(tmp_path_factory.mktemp("precision"), num_images=3, size=(40, 48), seed=5)
    arch_args = {"num_classes": len(COCO_CLASSES), "base_width": 4, "bilinear": True}
    meta = model_meta("unet", arch_args, COCO_CLASSES, [48, 48], IMAGENET_MEAN, IMAGENET_STD)
    checkpoint = root / "model.pth"
    save_checkpoint(checkpoint, {"model": build_model("unet", **arch_args).state_dict(), "meta": meta})
    return root, checkpoint


@pytest.mark.parametrize(("options", "expected"), [([], "fp32"), (["--precision", "bf16"], "bf16"),
                                                   (["--precision", "auto"], "auto")])
def test_test_py_evaluates_in_fp32_unless_asked(tiny_coco_checkpoint, tmp_path, monkeypatch, options, expected):
    root, checkpoint = tiny_coco_checkpoint
    asked = []
    autocast = evaluation.autocast
    monkeypatch.setattr(evaluation, "autocast", lambda device, precision: asked.append(precision)
                        or autocast(device, precision))
    code = test_script.main(["--checkpoint", str(checkpoint), "--data-dir", str(root), "--mask-dir",
                             str(root / "masks"), "--val-split", "train2017", "--workers", "0", "--save-dir",
                             str(tmp_path), "--rank-images", "1", *options])
    assert code == 0
    assert asked and set(asked) == {expected}
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"] == expected
