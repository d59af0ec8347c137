"""What every script does the same way: logging, and the user's mistakes (UserError) as one clear line."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec

from utils.errors import UserError

Arguments = ParamSpec("Arguments")


def setup_logging(save_dir: str | os.PathLike, file_name: str) -> None:
    """Log to the console and to ``<save_dir>/<file_name>``; under torchrun only rank 0 speaks."""
    rank = int(os.environ.get("RANK", 0))
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(save_dir) / file_name))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fail(error: BaseException) -> int:
    """Print ``error`` as one line for a person and return the exit code 2.

    A DataLoader worker's error arrives with the worker's traceback in its message: the last
    line holds the real message.  Other messages (torch.load's, say) may run on for lines of
    advice: the first line says what went wrong.
    """
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        message = lines[-1].split(": ", 1)[-1]
    else:
        message = lines[0]
    print(f"error: {message}", file=sys.stderr)
    return 2


def user_errors_exit(main: Callable[Arguments, int]) -> Callable[Arguments, int]:
    """A script's ``main`` whose UserErrors end it with one line and exit code 2 (see ``fail``); any
    other exception is a bug and keeps its traceback."""
    @functools.wraps(main)
    def guarded(*args: Arguments.args, **kwargs: Arguments.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as error:
            return fail(error)
    return guarded
