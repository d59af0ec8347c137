"""Which checkpoint is kept as best: by validation mIoU (higher) or loss (lower)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from utils.training.state import is_better


@pytest.mark.parametrize("best_by,rows,expected", [
    ("miou", [(0.2, 1.0), (0.3, 1.2), (0.25, 0.5)], [True, True, False]),
    ("loss", [(0.2, 1.0), (0.3, 1.2), (0.25, 0.5)], [True, False, True]),
    ("miou", [(None, 1.0), (0.1, 2.0)], [True, True]),
])
def test_best_selection(best_by, rows, expected):
    run = SimpleNamespace(args=SimpleNamespace(best_by=best_by), best_metric=None)
    assert [is_better(run, {"miou": miou, "val_loss": loss}) for miou, loss in rows] == expected
