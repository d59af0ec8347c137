"""Folder, binary, colour and VOC datasets; the split/verify/visualize tool; the real sets when present."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test as test_script
import train
from tests.conftest import shared_dataset
from tools import dataset as dataset_tool
from utils.classes import palette
from utils.data.dataset_tool import GRID_CELL, GRID_DRAWS
from utils.data.datasets import DatasetError, add_dataset_arguments, build_dataset


def options(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def save(array: np.ndarray, path: Path, format: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=format)


def striped(height: int = 24, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """An image of three vertical stripes and its class ids 0, 1, 2."""
    labels = np.repeat(np.repeat(np.arange(3, dtype=np.uint8), width // 3 + 1)[None, :width], height, axis=0)
    image = palette(3)[labels] // 2 + 60
    return image, labels


def test_folder_layout_pairs_by_stem_whatever_the_extension(tmp_path):
    image, labels = striped()
    for stem in ("a", "b"):
        save(image, tmp_path / "train_images" / f"{stem}.jpg")
        save(labels, tmp_path / "train_masks" / f"{stem}.png")
    save(image, tmp_path / "train_images" / "orphan.jpg")  # no mask: left out, with a warning
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\n")
    dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path)), "train")
    assert [p[0].name for p in dataset.pairs] == ["a.jpg", "b.jpg"]
    assert dataset.class_names == ["sky", "road", "car"]
    loaded_image, mask = dataset.load(0)
    np.testing.assert_array_equal(mask, labels)
    assert loaded_image.shape == (24, 32, 3)


def test_images_and_annotations_naming_and_webp_named_jpg(tmp_path):
    image, labels = striped()
    save(image, tmp_path / "images" / "val" / "x.jpg", format="WEBP")
    save(labels, tmp_path / "annotations" / "val" / "x.png")
    dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path), "--class-names", "a,b,c"),
                            "val")
    assert dataset.load(0)[0].shape == (24, 32, 3)


def test_binary_masks_are_thresholded_so_edges_invent_no_class(tmp_path):
    image, _ = striped()
    mask = np.zeros((24, 32), np.uint8)
    mask[:, 16:] = 255
    mask[:, 15] = 100  # anti-aliased edge: closer to background
    mask[:, 16] = 180  # closer to the foreground
    save(image, tmp_path / "train_images" / "f.jpg")
    save(mask, tmp_path / "train_masks" / "f.png")
    dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path), "--mask-mode", "binary",
                                    "--class-names", "background,flood"), "train")
    _, labels = dataset.load(0)
    assert set(np.unique(labels)) == {0, 1}
    assert (labels[:, :16] == 0).all() and (labels[:, 16:] == 1).all()


def test_colour_masks_map_through_a_palette(tmp_path):
    image, labels = striped()
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    save(image, tmp_path / "train_images" / "c.png")
    save(colours[labels], tmp_path / "train_masks" / "c.png")
    (tmp_path / "palette.txt").write_text("0 0 0\n255 0 0\n0 0 255\n")
    dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path), "--mask-mode", "colour",
                                    "--palette", str(tmp_path / "palette.txt"), "--class-names", "bg,red,blue"),
                            "train")
    np.testing.assert_array_equal(dataset.load(0)[1], labels)


def test_size_mismatch_is_warned_then_resized_or_skipped(tmp_path, caplog):
    image, labels = striped()
    save(image, tmp_path / "train_images" / "ok.jpg")
    save(labels, tmp_path / "train_masks" / "ok.png")
    save(image, tmp_path / "train_images" / "odd.jpg")
    save(labels[::2, ::2], tmp_path / "train_masks" / "odd.png")
    common = ("--dataset", "folder", "--data-dir", str(tmp_path), "--class-names", "a,b,c")
    resized = build_dataset(options(*common), "train")
    assert "odd.jpg" in caplog.text and "resized" in caplog.text
    odd = [i for i, p in enumerate(resized.pairs) if p[0].stem == "odd"][0]
    assert resized.load(odd)[1].shape == (24, 32)
    skipped = build_dataset(options(*common, "--size-mismatch", "skip"), "train")
    assert [p[0].stem for p in skipped.pairs] == ["ok"]


def test_list_files_with_absolute_segnet_paths_and_void_value(tmp_path):
    image, labels = striped()
    labels = labels.copy()
    labels[0, :] = 11  # CamVid's "unlabelled"
    save(image, tmp_path / "train" / "f.png")
    save(labels, tmp_path / "trainannot" / "f.png")
    (tmp_path / "train.txt").write_text("/SegNet/CamVid/train/f.png /SegNet/CamVid/trainannot/f.png\n")
    names = ",".join(f"c{i}" for i in range(11))
    dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path), "--void-value", "11",
                                    "--class-names", names), "train")
    mask = dataset.load(0)[1]
    assert (mask[0] == 255).all() and set(np.unique(mask[1:])) == {0, 1, 2}


def voc_fixture(root: Path) -> np.ndarray:
    image, labels = striped()
    labels = labels * 5  # classes 0, 5 (bottle), 10 (cow)
    labels[0, 0] = 255
    mask = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    mask.putpalette(palette(256).ravel().tolist())
    (root / "SegmentationClass").mkdir(parents=True)
    mask.save(root / "SegmentationClass" / "2011_1.png")
    save(image, root / "JPEGImages" / "2011_1.jpg")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2011_1\n")
    return labels


def test_voc_layout_reads_palette_indices_and_keeps_ignore(tmp_path):
    labels = voc_fixture(tmp_path)
    dataset = build_dataset(options("--dataset", "voc", "--data-dir", str(tmp_path)), "train")
    assert len(dataset.class_names) == 21 and dataset.class_names[15] == "person"
    np.testing.assert_array_equal(dataset.load(0)[1], labels)


def test_missing_layout_and_names_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="no 'train' split"):
        build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path), "--class-names", "a,b"), "train")
    image, labels = striped()
    save(image, tmp_path / "train_images" / "a.jpg")
    save(labels, tmp_path / "train_masks" / "a.png")
    with pytest.raises(DatasetError, match="no class names"):
        build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path)), "train")
    with pytest.raises(DatasetError, match="outside 0..1"):
        build_dataset(options("--dataset", "folder", "--data-dir", str(tmp_path), "--class-names", "a,b"),
                      "train").load(0)


def test_split_verify_visualize_tool(tmp_path, capsys):
    image, labels = striped()
    for n in range(20):
        save(image, tmp_path / "data" / "Image" / f"{n}.jpg")
        save(labels, tmp_path / "data" / "Mask" / f"{n}.png")
    data = str(tmp_path / "data")
    assert dataset_tool.main(["split", "--data-dir", data, "--out", str(tmp_path / "lists"), "--seed", "3"]) == 0
    lists = {name: (tmp_path / "lists" / f"{name}.txt").read_text().split("\n")[:-1] for name in ("train", "val",
                                                                                                   "test")}
    assert [len(v) for v in lists.values()] == [16, 2, 2]
    assert len(set(sum(lists.values(), []))) == 20  # every image in exactly one split
    common = ["--dataset", "folder", "--data-dir", data, "--split-dir", str(tmp_path / "lists"), "--class-names",
              "a,b,c"]
    assert dataset_tool.main(["verify", *common]) == 0
    out = capsys.readouterr().out
    assert "16 pairs, 0 with problems" in out and "34.38%" in out and "31.25%" in out  # stripes 11, 11, 10 wide
    assert dataset_tool.main(["visualize", *common, "--out", str(tmp_path / "viz"), "--count", "3"]) == 0
    assert len(list((tmp_path / "viz").glob("*_overlay.jpg"))) == 3


def test_real_flood_area(tmp_path):
    root = shared_dataset("flood-area")
    assert dataset_tool.main(["split", "--data-dir", str(root), "--out", str(tmp_path)]) == 0
    dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(root), "--split-dir", str(tmp_path),
                                    "--mask-mode", "binary", "--class-names", "background,flood"), "train")
    assert len(dataset) == 219  # 8/10 of 273
    webp = [i for i, p in enumerate(dataset.pairs) if p[0].read_bytes()[8:12] == b"WEBP"]
    assert webp
    image, mask = dataset.load(webp[0])
    assert image.shape[:2] == mask.shape and set(np.unique(mask)) <= {0, 1}


def test_real_camvid_lists(tmp_path):
    root = shared_dataset("camvid") / "CamVid"
    names = "Sky,Building,Pole,Road,Pavement,Tree,SignSymbol,Fence,Car,Pedestrian,Bicyclist"
    for split, count in (("train", 62), ("val", 26)):
        dataset = build_dataset(options("--dataset", "folder", "--data-dir", str(root), "--void-value", "11",
                                        "--class-names", names), split)
        assert len(dataset) == count
    image, mask = dataset.load(0)
    assert image.shape == (360, 480, 3) and set(np.unique(mask)) <= set(range(11)) | {255}


def test_real_voc_labelme_example(tmp_path):
    root = shared_dataset("voc-labelme-example") / "examples" / "semantic_segmentation" / "data_dataset_voc"
    assert dataset_tool.main(["split", "--dataset", "voc", "--data-dir", str(root), "--out", str(tmp_path),
                              "--ratios", "1", "0"]) == 0
    dataset = build_dataset(options("--dataset", "voc", "--data-dir", str(root), "--split-dir", str(tmp_path)),
                            "train")
    values = set().union(*(set(np.unique(dataset.load(i)[1]).tolist()) for i in range(len(dataset))))
    assert len(dataset) == 3 and values == {0, 5, 6, 7, 9, 15, 18, 255}
    assert dataset.class_names[0] == "_background_"


def test_visualize_augment_draws_a_grid_of_crops_beside_their_masks(tmp_path, capsys):
    image, labels = striped(48, 64)
    for n in range(3):
        save(image, tmp_path / "train_images" / f"{n}.png")
        save(labels, tmp_path / "train_masks" / f"{n}.png")
    common = ["--dataset", "folder", "--data-dir", str(tmp_path), "--class-names", "a,b,c"]
    assert dataset_tool.main(["visualize", *common, "--out", str(tmp_path / "viz"), "--count", "2",
                              "--augment", "strong", "--crop-size", "32"]) == 0
    assert f"wrote {tmp_path / 'viz' / 'augment_strong.jpg'}" in capsys.readouterr().out
    grid = np.asarray(Image.open(tmp_path / "viz" / "augment_strong.jpg")).astype(int)
    cell = GRID_CELL
    assert grid.shape == (2 * cell, 2 * GRID_DRAWS * cell, 3)  # a row per image, a crop and its mask per draw
    crops = [grid[:cell, 2 * d * cell:(2 * d + 1) * cell] for d in range(GRID_DRAWS)]
    overlays = [grid[:cell, (2 * d + 1) * cell:(2 * d + 2) * cell] for d in range(GRID_DRAWS)]
    assert any(np.abs(crops[0] - crop).mean() > 5 for crop in crops[1:])  # each draw is another sample
    assert all(np.abs(crop - overlay).mean() > 5 for crop, overlay in zip(crops, overlays, strict=True))


def test_segnet_trains_and_evaluates_with_a_validation_image_thinner_than_it_accepts(tmp_path):
    """SegNet needs 32 pixels; a 12-pixel-high validation image (16 once padded to the multiple of
    16) is padded to 32, mask ignore, in train.py's validation and in test.py, instead of stopping."""
    image, labels = striped(48, 48)
    for stem in ("a", "b"):
        save(image, tmp_path / "train_images" / f"{stem}.png")
        save(labels, tmp_path / "train_masks" / f"{stem}.png")
    thin_image, thin_labels = striped(12, 64)
    save(thin_image, tmp_path / "val_images" / "thin.png")
    save(thin_labels, tmp_path / "val_masks" / "thin.png")
    data = ["--dataset", "folder", "--data-dir", str(tmp_path), "--class-names", "a,b,c"]
    save_dir = tmp_path / "save"
    assert train.main([*data, "--model", "segnet", "--base-width", "4", "--crop-size", "32", "--batch-size", "2",
                       "--epochs", "1", "--workers", "0", "--save-dir", str(save_dir)]) == 0
    assert test_script.main([*data, "--checkpoint", str(save_dir / "best.pth"), "--workers", "0",
                             "--save-dir", str(save_dir)]) == 0
    assert (save_dir / "metrics.json").is_file()
