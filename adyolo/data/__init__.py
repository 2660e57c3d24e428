"""Face data: label formats, the synthetic default dataset, augmentations, dataset and loader."""
