"""Checkpoints: safetensors weight files plus the ``mmopt.json`` manifest; atomic writes; hash-checked loads."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from mmopt.errors import IntegrityError, ModelSpecError, UserError

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.core import Model

# Set by the CLI's signal handlers. A KeyboardInterrupt raised inside a finalizer or C callback can be
# swallowed, so the final rename also checks this flag: an interrupted run never publishes its output.
INTERRUPTED = threading.Event()

MANIFEST = "mmopt.json"
# written after the manifest, read by no loader: not hashed (README.md is the model card, model_card.py)
REPORT_FILES = ("report.json", "report.md", "report.png", "README.md")
FORMAT = "mmopt-checkpoint/1"


# --- atomic output ---------------------------------------------------------------------------------------

def check_output(target: Path, force: bool) -> None:
    """Refuse, before any work, an output that exists (without ``force``) or cannot be a folder."""
    if target.exists() and not target.is_dir():
        raise UserError(f"output path is a file, not a folder: {target}")
    if target.exists() and not force:
        raise UserError(f"output already exists: {target}", hint="pass --force to replace it")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"output's parent is a file, not a folder: {parent}")


@contextmanager
def atomic_folder(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target``, on any failure it vanishes.

    A signal or error at any point leaves either the previous output untouched or no output at all, and no
    parent folder this run created (an interrupted first run into ``out/x`` leaves no empty ``out/``). What is
    published has the modes the umask gives new files and folders (safetensors writes its files 0600).
    """
    check_output(target, force)
    created = _make_parents(target.parent)
    tmp = target.parent / f".{target.name}.mmopt-tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.mmopt-old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    published = False
    try:
        tmp.mkdir()     # inside the try: a signal the moment the folder exists still removes it
        yield tmp
        apply_umask(tmp)
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        published = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            if not target.exists():       # interrupted between the two renames: put the previous output back
                os.replace(old, target)
            else:
                shutil.rmtree(old, ignore_errors=True)
        if not published:
            _remove_empty(created)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:          # deepest first: a parent empties once its child is gone
        try:
            folder.rmdir()
        except OSError:             # not empty (another run wrote there meanwhile) or already gone
            return


