"""cocomask_to_numpy: pixel-exact masks for each rule, summaries, bad input, interruption."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

import cocomask_to_numpy
from tests.conftest import ROOT, shared_dataset
from tests.synthetic_coco import make_coco
from utils.data.coco_convert import Rules, convert


def expected_masks(annotation_file: Path, rules: Rules) -> dict[str, np.ndarray]:
    """The rules applied the slow, obvious way with the COCO API (independent of our code)."""
    coco = COCO(str(annotation_file))
    masks = {}
    for image in coco.dataset["images"]:
        mask = np.zeros((image["height"], image["width"]), np.uint8)
        coverage = np.zeros(mask.shape, int)
        anns = [dict(a) for a in coco.imgToAnns[image["id"]]]
        for a in anns:  # the COCO API would read a 2-point polygon as a box
            if isinstance(a["segmentation"], list):
                a["segmentation"] = [p for p in a["segmentation"] if len(p) >= 6]
        anns = [a for a in anns if a["segmentation"]]
        crowd = [a for a in anns if a["iscrowd"] and rules.crowd == "ignore"]
        instances = [a for a in anns if not a["iscrowd"] or rules.crowd == "label"]
        for a in crowd:
            mask[coco.annToMask(a) == 1] = 255
        for a in sorted(instances, key=lambda a: (-a["area"], a["id"])):
            region = coco.annToMask(a) == 1
            mask[region] = a["category_id"]
            coverage += region
        if rules.overlap == "ignore":
            mask[coverage > 1] = 255
        masks[Path(image["file_name"]).stem] = mask
    return masks


def read_masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(folder.glob("*.npy"))}


@pytest.mark.parametrize("crowd", ["ignore", "label", "skip"])
@pytest.mark.parametrize("overlap", ["smaller-wins", "ignore"])
def test_masks_match_independent_computation(synthetic_coco, tmp_path, crowd, overlap):
    rules = Rules(crowd, overlap)
    convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path, rules, workers=1)
    ours, expected = read_masks(tmp_path), expected_masks(synthetic_coco.annotation_file, rules)
    assert ours.keys() == expected.keys()
    for stem in expected:
        assert ours[stem].dtype == np.uint8
        np.testing.assert_array_equal(ours[stem], expected[stem], err_msg=stem)


def test_data_exercises_every_rule(synthetic_coco, tmp_path):
    """Guard for the test above: the synthetic set really has overlaps, crowd and RLE."""
    default = convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path / "a")
    overlap = convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path / "b",
                      Rules(overlap="ignore"))
    label = convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path / "c",
                    Rules(crowd="label"))
    assert default["ignore_pixels"] > 0
    assert overlap["ignore_pixels"] > default["ignore_pixels"]
    assert label["ignore_pixels"] == 0
    assert default["degenerate_polygons"] > 0
    kinds = {type(a["segmentation"]).__name__ + str(type(a["segmentation"]).__name__ == "dict"
             and type(a["segmentation"]["counts"]).__name__)
             for a in json.loads(synthetic_coco.annotation_file.read_text())["annotations"]}
    assert kinds == {"listFalse", "dictlist", "dictstr"}  # polygons, uncompressed and compressed RLE


def test_empty_image_gives_all_zero_mask(synthetic_coco, tmp_path):
    convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path)
    data = json.loads(synthetic_coco.annotation_file.read_text())
    annotated = {a["image_id"] for a in data["annotations"]}
    empty = [i for i in data["images"] if i["id"] not in annotated]
    assert empty
    for image in empty:
        mask = np.load(tmp_path / (Path(image["file_name"]).stem + ".npy"))
        assert mask.shape == (image["height"], image["width"]) and not mask.any()


def test_summary_and_metadata(synthetic_coco, tmp_path):
    summary = convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path, workers=2)
    data = json.loads(synthetic_coco.annotation_file.read_text())
    assert summary["images"] == len(data["images"]) == summary["masks_written"]
    assert summary["annotations"] == len(data["annotations"])
    total = sum(i["height"] * i["width"] for i in data["images"])
    assert sum(summary["class_pixel_counts"]) + summary["ignore_pixels"] == total
    assert len(summary["class_pixel_counts"]) == 91
    masks = read_masks(tmp_path)
    assert summary["class_pixel_counts"][1] == sum(int((m == 1).sum()) for m in masks.values())
    assert json.loads((tmp_path / "conversion.json").read_text()) == summary
    assert "smaller one" in summary["rules_text"]


def test_rerun_reuses_masks_and_counts_them(synthetic_coco, tmp_path):
    first = convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path)
    second = convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path)
    assert second["masks_reused"] == first["images"] and second["masks_written"] == 0
    assert second["class_pixel_counts"] == first["class_pixel_counts"]


def test_other_rules_into_same_folder_are_refused(synthetic_coco, tmp_path, capsys):
    convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path)
    code = cocomask_to_numpy.main(["--annotations", str(synthetic_coco.annotation_file), "--images",
                                   str(synthetic_coco.image_dir), "--out", str(tmp_path),
                                   "--overlap", "ignore"])
    assert code == 2 and "holds masks made with" in capsys.readouterr().err


def test_shards_together_equal_the_whole(synthetic_coco, tmp_path):
    convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path / "whole")
    for index in range(3):
        convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path / "parts",
                shard=(index, 3))
    whole, parts = read_masks(tmp_path / "whole"), read_masks(tmp_path / "parts")
    assert whole.keys() == parts.keys()
    assert all(np.array_equal(whole[k], parts[k]) for k in whole)
    assert len(list((tmp_path / "parts").glob("conversion.shard-*-of-3.json"))) == 3


def _corrupt(case: str, synthetic_coco, tmp_path: Path) -> tuple[Path, Path]:
    """A broken copy of the synthetic set for ``case``: (annotation file, image folder)."""
    data = json.loads(synthetic_coco.annotation_file.read_text())
    images = synthetic_coco.image_dir
    path = tmp_path / "broken.json"
    if case == "malformed":
        path.write_text(synthetic_coco.annotation_file.read_text()[:-20])
        return path, images
    if case == "missing-key":
        del data["annotations"][2]["segmentation"]
    elif case == "orphan-annotation":
        data["annotations"][1]["image_id"] = 999999
    elif case == "bad-category":
        data["annotations"][1]["category_id"] = 91
    elif case == "missing-image-file":
        data["images"][3]["file_name"] = "not_there.jpg"
    elif case == "missing-file":
        return tmp_path / "absent.json", images
    path.write_text(json.dumps(data))
    return path, images


@pytest.mark.parametrize("case,message", [
    ("malformed", "not valid JSON"),
    ("missing-key", "lacks key(s) segmentation"),
    ("orphan-annotation", "points to image_id 999999"),
    ("bad-category", "category_id 91"),
    ("missing-image-file", "not_there.jpg"),
    ("missing-file", "annotation file not found"),
])
def test_bad_input_gives_clear_error_and_no_files(synthetic_coco, tmp_path, capsys, case, message):
    annotation_file, images = _corrupt(case, synthetic_coco, tmp_path)
    out = tmp_path / "out"
    code = cocomask_to_numpy.main(["--annotations", str(annotation_file), "--images", str(images),
                                   "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert message in captured.err and "Traceback" not in captured.err
    assert not out.exists() or not any(out.iterdir())


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


def test_killed_worker_then_rerun_completes_identically(tmp_path):
    big = make_coco(tmp_path / "big", num_images=300, size=(320, 400), max_objects=6, seed=3)
    command = [sys.executable, "cocomask_to_numpy.py", "--annotations", str(big.annotation_file),
               "--images", str(big.image_dir), "--workers", "2"]
    process = subprocess.Popen(command + ["--out", str(tmp_path / "interrupted")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "interrupted").glob("*.npy")) and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = _children(process.pid)
    assert workers, "no worker process to kill"
    os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert "re-run the same command" in err and "Traceback" not in err
    written = len(list((tmp_path / "interrupted").glob("*.npy")))
    assert 0 < written < 300

    subprocess.run(command + ["--out", str(tmp_path / "interrupted")], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run(command + ["--out", str(tmp_path / "clean")], cwd=ROOT, check=True,
                   capture_output=True)
    resumed, clean = read_masks(tmp_path / "interrupted"), read_masks(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and len(clean) == 300
    assert all(np.array_equal(resumed[k], clean[k]) for k in clean)
    assert not list((tmp_path / "interrupted").glob(".*.tmp"))


@pytest.mark.parametrize("name,split", [("coco128", "train2017"), ("coco-tiny", "val2017")])
def test_real_coco_counts_match_json(tmp_path, name, split):
    root = shared_dataset(name)
    annotation_file = root / "annotations" / f"instances_{split}.json"
    summary = convert(annotation_file, root / split, tmp_path, workers=2)
    data = json.loads(annotation_file.read_text())
    assert summary["images"] == len(data["images"]) == len(list(tmp_path.glob("*.npy")))
    assert summary["annotations"] == len(data["annotations"])
    categories_of = {}
    for a in data["annotations"]:
        categories_of.setdefault(a["image_id"], set()).add(a["category_id"])
    for image in data["images"]:
        mask = np.load(tmp_path / (Path(image["file_name"]).stem + ".npy"))
        assert mask.shape == (image["height"], image["width"])
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present <= categories_of.get(image["id"], set())
        if image["id"] not in categories_of:
            assert not mask.any()
