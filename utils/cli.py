"""What every script does the same way: logging and turning known errors into one clear line."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(save_dir: str | os.PathLike, file_name: str) -> None:
    """Log to the console and to ``<save_dir>/<file_name>``; under torchrun only rank 0 speaks."""
    rank = int(os.environ.get("RANK", 0))
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(save_dir) / file_name))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def fail(error: BaseException) -> int:
    """Print ``error`` as one line for a person (a DataLoader worker's message carries a
    traceback; its last line is the real message) and return the exit code 2."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    message = lines[-1].split(": ", 1)[-1] if len(lines) > 1 else lines[-1]
    print(f"error: {message}", file=sys.stderr)
    return 2
