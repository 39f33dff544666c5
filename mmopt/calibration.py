"""Calibration inputs: the user's texts and images, a bundled text sample, or synthetic inputs (said so).

Inputs are produced batch by batch, never all at once.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mmopt.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Calibration:
    texts_file: Path | None = None
    images_dir: Path | None = None
    batch_size: int = 16
    num_samples: int = 128

    @classmethod
    def from_recipe(cls, recipe: Any) -> "Calibration":
        spec = recipe.calibration
        if spec is None:
            return cls()
        calib = cls(texts_file=recipe.resolve(spec.texts) if spec.texts else None,
                    images_dir=recipe.resolve(spec.images) if spec.images else None,
                    batch_size=spec.batch_size, num_samples=spec.num_samples)
        calib.check()
        return calib

    def check(self) -> None:
        """Fail early, before any model loads, on missing or empty data."""
        if self.texts_file is not None:
            self.texts()
        for path in self.image_files():
            _check_image(path)

    def texts(self) -> list[str]:
        path = self.texts_file
        if path is None:
            return []
        if not path.is_file():
            raise DataError(f"calibration texts: not a file: {path}")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise DataError(f"calibration texts: not UTF-8 text: {path}") from None
        texts = [line for line in lines if line][: self.num_samples]
        if not texts:
            raise DataError(f"calibration texts: no non-empty lines in {path}")
        return texts

    def image_files(self) -> list[Path]:
        folder = self.images_dir
        if folder is None:
            return []
        if not folder.is_dir():
            raise DataError(f"calibration images: not a folder: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"calibration images: no image files in {folder}")
        return files[: self.num_samples]


def _check_image(path: Path) -> None:
    """Read the header only: cheap enough for every calibration image, before any model loads."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"calibration image unreadable: {path.name} ({exc.__class__.__name__})") from None


def bundled_texts() -> list[str]:
    """A small set of varied English sentences shipped with mmopt, the default for text parts."""
    text = importlib.resources.files("mmopt").joinpath("data/sample_texts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_image(path: Path, size: int, mean: list, std: list):
    """Resize the shorter side to ``size`` (bicubic), centre-crop, normalise: CLIP / ImageNet style."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as F

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"calibration image unreadable: {path.name} ({exc.__class__.__name__})") from None
    img = F.resize(img, size, interpolation=F.InterpolationMode.BICUBIC)
    img = F.center_crop(img, size)
    tensor = F.to_tensor(img)
    return F.normalize(tensor, mean, std).to(torch.float32)


@dataclass
class InputSet:
    """Batches of inputs for one part and a words-for-people description of where they came from."""

    batches: list
    description: str
    synthetic: bool


def inputs_for(model: Any, adapter: Any, part: str, calib: Calibration | None, seq_len: int = 128,
               seed: int = 0, image_size: int | None = None) -> Iterator[tuple]:
    """Yield input tuples for ``part`` in batches; see ``describe_inputs`` for what they are."""
    import torch

    calib = calib or Calibration()
    bs = calib.batch_size
    if part == "text" and _can_tokenize(model, adapter):
        texts = (calib.texts() or bundled_texts())[: calib.num_samples]
        for i in range(0, len(texts), bs):
            yield adapter.tokenize(model, texts[i:i + bs], seq_len)
        return
    files = calib.image_files() if part != "text" else []
    if files:
        size = image_size or model.preprocess["image_size"]
        for i in range(0, len(files), bs):
            yield (torch.stack([load_image(f, size, model.preprocess["mean"], model.preprocess["std"])
                                for f in files[i:i + bs]]),)
        return
    from mmopt.adapters.base import Shapes

    # Synthetic inputs are seeded per batch, so the original and the optimized model see the same ones.
    n = calib.num_samples
    for i in range(0, n, bs):
        shapes = Shapes(batch_size=min(bs, n - i), image_size=image_size, seq_len=seq_len, seed=seed + i)
        yield adapter.example_inputs(model, part, shapes)


def describe_inputs(model: Any, adapter: Any, part: str, calib: Calibration | None) -> tuple[str, bool]:
    """(description, synthetic?) of what ``inputs_for`` yields for ``part``."""
    calib = calib or Calibration()
    if part == "text":
        texts = calib.texts()
        has_tokenizer = _can_tokenize(model, adapter)
        if texts and has_tokenizer:
            return f"calibration texts ({len(texts)})", False
        if has_tokenizer:
            n = min(len(bundled_texts()), calib.num_samples)
            return f"bundled sample texts ({n})", False
        return f"synthetic token ids ({calib.num_samples}; no tokenizer)", True
    files = calib.image_files()
    if files:
        return f"calibration images ({len(files)})", False
    return f"synthetic images ({calib.num_samples}; no calibration images given)", True


def _can_tokenize(model: Any, adapter: Any) -> bool:
    from mmopt.errors import UnsupportedError

    try:
        adapter.tokenize(model, ["probe"], 8)
        return True
    except UnsupportedError:
        return False
