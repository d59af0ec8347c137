"""The COCO-mask dataset pairs images with masks, converts any image mode, and explains bad data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils.data.coco_convert import convert
from utils.data.datasets import DatasetError, coco_mask_dataset
from utils.data.transforms import TrainTransform


@pytest.fixture()
def converted(synthetic_coco, tmp_path):
    convert(synthetic_coco.annotation_file, synthetic_coco.image_dir, tmp_path / "masks")
    return synthetic_coco.image_dir, tmp_path / "masks"


def test_pairs_every_image_with_its_mask(converted):
    images, masks = converted
    dataset = coco_mask_dataset(images, masks)
    assert len(dataset) == 8
    for index in range(len(dataset)):
        image, mask = dataset.load(index)
        assert image.dtype == np.uint8 and image.shape == mask.shape + (3,)
        np.testing.assert_array_equal(mask, np.load(masks / (dataset.pairs[index][0].stem + ".npy")))


def test_transformed_items_batch(converted):
    dataset = coco_mask_dataset(*converted, transform=TrainTransform(crop_size=32))
    image, mask = dataset[1]
    assert tuple(image.shape) == (3, 32, 32) and tuple(mask.shape) == (32, 32)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode).save(tmp_path / "img" / "a.jpg"
                                                                 if mode in ("L", "CMYK") else
                                                                 tmp_path / "img" / "a.png")
    (tmp_path / "masks").mkdir()
    np.save(tmp_path / "masks" / "a.npy", np.zeros((10, 20), np.uint8))
    image, _ = coco_mask_dataset(tmp_path / "img", tmp_path / "masks").load(0)
    assert image.shape == (10, 20, 3)


def test_exif_orientation_is_applied(tmp_path):
    (tmp_path / "img").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.new("RGB", (20, 10)).save(tmp_path / "img" / "a.jpg", exif=exif)
    (tmp_path / "masks").mkdir()
    np.save(tmp_path / "masks" / "a.npy", np.zeros((20, 10), np.uint8))
    image, mask = coco_mask_dataset(tmp_path / "img", tmp_path / "masks").load(0)
    assert image.shape == (20, 10, 3)


def test_bad_data_is_explained(converted, tmp_path):
    images, masks = converted
    name = sorted(masks.glob("*.npy"))[2]
    np.save(name, np.full((5, 5), 3, np.uint8))
    with pytest.raises(DatasetError, match="but its mask is 5x5"):
        coco_mask_dataset(images, masks).load(2)
    mask = np.zeros(np.asarray(Image.open(images / (name.stem + ".jpg"))).shape[:2], np.uint8)
    mask[0, 0] = 120
    np.save(name, mask)
    with pytest.raises(DatasetError, match=r"values \[120\] outside 0..90"):
        coco_mask_dataset(images, masks).load(2)
    name.unlink()
    with pytest.raises(DatasetError, match="have no mask"):
        coco_mask_dataset(images, masks)
    with pytest.raises(DatasetError, match="image folder not found"):
        coco_mask_dataset(tmp_path / "nowhere", masks)
