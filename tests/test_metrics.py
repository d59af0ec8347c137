"""Confusion matrix and its metrics against a direct numpy computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.classes import COCO_UNUSED_IDS, NUM_COCO_CLASSES
from utils.evaluation.metrics import ConfusionMatrix

IGNORE = 255


def random_labels(seed: int, classes: int, shape=(3, 17, 23), ignored: float = 0.15):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, shape)
    target[rng.random(shape) < ignored] = IGNORE
    # Mostly right, so IoUs are far from both 0 and 1.
    prediction = np.where(rng.random(shape) < 0.6, np.where(target == IGNORE, 0, target),
                          rng.integers(0, classes, shape))
    return target, prediction


def numpy_confusion(target: np.ndarray, prediction: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    valid = target != IGNORE
    np.add.at(matrix, (target[valid], prediction[valid]), 1)
    return matrix


def test_matrix_and_metrics_match_numpy_on_random_labels():
    classes = 6
    target, prediction = random_labels(0, classes)
    confusion = ConfusionMatrix(classes)
    confusion.update(torch.from_numpy(target), torch.from_numpy(prediction))
    metrics = confusion.compute()

    expected = numpy_confusion(target, prediction, classes)
    np.testing.assert_array_equal(confusion.matrix.numpy(), expected)
    valid = target != IGNORE
    assert metrics["pixel_accuracy"] == pytest.approx((target == prediction)[valid].mean())
    for c in range(classes):
        truth, guess = target == c, (prediction == c) & valid
        assert metrics["iou"][c] == pytest.approx((truth & guess).sum() / (truth | guess).sum())
        assert metrics["dice"][c] == pytest.approx(2 * (truth & guess).sum() / (truth.sum() + guess.sum()))
        assert metrics["support"][c] == truth.sum()
    assert metrics["miou"] == pytest.approx(np.mean(metrics["iou"]))
    assert metrics["classes_counted"] == list(range(classes))


def test_updates_accumulate_like_one_big_update():
    target, prediction = random_labels(1, 5)
    whole, pieces = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(torch.from_numpy(target), torch.from_numpy(prediction))
    for image in range(target.shape[0]):
        pieces.update(torch.from_numpy(target[image]), torch.from_numpy(prediction[image]))
    assert torch.equal(whole.matrix, pieces.matrix)
    assert whole.matrix.sum().item() == (target != IGNORE).sum()


def test_uint8_masks_do_not_overflow():
    target = torch.tensor([[90, 3], [IGNORE, 90]], dtype=torch.uint8)
    prediction = torch.tensor([[90, 90], [1, 3]], dtype=torch.uint8)
    confusion = ConfusionMatrix(NUM_COCO_CLASSES)
    confusion.update(target, prediction)
    assert confusion.matrix[90, 90].item() == 1
    assert confusion.matrix[3, 90].item() == 1
    assert confusion.matrix[90, 3].item() == 1
    assert confusion.matrix.sum().item() == 3


def test_class_in_neither_truth_nor_prediction_is_undefined_and_left_out_of_the_mean():
    target = torch.tensor([0, 0, 1, 1, 3, IGNORE])
    prediction = torch.tensor([0, 1, 1, 1, 0, 2])  # class 2 only at an ignored pixel
    confusion = ConfusionMatrix(5)
    confusion.update(target, prediction)
    metrics = confusion.compute()

    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 3: tp 0, union 1
    assert metrics["iou"] == pytest.approx([1 / 3, 2 / 3, None, 0.0, None])
    assert metrics["classes_counted"] == [0, 1, 3]
    assert metrics["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert metrics["dice"] == pytest.approx([0.5, 0.8, None, 0.0, None])
    assert metrics["support"] == [2, 2, 0, 1, 0]
    assert metrics["pixel_accuracy"] == pytest.approx(3 / 5)


def test_class_only_predicted_counts_with_iou_zero():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 0, 0]), torch.tensor([0, 0, 2]))
    metrics = confusion.compute()
    assert metrics["iou"] == pytest.approx([2 / 3, None, 0.0])
    assert metrics["classes_counted"] == [0, 2]


def test_unused_coco_ids_never_enter_the_mean():
    used = np.array([i for i in range(NUM_COCO_CLASSES) if i not in COCO_UNUSED_IDS])
    rng = np.random.default_rng(2)
    target, prediction = rng.choice(used, (2, 40, 40)), rng.choice(used, (2, 40, 40))
    confusion = ConfusionMatrix(NUM_COCO_CLASSES)
    confusion.update(torch.from_numpy(target), torch.from_numpy(prediction))
    metrics = confusion.compute()
    assert set(metrics["classes_counted"]) == set(np.union1d(target, prediction).tolist())
    assert all(metrics["iou"][unused] is None for unused in COCO_UNUSED_IDS)
    counted = [metrics["iou"][c] for c in metrics["classes_counted"]]
    assert metrics["miou"] == pytest.approx(np.mean(counted))


def test_nothing_counted_gives_none_not_nan():
    confusion = ConfusionMatrix(4)
    confusion.update(torch.full((3, 3), IGNORE), torch.zeros(3, 3, dtype=torch.int64))
    metrics = confusion.compute()
    assert metrics["pixel_accuracy"] is None
    assert metrics["miou"] is None and metrics["mean_dice"] is None
    assert metrics["iou"] == [None] * 4
    assert metrics["classes_counted"] == []
    assert "n/a" in str(confusion)


def test_str_reports_the_headline_numbers():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    text = str(confusion)
    assert "pixel accuracy 0.7500" in text
    assert "mIoU 0.6667 over 3 classes" in text
    assert "0:1.000 1:0.500 2:0.500" in text


def test_reduce_is_a_no_op_without_a_process_group():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = confusion.matrix.clone()
    confusion.reduce_from_all_processes()
    assert torch.equal(confusion.matrix, before)


def reduce_on_rank(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        confusion = ConfusionMatrix(3)
        confusion.update(torch.tensor([rank, 2]), torch.tensor([rank, rank]))
        confusion.reduce_from_all_processes()
        results[rank] = confusion.matrix.tolist()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_reduce_sums_the_counts_of_all_processes(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        # Forked, not spawned: the two ranks are still separate processes in one gloo group, without
        # each importing torch and this file again (1.7 s of CPU a rank, AMD EPYC avx512_bf16).
        mp.start_processes(reduce_on_rank, args=(2, str(tmp_path / "rendezvous"), results), nprocs=2,
                           start_method="fork")
        # rank 0 counted (0,0) and (2,0); rank 1 counted (1,1) and (2,1)
        expected = [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
        assert results[0] == expected and results[1] == expected
