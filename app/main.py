"""Development server: ``python app/main.py --host 127.0.0.1 --port 5000``.

Production runs ``python app/serve.py`` (``make run``) instead: nginx in front of gunicorn.
The checkpoint comes from ``SEG_CHECKPOINT`` (default: the shipped model in save/default/).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from app import create_app  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--checkpoint", help="overrides SEG_CHECKPOINT")
    args = parser.parse_args()
    app = create_app({"CHECKPOINT": args.checkpoint} if args.checkpoint else None)
    try:
        app.extensions["segmenter"].load()
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    app.run(host=args.host, port=args.port, debug=False, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
