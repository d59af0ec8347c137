"""predict.py on a tiny checkpoint: a folder of images, a video, and bad inputs as one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import predict
from tests.conftest import ROOT
from tests.tiny_checkpoint import CLASS_NAMES, make_checkpoint
from utils.fileio import load_rgb
from utils.inference.predict import output_stems
from utils.inference.predictor import Predictor
from utils.inference.tiling import strategy_from_args

IMAGE_SIZES = {"a.png": (60, 40), "b.jpg": (40, 60), "c.bmp": (56, 36)}  # name -> (width, height)
VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS = 12, (64, 48), 10.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny.pth")


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, (name, size) in enumerate(IMAGE_SIZES.items()):
        Image.fromarray(noise(*size, seed)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def write_video(path: Path, frames: int = VIDEO_FRAMES) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, VIDEO_SIZE)
    assert writer.isOpened()
    for seed in range(frames):
        writer.write(noise(*VIDEO_SIZE, seed))
    writer.release()
    return path


def read_video(path: Path) -> tuple[int, tuple[int, int], float]:
    """(frames actually decoded, (width, height), declared FPS)."""
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    frames, size = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames, size = frames + 1, (frame.shape[1], frame.shape[0])
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, size, fps


def run(*args: str | Path) -> int:
    return predict.main([str(arg) for arg in args])


def test_mp4v_round_trips_in_this_opencv_build(tmp_path):
    assert read_video(write_video(tmp_path / "clip.mp4")) == (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS)


def test_folder_gives_overlays_and_raw_class_maps(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--input", image_folder, "--out", out, "--raw") == 0
    assert "3 images done, 1 skipped" in capsys.readouterr().out
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    for name, size in IMAGE_SIZES.items():
        stem = Path(name).stem
        assert Image.open(out / f"{stem}_overlay.jpg").size == size
        classes = np.asarray(Image.open(out / f"{stem}_classes.png"))
        assert classes.dtype == np.uint8 and classes.max() < len(CLASS_NAMES)
        np.testing.assert_array_equal(classes, predictor.predict(load_rgb(image_folder / name)).class_map)
    assert sorted(p.name for p in out.glob("*_overlay.jpg")) == ["a_overlay.jpg", "b_overlay.jpg", "c_overlay.jpg"]
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_single_image_without_raw(checkpoint, image_folder, tmp_path):
    out = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--input", image_folder / "b.jpg", "--out", out, "--alpha", "1") == 0
    assert Image.open(out / "b_overlay.jpg").size == IMAGE_SIZES["b.jpg"]
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("options", [["--mode", "slide", "--tile", "32"], ["--tta", "flip+scales"]])
def test_slide_and_tta_write_what_the_predictor_sees_that_way(options, image_folder, tmp_path):
    checkpoint, out = make_checkpoint(tmp_path / "varied.pth", varied=True), tmp_path / "out"  # classes vary
    assert run("--checkpoint", checkpoint, "--input", image_folder / "a.png", "--out", out, "--raw", *options) == 0
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    args = predict.parse_args(["--checkpoint", "x", "--input", "x", "--out", "x", *options])
    expected = predictor.predict(load_rgb(image_folder / "a.png"), strategy_from_args(args)).class_map
    plain = predictor.predict(load_rgb(image_folder / "a.png")).class_map
    written = np.asarray(Image.open(out / "a_classes.png"))
    assert np.array_equal(written, expected) and not np.array_equal(written, plain)


def test_video_keeps_frame_count_size_and_fps(checkpoint, tmp_path, capsys):
    video, out = write_video(tmp_path / "clip.mp4"), tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--input", video, "--out", out, "--raw") == 0
    assert f"{VIDEO_FRAMES} frames" in capsys.readouterr().out
    assert read_video(out / "clip_overlay.mp4") == (VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS)
    class_maps = sorted((out / "clip_classes").glob("*.png"))
    assert [p.name for p in class_maps] == [f"{i:06d}.png" for i in range(VIDEO_FRAMES)]
    assert np.asarray(Image.open(class_maps[0])).shape == VIDEO_SIZE[::-1]
    assert not list(out.glob(".*"))


def test_max_frames_bounds_a_video(checkpoint, tmp_path):
    video, out = write_video(tmp_path / "clip.mp4"), tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--input", video, "--out", out, "--max-frames", "5") == 0
    assert read_video(out / "clip_overlay.mp4")[:2] == (5, VIDEO_SIZE)


def test_shared_stems_do_not_overwrite_each_other():
    assert output_stems([Path("a.jpg"), Path("a.png"), Path("b.png")]) == ["a_jpg", "a_png", "b"]


@pytest.fixture
def broken_inputs(tmp_path) -> Path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("text")
    (tmp_path / "broken.mp4").write_text("not a video")
    good = make_checkpoint(tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])  # as after an interrupted copy
    write_video(tmp_path / "clip.mp4", frames=2)
    return tmp_path


# (arguments with {tmp} for the broken_inputs folder, part of the expected message)
BAD_INPUTS = {
    "missing input": (["--input", "{tmp}/nowhere.jpg"], "input not found"),
    "empty folder": (["--input", "{tmp}/empty"], "folder is empty"),
    "folder without images": (["--input", "{tmp}/texts"], "no readable images"),
    "unreadable image": (["--input", "{tmp}/texts/a.txt"], "cannot read image"),
    "unreadable video": (["--input", "{tmp}/broken.mp4"], "cannot read video"),
    "absent camera": (["--input", "57"], "cannot open camera 57"),
    "missing checkpoint": (["--input", "{tmp}/clip.mp4", "--checkpoint", "{tmp}/no.pth"], "checkpoint not found"),
    "truncated checkpoint": (["--input", "{tmp}/clip.mp4", "--checkpoint", "{tmp}/truncated.pth"],
                             "cannot load checkpoint"),
    "tile in whole mode": (["--input", "{tmp}/clip.mp4", "--tile", "64"], "tile: only in slide mode"),
    "stride beyond tile": (["--input", "{tmp}/clip.mp4", "--mode", "slide", "--tile", "32", "--stride", "48"],
                           "stride 48 > tile 32"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_code_2(case, checkpoint, broken_inputs, capfd):
    arguments, expected = BAD_INPUTS[case]
    arguments = [argument.format(tmp=broken_inputs) for argument in arguments]
    # A --checkpoint in ``arguments`` comes later and wins: argparse keeps the last.
    assert run("--checkpoint", checkpoint, "--out", broken_inputs / "out", *arguments) == 2
    stderr = capfd.readouterr().err  # file-descriptor level, so OpenCV's and FFmpeg's own messages count too
    # tqdm bars aside, and the per-file "skipping" warnings that come before the error by design
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line and "skipping:" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr
    assert not list((broken_inputs / "out").glob("*.mp4"))


def test_script_reports_a_broken_video_without_traceback(checkpoint, tmp_path):
    (tmp_path / "broken.mp4").write_text("not a video")
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--input",
                             str(tmp_path / "broken.mp4"), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot read video {tmp_path / 'broken.mp4'}"
