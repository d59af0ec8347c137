"""Everything before the model: COCO conversion, datasets and layouts, transforms, augmentation, dataset tools."""
