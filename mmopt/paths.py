"""Local paths: ``pkg://package/sub`` paths, hub ids refused in one line, and the one rule for resolving a
recipe's relative paths against its folder."""
from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from mmopt.core import ModelSpec
from mmopt.errors import ModelSpecError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PACKAGE = "pkg://"


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/"))


def resolve_path(path: str | Path, base: Path) -> Path:
    """``path`` with ``~`` expanded and a relative path taken against ``base`` (a recipe's folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def resolve_spec(spec: ModelSpec, base: Path) -> ModelSpec:
    """``spec`` with its path and weights resolved against ``base`` (``resolve_path``). ``pkg://`` paths are left
    for ``local_path``; a missing relative path that reads like a hub id keeps its text, so the error can say
    what it is."""
    update = {}
    for key in ("path", "weights"):
        value = getattr(spec, key)
        if not value or value.startswith(PACKAGE):
            continue
        resolved = resolve_path(value, base)
        update[key] = value if not resolved.exists() and looks_like_hub_id(value) else str(resolved)
    return spec.model_copy(update=update)


def local_path(value: str | Path, what: str) -> Path:
    """Resolve ``pkg://package/sub`` and plain paths to an existing local path, or raise one clear line."""
    text = str(value)
    if text.startswith(PACKAGE):
        package, _, sub = text[len(PACKAGE):].partition("/")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise ModelSpecError(f"{what}: package {package!r} is not installed (from {text})",
                                 hint=f"pip install {package.replace('_', '-')}") from None
        path = Path(str(root)) / sub
        if not path.exists():
            raise ModelSpecError(f"{what}: package {package!r} has no {sub!r} (from {text})")
        return path
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(text):
        raise ModelSpecError(f"{what}: {text!r} looks like a hub id, and nothing is downloaded; it is not "
                             "available offline", hint="download it elsewhere and pass a local path")
    raise ModelSpecError(f"{what}: path does not exist: {path}")
