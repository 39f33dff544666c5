"""Weight files: reading a state dict without unpickling, strict loading, writing one safetensors file per part."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmopt.errors import ModelSpecError, first_line
from mmopt.paths import local_path

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.core import Model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a torch checkpoint read with ``weights_only=True``; never unpickle."""
    import torch

    path = local_path(path, "weights")
    if path.is_dir():
        raise ModelSpecError(f"weights must be a file, got a folder: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path, head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelSpecError(f"weights {path.name}: not a readable safetensors file ({first_line(exc)})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, pickled-object or text files
        raise ModelSpecError(f"weights {path.name}: not a safetensors or weights-only torch checkpoint "
                             f"({first_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"weights {path.name}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_weights_file(path: str | Path) -> None:
    """Recognise a weights file by its header without loading it (``validate``): a safetensors file whose JSON
    header is readable and whose tensors end at the file's end, a torch zip checkpoint, or a legacy torch pickle.
    Raise one line otherwise."""
    import json

    path = local_path(path, "weights")
    if path.is_dir():
        raise ModelSpecError(f"weights must be a file, got a folder: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02":     # torch.save: zip, or the legacy pickle
            return
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if path.suffix != ".safetensors" and not (0 < header_len < min(size, 100_000_000) and fh.read(1) == b"{"):
            raise ModelSpecError(f"weights {path.name}: not a safetensors or weights-only torch checkpoint "
                                 "(its first bytes are neither)")
        fh.seek(8)
        try:
            header = json.loads(fh.read(header_len)) if 0 < header_len < size else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ModelSpecError(f"weights {path.name}: not a readable safetensors file (unreadable header)")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    if 8 + header_len + max(ends, default=0) != size:
        raise ModelSpecError(f"weights {path.name}: not a readable safetensors file (its header describes "
                             f"{8 + header_len + max(ends, default=0)} bytes, the file has {size}: truncated?)")


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 8:
        return False
    header_len = int.from_bytes(head, "little")
    return 0 < header_len < path.stat().st_size and header_len < 100_000_000 and path.suffix not in (".pt", ".pth", ".bin")


def load_weights_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strictly load ``state`` into ``module``: a missing or unexpected key or a wrong shape is an error."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists every one, the first says enough
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ModelSpecError(f"{where}: weights do not fit this architecture: "
                             f"{lines[0][:300] if lines else first_line(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        detail = []
        if result.missing_keys:
            detail.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            detail.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise ModelSpecError(f"{where}: weights do not fit this architecture: {', '.join(detail)}")


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with contiguous CPU tensors, each storage once (safetensors refuses shared tensors)."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, tensor in module.state_dict().items():
        if tensor is None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.device.type != "meta" else (key,)
        if ident in seen and tensor.numel() > 0:
            continue
        seen[ident] = key
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


def save_parts(model: Model, out: Path) -> dict[str, str]:
    """One ``<part>.safetensors`` per part, keys as in the root module's state dict; keys of no part -> shared."""
    from safetensors.torch import save_file

    groups: dict[str, dict] = {}
    for key, tensor in unique_state_dict(model.module).items():
        part = model.part_of(key) or "shared"
        groups.setdefault(part, {})[key] = tensor
    files = {}
    for part, tensors in sorted(groups.items()):
        name = f"{part}.safetensors"
        # one metadata key only: safetensors writes its metadata map in hash order, so two keys can swap between
        # runs and the same weights would give different bytes (the manifest says which part a file holds)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        files[part] = name
    return files
