"""predict.py's engine: segment an image, a folder of images, a video file or a camera, and write overlays.

Every image and frame goes through ``Predictor.predict`` and ``render_overlay``, so results match the
web app and test_draw.py exactly.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils.drawing import render_overlay
from utils.errors import UserError
from utils.fileio import ImageReadError, atomic_path, load_rgb
from utils.inference.predictor import Predictor
from utils.inference.tiling import Strategy, strategy_from_args

log = logging.getLogger("predict")

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".ts", ".3gp"})
# mp4v in .mp4 round-trips through this opencv-python-headless build (checked by tests/test_predict.py).
FOURCC = "mp4v"
FALLBACK_FPS = 25.0
FPS_WINDOW = 10
DEFAULT_CAMERA_FRAMES = 300
# FFmpeg's own stderr lines (e.g. "moov atom not found") would precede our one-line errors. FFmpeg reads its
# log level once, when OpenCV first uses it in the process, hence at import rather than in quiet_opencv().
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


class MediaError(UserError):
    """The input cannot be read, or the output cannot be written."""


class FpsMeter:
    """Frames per second of the whole loop (read, predict, draw, write): a moving average over the
    last few frames for the on-screen figure, and the mean over all frames for the summary."""

    def __init__(self, window: int = FPS_WINDOW) -> None:
        self.durations: deque[float] = deque(maxlen=window)
        self.last = time.perf_counter()
        self.frames = 0
        self.total_seconds = 0.0

    def tick(self) -> float:
        """Mark one frame done; return the moving-average FPS."""
        now = time.perf_counter()
        self.durations.append(now - self.last)
        self.total_seconds += now - self.last
        self.last = now
        self.frames += 1
        return len(self.durations) / sum(self.durations)

    @property
    def mean_fps(self) -> float:
        return self.frames / self.total_seconds if self.total_seconds else 0.0


class LazyVideoWriter:
    """A cv2.VideoWriter opened at the first frame, so the output takes the size of the decoded frames
    (which can differ from the size the container declares, e.g. for rotated phone videos)."""

    def __init__(self, path: Path, fps: float, label: Path) -> None:
        self.path, self.fps, self.label = path, fps, label
        self.writer: cv2.VideoWriter | None = None

    def write(self, frame: np.ndarray) -> None:
        if self.writer is None:
            height, width = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*FOURCC), self.fps, (width, height))
            if not self.writer.isOpened():
                raise MediaError(f"cannot write video {self.label} with codec {FOURCC}")
        self.writer.write(frame)

    def release(self) -> None:
        if self.writer is not None:
            self.writer.release()


@contextlib.contextmanager
def atomic_video_path(path: Path) -> Iterator[Path]:
    """``atomic_path`` for videos: the temporary name keeps the suffix, because OpenCV picks the
    container from it."""
    with atomic_path(path) as tmp:
        named = tmp.with_name(tmp.name + path.suffix)
        try:
            yield named
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)


def quiet_opencv() -> None:
    """Silence OpenCV's own warnings (e.g. "can't open camera by index"): we report unreadable inputs
    ourselves, in one line."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def is_camera(source: str) -> bool:
    """An integer string names a camera, unless a file of that name exists."""
    return source.isdigit() and not Path(source).exists()


def folder_files(folder: Path) -> list[Path]:
    files = sorted(path for path in folder.iterdir() if path.is_file())
    if not files:
        raise MediaError(f"folder is empty: {folder}")
    return files


