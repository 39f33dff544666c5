"""Calibration inputs: the user's texts, images and captions, a bundled text sample, or synthetic inputs (said so).

Everything is streamed batch by batch, never held all at once. Images go through a torch DataLoader whose
workers decode and preprocess ahead of the consumer; each preprocessed batch is also written to an on-disk
cache keyed by the file list (paths, sizes, mtimes) and the preprocessing (size, mean, std, interpolation,
batch size), so a second run with the same data and preprocessing reads tensors instead of decoding images.
The cache lives in ``$MMOPT_CACHE_DIR`` or ``~/.cache/mmopt`` and is written atomically (a batch folder
appears only once every batch is in it).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from mmopt.core import Shapes, is_text_part
from mmopt.errors import DataError

if TYPE_CHECKING:
    import torch

    from mmopt.adapters.base import Adapter
    from mmopt.core import Model
    from mmopt.recipe import Recipe

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_VERSION = 1
DEFAULT_WORKERS = 2
# When a pass fits itself to calibration data (distillation, a least-squares projection, a layer choice), every
# HOLDOUT_EVERY-th sample, up to HOLDOUT_MAX of them, is kept away from it and fidelity is measured on those:
# a score on the samples a student was trained on says how well it memorised them, not how it will do.
HOLDOUT_EVERY = 5
HOLDOUT_MAX = 256


@dataclass
class Calibration:
    texts_file: Path | None = None
    images_dir: Path | None = None
    batch_size: int = 16
    num_samples: int = 128
    captions_file: Path | None = None
    cache: bool = True
    num_workers: int = DEFAULT_WORKERS      # DataLoader workers decoding images ahead of use (0: in-process)
    split: str = "all"                      # "all", "fit" (what passes learn from) or "holdout" (for fidelity)
    capped_from: int | None = None          # num_samples before a time budget cut it (synthetic fidelity inputs)

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "Calibration":
        spec = recipe.calibration
        if spec is None:
            return cls()
        calib = cls(texts_file=recipe.resolve(spec.texts) if spec.texts else None,
                    images_dir=recipe.resolve(spec.images) if spec.images else None,
                    batch_size=spec.batch_size, num_samples=spec.num_samples,
                    captions_file=recipe.resolve(spec.captions) if spec.captions else None, cache=spec.cache)
        calib.check()
        return calib

    def check(self) -> None:
        """Fail early, before any model loads, on missing, empty, unreadable or mismatched data."""
        if self.texts_file is not None:
            next(self.iter_texts())
        if self.captions_file is not None and self.images_dir is None:
            raise DataError(f"calibration captions need images: the folder their image files are in "
                            f"({self.captions_file.name})")
        for path in self.image_files():
            _check_image(path)

    def only(self, split: str) -> "Calibration":
        """The same data restricted to the ``fit`` or ``holdout`` samples (see ``HOLDOUT_EVERY``)."""
        return replace(self, split=split)

    def selected(self, items: Iterator[Any]) -> Iterator[Any]:
        """The items of this split, by position among all samples."""
        for index, item in enumerate(items):
            held = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and index < HOLDOUT_EVERY * HOLDOUT_MAX
            if self.split == "all" or held == (self.split == "holdout"):
                yield item

    # --- texts -------------------------------------------------------------------------------------------

    def iter_texts(self) -> Iterator[str]:
        """Non-empty lines of the texts file (at most ``num_samples``, then this split's), read lazily."""
        return self.selected(self._read_texts())

    def _read_texts(self) -> Iterator[str]:
        path = self.texts_file
        if path is None:
            return
        if not path.is_file():
            raise DataError(f"calibration texts: not a file: {path}")
        count = 0
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    yield line
                    count += 1
                    if count >= self.num_samples:
                        return
        except UnicodeDecodeError:
            raise DataError(f"calibration texts: not UTF-8 text: {path}") from None
        if count == 0:
            raise DataError(f"calibration texts: no non-empty lines in {path}")

    def texts(self) -> list[str]:
        return list(self.iter_texts())

    # --- images and captions -----------------------------------------------------------------------------

    def image_files(self) -> list[Path]:
        """The calibration images: those the captions file names (in its order), else the folder's, sorted."""
        folder = self.images_dir
        if folder is None:
            return []
        if not folder.is_dir():
            raise DataError(f"calibration images: not a folder: {folder}")
        if self.captions_file is not None:
            return [path for path, _ in self.pairs()]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"calibration images: no image files in {folder}")
        return list(self.selected(iter(files[: self.num_samples])))

    def pairs(self) -> list[tuple[Path, str]]:
        """(image file, caption) pairs from the captions file: ``image_file<TAB>caption`` per line."""
        path = self.captions_file
        if path is None:
            return []
        if not path.is_file():
            raise DataError(f"calibration captions: not a file: {path}")
        if self.images_dir is None or not self.images_dir.is_dir():
            raise DataError(f"calibration captions need images: a folder holding their image files ({path.name})")
        out = []
        try:
            with open(path, encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    name, tab, caption = line.rstrip("\n").partition("\t")
                    if not tab or not name.strip() or not caption.strip():
                        raise DataError(f"calibration captions {path.name}:{number}: expected "
                                        f"image_file<TAB>caption, got {line.strip()[:60]!r}")
                    image = self.images_dir / name.strip()
                    if not image.is_file():
                        raise DataError(f"calibration captions {path.name}:{number}: image {name.strip()!r} "
                                        f"is not in {self.images_dir}")
                    out.append((image, caption.strip()))
                    if len(out) >= self.num_samples:
                        break
        except UnicodeDecodeError:
            raise DataError(f"calibration captions: not UTF-8 text: {path}") from None
        if not out:
            raise DataError(f"calibration captions: no image_file<TAB>caption lines in {path}")
        return list(self.selected(iter(out)))

    def captions(self) -> list[str]:
        return [caption for _, caption in self.pairs()]


def bundled_texts() -> list[str]:
    """A small set of varied English sentences shipped with mmopt, the default for text parts."""
    text = importlib.resources.files("mmopt").joinpath("data/sample_texts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- image decoding, preprocessing and the on-disk cache -------------------------------------------------

def _check_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()      # header and structure only; decoding happens in the loader
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"calibration image unreadable: {path} ({exc.__class__.__name__})") from None


def load_image(path: Path, size: int, mean: list, std: list, interpolation: str = "bicubic") -> torch.Tensor:
    """Resize the shorter side to ``size``, centre-crop, normalise: CLIP / ImageNet style."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as F

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"calibration image unreadable: {path.name} ({exc.__class__.__name__})") from None
    mode = {"bilinear": F.InterpolationMode.BILINEAR, "nearest": F.InterpolationMode.NEAREST}.get(
        interpolation, F.InterpolationMode.BICUBIC)
    img = F.resize(img, size, interpolation=mode)
    img = F.center_crop(img, size)
    tensor = F.to_tensor(img)
    return F.normalize(tensor, mean, std).to(torch.float32)


@dataclass(frozen=True)
class ImagePreprocess:
    size: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"

    @classmethod
    def of(cls, model: Model, image_size: int | None = None) -> "ImagePreprocess":
        pp = model.preprocess
        return cls(int(image_size or pp["image_size"]), tuple(pp.get("mean", (0.5, 0.5, 0.5))),
                   tuple(pp.get("std", (0.5, 0.5, 0.5))), pp.get("interpolation", "bicubic"))


class _ImageFiles:
    """A map-style dataset of preprocessed images. Errors come back as text, since a DataLoader worker
    re-raises exceptions with its traceback in the message, which would not be one line."""

    def __init__(self, files: list[Path], pp: ImagePreprocess):
        self.files, self.pp = files, pp

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return load_image(self.files[i], self.pp.size, list(self.pp.mean), list(self.pp.std),
                              self.pp.interpolation), None
        except DataError as exc:
            return None, exc.message


def _collate(items: list) -> tuple:
    import torch

    errors = [err for _, err in items if err]
    if errors:
        return None, errors[0]
    return torch.stack([t for t, _ in items]), None


def cache_root() -> Path:
    return Path(os.environ.get("MMOPT_CACHE_DIR") or Path.home() / ".cache" / "mmopt") / "calibration"


def cache_key(files: list[Path], pp: ImagePreprocess, batch_size: int) -> str:
    """Changes when any file is added, removed, rewritten (size or mtime) or the preprocessing changes."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "files": entries, "size": pp.size, "mean": list(pp.mean),
                       "std": list(pp.std), "interpolation": pp.interpolation, "batch_size": batch_size},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def image_batches(files: list[Path], pp: ImagePreprocess, batch_size: int, cache: bool = True,
                  num_workers: int = DEFAULT_WORKERS) -> Iterator[torch.Tensor]:
    """Preprocessed image batches (float32, N x 3 x size x size), from the cache when it holds them."""
    import torch

    if not files:
        return
    folder = cache_root() / cache_key(files, pp, batch_size)
    n_batches = -(-len(files) // batch_size)
    if cache and (folder / "complete").is_file():
        for i in range(n_batches):
            yield torch.load(folder / f"{i:05d}.pt", weights_only=True)
        return
    from torch.utils.data import DataLoader

    workers = min(num_workers, n_batches)
    loader = DataLoader(_ImageFiles(files, pp), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, prefetch_factor=2 if workers else None)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if cache:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    done = False
    try:
        for i, (batch, error) in enumerate(loader):
            if error:
                raise DataError(error)
            if cache:
                torch.save(batch, tmp / f"{i:05d}.pt")
            yield batch
        done = True
    finally:
        if cache:
            if done:
                (tmp / "complete").write_text("")
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def synthetic_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random images, the same picture at every ``size`` (a 16 x 16 random grid, upsampled bicubically),
    so a model at a new input resolution can be compared with the original at its own."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 3, 16, 16, generator=gen)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)


# --- inputs for a part -----------------------------------------------------------------------------------

@dataclass
class InputSet:
    """Batches of inputs for one part and a words-for-people description of where they came from."""

    batches: list
    description: str
    synthetic: bool


def _chunks(items: Iterator[Any], size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def text_source(calib: Calibration) -> Iterator[str]:
    """The texts for a text part: the texts file, else the captions, else the bundled sample."""
    if calib.texts_file is not None:
        return calib.iter_texts()
    if calib.captions_file is not None:
        return iter(calib.captions())
    return calib.selected(iter(bundled_texts()[: calib.num_samples]))


def fit_and_holdout(calib: Calibration, parts: list[str]) -> tuple[Calibration, Calibration] | None:
    """(the samples passes may fit to, the held-out samples fidelity is measured on), or None when some part's
    data is too small to hold any out (fewer than ``HOLDOUT_EVERY`` samples)."""
    holdout = calib.only("holdout")
    for part in parts:
        if is_text_part(part) and next(text_source(holdout), None) is None:
            return None
        if not is_text_part(part) and calib.images_dir is not None and not holdout.image_files():
            return None
    return calib.only("fit"), holdout


def inputs_for(model: Model, adapter: Adapter, part: str, calib: Calibration | None, seq_len: int = 128,
               seed: int = 0, image_size: int | None = None) -> Iterator[tuple]:
    """Yield input tuples for ``part`` in batches; see ``describe_inputs`` for what they are.

    Image inputs are preprocessed for ``model`` at ``image_size`` (default: the model's own), so two models
    at different resolutions see the same images (calibration files, or the same synthetic pictures).
    """
    calib = calib or Calibration()
    bs = calib.batch_size
    text = is_text_part(part)
    if text and _can_tokenize(model, adapter):
        for chunk in _chunks(text_source(calib), bs):
            yield adapter.tokenize(model, chunk, seq_len)
        return
    files = calib.image_files() if not text else []
    if files:
        device = model.part_device(part)
        for batch in image_batches(files, ImagePreprocess.of(model, image_size), bs, calib.cache, calib.num_workers):
            yield (batch.to(device),)
        return
    # Synthetic inputs are seeded per batch, so the original and the optimized model see the same ones.
    n = calib.num_samples
    for i in range(0, n, bs):
        if not text:
            size = int(image_size or model.preprocess["image_size"])
            yield (synthetic_images(min(bs, n - i), size, seed + i).to(model.part_device(part)),)
            continue
        shapes = Shapes(batch_size=min(bs, n - i), image_size=image_size, seq_len=seq_len, seed=seed + i)
        yield adapter.example_inputs(model, part, shapes)


def describe_inputs(model: Model, adapter: Adapter, part: str, calib: Calibration | None) -> tuple[str, bool]:
    """(description, synthetic?) of what ``inputs_for`` yields for ``part``."""
    calib = calib or Calibration()
    if is_text_part(part):
        has_tokenizer = _can_tokenize(model, adapter)
        if calib.texts_file is not None and has_tokenizer:
            return f"calibration texts ({len(calib.texts())})", False
        if calib.captions_file is not None and has_tokenizer:
            return f"calibration captions ({len(calib.pairs())})", False
        if has_tokenizer:
            n = sum(1 for _ in text_source(calib))
            return f"bundled sample texts ({n})", False
        return f"synthetic token ids ({calib.num_samples}; no tokenizer)", True
    files = calib.image_files()
    if files:
        return f"calibration images ({len(files)})", False
    return f"synthetic images ({calib.num_samples}; no calibration images given)", True


def _can_tokenize(model: Model, adapter: Adapter) -> bool:
    from mmopt.errors import UnsupportedError

    try:
        adapter.tokenize(model, ["probe"], 8)
        return True
    except UnsupportedError:
        return False
