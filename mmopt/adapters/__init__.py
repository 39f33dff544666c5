"""One adapter per model family; only this package imports open_clip, transformers and torchvision."""