def output_stems(files: list[Path]) -> list[str]:
    """File stems, with the suffix added where two files share a stem (a.jpg, a.png), so that no
    output overwrites another."""
    counts = Counter(path.stem for path in files)
    return [path.stem if counts[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}" for path in files]


def save_class_png(class_map: np.ndarray, path: Path) -> None:
    """Class ids as a lossless PNG (one uint8 id per pixel)."""
    with atomic_path(path) as tmp:
        Image.fromarray(class_map).save(tmp, format="PNG")


def predict_image(predictor: Predictor, strategy: Strategy, image: Image.Image, stem: str, out_dir: Path,
                  alpha: float, raw: bool) -> float:
    """Write ``<stem>_overlay.jpg`` (and ``<stem>_classes.png`` when ``raw``); return the inference ms."""
    prediction = predictor.predict(image, strategy)
    with atomic_path(out_dir / f"{stem}_overlay.jpg") as tmp:
        render_overlay(image, prediction.class_map, alpha).save(tmp, format="JPEG", quality=90)
    if raw:
        save_class_png(prediction.class_map, out_dir / f"{stem}_classes.png")
    return prediction.inference_ms


def report_images(latencies: list[float], skipped: int, out_dir: Path) -> None:
    print(f"{len(latencies)} images done, {skipped} skipped, mean {statistics.fmean(latencies):.1f} ms per image"
          f" -> {out_dir}")


def predict_folder(predictor: Predictor, strategy: Strategy, files: list[Path], out_dir: Path, alpha: float,
                   raw: bool) -> None:
    """Segment every readable image among ``files``; warn about and count the others."""
    latencies, skipped = [], 0
    with logging_redirect_tqdm():  # warnings printed above the bar rather than through it
        for path, stem in tqdm(list(zip(files, output_stems(files), strict=True)), desc="images", unit="image",
                               dynamic_ncols=True):
            try:
                image = load_rgb(path)
            except ImageReadError as error:
                log.warning("skipping: %s", error)
                skipped += 1
                continue
            latencies.append(predict_image(predictor, strategy, image, stem, out_dir, alpha, raw))
    if not latencies:
        raise MediaError(f"no readable images in {files[0].parent} ({skipped} files skipped)")
    report_images(latencies, skipped, out_dir)


def open_capture(source: str | int) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        raise MediaError(f"cannot open camera {source}" if isinstance(source, int) else f"cannot read video {source}")
    return capture


def capture_fps(capture: cv2.VideoCapture) -> float:
    """The input's frame rate; cameras and some containers report 0 or nonsense, hence the fallback."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    return fps if 0 < fps < 1000 else FALLBACK_FPS


def frame_total(capture: cv2.VideoCapture, max_frames: int | None) -> int | None:
    """Frames the loop will probably read, for the progress bar (None when unknown)."""
    declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if declared > 0:
        return min(declared, max_frames) if max_frames else declared
    return max_frames


def read_frames(capture: cv2.VideoCapture, max_frames: int | None) -> Iterator[np.ndarray]:
    """BGR frames until the input ends or ``max_frames`` have been read."""
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield frame


def draw_fps(frame: np.ndarray, fps: float) -> None:
    """The FPS in the top-left corner, white on a black outline so it reads on any background."""
    scale = max(0.3, frame.shape[0] / 720)
    origin = (max(2, round(8 * scale)), max(10, round(30 * scale)))
    text = f"{fps:.1f} FPS"
    thickness = max(1, round(2 * scale))
    cv2.putText(frame, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(frame, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def overlay_frame(predictor: Predictor, strategy: Strategy, frame: np.ndarray,
                  alpha: float) -> tuple[np.ndarray, np.ndarray, float]:
    """BGR frame -> (BGR overlay, class map, inference ms)."""
    image = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    prediction = predictor.predict(image, strategy)
    overlay = np.asarray(render_overlay(image, prediction.class_map, alpha))
    return cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR), prediction.class_map, prediction.inference_ms


def predict_stream(predictor: Predictor, strategy: Strategy, capture: cv2.VideoCapture, name: str, out_dir: Path,
                   alpha: float, raw: bool, max_frames: int | None) -> None:
    """Segment every frame into ``<name>_overlay.mp4`` (same size, frame count and FPS as the input),
    with class-id PNGs in ``<name>_classes/`` when ``raw``."""
    video_path, classes_dir = out_dir / f"{name}_overlay.mp4", out_dir / f"{name}_classes"
    meter, latencies = FpsMeter(), []
    with atomic_video_path(video_path) as tmp:
        writer = LazyVideoWriter(tmp, capture_fps(capture), label=video_path)
        try:
            for index, frame in enumerate(tqdm(read_frames(capture, max_frames), total=frame_total(capture, max_frames),
                                               desc=name, unit="frame", dynamic_ncols=True)):
                overlay, class_map, inference_ms = overlay_frame(predictor, strategy, frame, alpha)
                if raw:
                    save_class_png(class_map, classes_dir / f"{index:06d}.png")
                draw_fps(overlay, meter.tick())
                writer.write(overlay)
                latencies.append(inference_ms)
        finally:
            writer.release()
        if not latencies:
            raise MediaError(f"no frames could be read from {name}")
    print(f"{len(latencies)} frames -> {video_path}: mean {meter.mean_fps:.1f} FPS "
          f"(inference {statistics.fmean(latencies):.1f} ms per frame)")


def load_predictor(args: argparse.Namespace) -> Predictor:
    return Predictor.from_checkpoint(args.checkpoint, threads=args.threads, backend=args.backend)


def predict_capture(args: argparse.Namespace, strategy: Strategy, source: str | int, name: str,
                    max_frames: int | None) -> None:
    capture = open_capture(source)
    try:
        predict_stream(load_predictor(args), strategy, capture, name, Path(args.out), args.alpha, args.raw, max_frames)
    finally:
        capture.release()


def predict_media(args: argparse.Namespace) -> None:
    """Dispatch on ``args.input``: camera index, folder, video file or single image. Inputs and the
    strategy are checked before the checkpoint is loaded, so a typo fails fast."""
    quiet_opencv()
    out_dir, strategy = Path(args.out), strategy_from_args(args)
    if is_camera(args.input):
        predict_capture(args, strategy, int(args.input), f"camera{args.input}",
                        args.max_frames or DEFAULT_CAMERA_FRAMES)
        return
    path = Path(args.input)
    if not path.exists():
        raise MediaError(f"input not found: {path}")
    if path.is_dir():
        files = folder_files(path)
        predict_folder(load_predictor(args), strategy, files, out_dir, args.alpha, args.raw)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        predict_capture(args, strategy, str(path), path.stem, args.max_frames)
    else:
        image = load_rgb(path)
        latency = predict_image(load_predictor(args), strategy, image, path.stem, out_dir, args.alpha, args.raw)
        report_images([latency], 0, out_dir)
