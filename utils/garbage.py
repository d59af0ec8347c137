"""The garbage collector in a long-lived process: importing torch and its neighbours leaves ~0.5 M
objects that live as long as the process, and each of the collector's full passes walks them again."""
from __future__ import annotations

import gc


def freeze_survivors() -> None:
    """One full collection, then what survived is left out of later ones (gc.freeze: still freed by
    reference counting, never again by the collector, so only live objects may be frozen), and the
    collector on."""
    gc.collect()
    gc.freeze()
    gc.enable()