def current_umask() -> int:
    mask = os.umask(0)      # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``open``/``mkdir`` would under the umask: files
    0666 & ~umask, folders 0777 & ~umask. Libraries write some files private (safetensors' 0600), and a copied
    asset keeps its source's mode (read-only in an installed package), so a server running as another user could
    not read the output."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


# --- writing ---------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("mmopt", "torch", "transformers", "open_clip_torch", "torchvision", "bitsandbytes", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def write_checkpoint(model: Model, adapter: Adapter, folder: Path, source: dict, passes: list[dict],
                     recipe: dict | None = None) -> dict:
    """Write weights and manifest of ``model`` into ``folder``; return the manifest. ``recipe`` records what made
    the output (``{"sha256": ..., "identity": ...}``, see ``Recipe.identity``)."""
    files = adapter.save(model, folder)
    manifest = {
        "format": FORMAT,
        "source": source,
        "parts": list(model.parts),
        "architecture": model.arch,
        "preprocessing": model.preprocess,
        "info": model.saved_info(),
        "quantization": model.quantization.to_json() if model.quantization is not None else None,
        "passes": passes,
        "recipe": recipe,
        "random_weights": model.random_weights,
        "files": {part: {"file": name, "sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
                  for part, name in sorted(files.items())},
        "assets": asset_hashes(folder, set(files.values())),
        "versions": versions(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def asset_hashes(folder: Path, weight_files: set[str]) -> dict:
    """sha256 and size of every other file a loader may read (config, tokenizer, sentence-transformers modules),
    by path relative to ``folder``; the manifest itself and the reports written after it are not listed."""
    out = {}
    for file in sorted(Path(folder).rglob("*")):
        name = file.relative_to(folder).as_posix()
        if file.is_file() and name not in weight_files and name not in (MANIFEST, *REPORT_FILES):
            out[name] = {"sha256": sha256(file), "bytes": file.stat().st_size}
    return out


def verify_folder(path: Path, manifest: dict | None = None) -> list[str]:
    """Check every file the manifest lists (weights and assets) against its sha256; return the names checked.
    The first file missing or changed raises ``IntegrityError`` naming it."""
    path = Path(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    checked = []
    for entry in manifest["files"].values():
        verify_file(path, entry)
        checked.append(entry["file"])
    for name, entry in manifest.get("assets", {}).items():
        verify_file(path, {"file": name, **entry})
        checked.append(name)
    return checked


def serialized_bytes(tensors: dict) -> int:
    """Exact size of ``tensors`` as a safetensors file, from their dtypes and shapes (no copy of the data: this
    runs on models as large as memory, and on meta tensors)."""
    from mmopt.weights import safetensors_size

    return safetensors_size({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})


# --- reading ---------------------------------------------------------------------------------------------

def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ModelSpecError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise ModelSpecError(f"a checkpoint is a folder, got a file: {path}")
    file = path / MANIFEST
    if not file.is_file():
        raise ModelSpecError(f"not an mmopt checkpoint (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{file}: malformed manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{file}: not a {FORMAT} manifest")
    return manifest


def verify_file(path: Path, entry: dict) -> Path:
    """The weight file of a manifest entry, after checking its sha256."""
    file = Path(path) / entry["file"]
    if not file.is_file():
        raise IntegrityError(f"checkpoint file missing: {file}")
    if sha256(file) != entry["sha256"]:
        raise IntegrityError(f"{entry['file']} does not match its sha256 in {MANIFEST}: the file was changed or corrupted")
    return file


def verified_tensors(path: Path, entry: dict) -> dict:
    """Tensors of one weight file after checking its sha256 against the manifest."""
    from safetensors.torch import load_file

    return load_file(str(verify_file(path, entry)))


def load_model(path: Path, parts: list[str] | None = None, device: str = "cpu") -> Model:
    """Rebuild the model in checkpoint ``path`` with only ``parts`` (default: all), weights hash-checked."""
    from mmopt import registry
    from mmopt.core import Quantization
    from mmopt.weights import load_weights_into, uninitialised

    path = Path(path)
    manifest = read_manifest(path)
    for name, entry in manifest.get("assets", {}).items():      # weight files are checked as they are read
        verify_file(path, {"file": name, **entry})
    adapter = registry.adapter_for(manifest["source"]["source"])
    info = dict(manifest["info"])
    # manifests before the typed field kept what the quantize pass did in info["quantization"]
    quantization = manifest.get("quantization") or info.pop("quantization", None)
    with uninitialised():       # every weight is loaded below, strictly
        model = adapter.build(manifest["architecture"], manifest["preprocessing"], info)
    model.quantization = Quantization(**quantization) if quantization else None
    wanted = list(parts) if parts else list(manifest["parts"])
    for part in wanted:
        if part not in manifest["parts"]:
            raise UserError(f"checkpoint has no part {part!r}; it has: {', '.join(manifest['parts'])}")
    # Parts not wanted go before any pass is replayed: a pass restores only what this load keeps (dropping a
    # part after the quantize pass's restore would have to undo its int8 parametrizations first).
    for part in [p for p in list(model.parts) if p not in wanted]:
        adapter.drop_part(model, part)
    applied = []
    for entry in manifest["passes"]:
        step, record = registry.make_pass(entry["name"], entry["config"]), entry.get("record", {})
        step.restore(model, record, adapter)
        applied.append((step, record))
    state: dict = {}
    for part, entry in manifest["files"].items():
        if part in wanted or part not in manifest["parts"]:     # "shared" tensors belong to every subset
            state.update(verified_tensors(path, entry))
    for step, record in applied:
        state = step.load_state(model, record, state)
    load_weights_into(model.module, state, f"checkpoint {path}")
    model.random_weights = bool(manifest.get("random_weights"))
    model.assets = path
    model.module.to(device).eval()
    return model
