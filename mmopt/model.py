"""The loaded model as every pass and adapter sees it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmopt.errors import UnsupportedError


@dataclass
class Model:
    """A model of one family, its parts, and what is needed to rebuild and preprocess it.

    ``arch`` is the adapter's rebuild config (JSON-able): passes that change the structure update it, and
    ``mmopt.load`` rebuilds the module from it before the weights go in.
    """

    module: Any                     # torch.nn.Module: the family's root module
    source: str                     # hf | open_clip | torchvision
    arch: dict
    parts: list[str]
    preprocess: dict = field(default_factory=dict)
    random_weights: bool = False
    assets: Path | None = None      # a folder whose non-weight files travel with the checkpoint (tokenizer, ...)
    info: dict = field(default_factory=dict)   # adapter-private facts: pooling, embedding kind, ...

    def check_part(self, part: str) -> None:
        if part not in self.parts:
            raise UnsupportedError(f"this model has no part {part!r}; it has: {', '.join(self.parts)}")

    def part_prefixes(self, part: str) -> list[str]:
        """State-dict key prefixes that belong to ``part`` (set by the adapter at load)."""
        return self.info["part_prefixes"][part]

    def owns(self, part: str, key: str) -> bool:
        """Whether state-dict or module name ``key`` belongs to ``part``."""
        return any(_under(key, prefix) for prefix in self.part_prefixes(part))

    def part_of(self, key: str) -> str | None:
        for part in self.parts:
            if self.owns(part, key):
                return part
        return None

    def named_modules(self, part: str) -> Iterator[tuple[str, Any]]:
        """(name, module) of every module in ``part``; names are relative to the root module."""
        for name, module in self.module.named_modules():
            if name and self.owns(part, name):
                yield name, module

    def named_tensors(self, part: str, buffers: bool = True) -> Iterator[tuple[str, Any]]:
        """(name, tensor) of every parameter (and buffer) of ``part``, each storage once."""
        seen: set[int] = set()
        items = list(self.module.named_parameters(remove_duplicate=False))
        if buffers:
            items += list(self.module.named_buffers(remove_duplicate=False))
        for name, tensor in items:
            if tensor is None or id(tensor) in seen or not self.owns(part, name):
                continue
            seen.add(id(tensor))
            yield name, tensor


def _under(key: str, prefix: str) -> bool:
    if prefix == "":
        return True
    if prefix.endswith("."):
        return key.startswith(prefix) or key == prefix[:-1]
    return key == prefix or key.startswith(prefix + ".")
