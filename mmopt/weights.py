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


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 8:
        return False
    header_len = int.from_bytes(head, "little")
    return 0 < header_len < path.stat().st_size and header_len < 100_000_000 and path.suffix not in (".pt", ".pth", ".bin")


def load_weights_into(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strictly load ``state`` into ``module``: a missing or unexpected key or a wrong shape is an error.

    Tensor subclasses (torchao's ``Int8Tensor``) are put in place as they are: they cannot be copied into the
    float parameter a freshly built module holds."""
    subclass = {k: v for k, v in state.items() if is_wrapper(v)}
    plain = {k: v for k, v in state.items() if k not in subclass}
    try:
        if subclass:
            module.load_state_dict(subclass, strict=False, assign=True)
        result = module.load_state_dict(plain, strict=False)
    except RuntimeError as exc:  # shape mismatches: torch lists every one, the first says enough
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise ModelSpecError(f"{where}: weights do not fit this architecture: "
                             f"{lines[0][:300] if lines else first_line(exc)}") from None
    missing = [k for k in result.missing_keys if k not in subclass]
    if missing or result.unexpected_keys:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            detail.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise ModelSpecError(f"{where}: weights do not fit this architecture: {', '.join(detail)}")


def is_wrapper(tensor: object) -> bool:
    """A traceable tensor subclass that holds its data in inner tensors (torchao's quantized tensors)."""
    import torch

    return isinstance(tensor, torch.Tensor) and type(tensor) not in (torch.Tensor, torch.nn.Parameter) \
        and hasattr(tensor, "__tensor_flatten__") and not isinstance(tensor, torch._subclasses.FakeTensor)


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with contiguous CPU tensors, each storage once (safetensors refuses shared tensors)."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, tensor in module.state_dict().items():
        if tensor is None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.device.type != "meta" and not is_wrapper(tensor) else (key, id(tensor))
        if ident in seen and tensor.numel() > 0:
            continue
        seen[ident] = key
        out[key] = tensor.detach().to("cpu") if is_wrapper(tensor) else tensor.detach().to("cpu").contiguous()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """One safetensors file; torchao tensors are flattened into their inner tensors (``<module>._weight_qdata``,
    ``._weight_scale``) with torchao's metadata, which transformers and ``mmopt.load`` rebuild them from.

    The header is rewritten with the metadata keys sorted: safetensors writes its metadata map in hash order,
    so the same weights would otherwise give different bytes from run to run."""
    import json

    from safetensors.torch import save

    metadata = {"format": "pt"}
    if any(is_wrapper(t) for t in tensors.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, extra = flatten_tensor_state_dict(tensors)
        metadata.update(extra)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = {"__metadata__": header.pop("__metadata__"), **dict(sorted(header.items()))}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    if len(text) > size:       # cannot happen (same content, compact separators); keep safetensors' own bytes
        Path(file).write_bytes(data)
        return
    Path(file).write_bytes(data[:8] + text + b" " * (size - len(text)) + data[8 + size:])


def save_parts(model: Model, out: Path) -> dict[str, str]:
    """One ``<part>.safetensors`` per part, keys as in the root module's state dict; keys of no part -> shared."""
    groups: dict[str, dict] = {}
    for key, tensor in unique_state_dict(model.module).items():
        part = model.part_of(key) or "shared"
        groups.setdefault(part, {})[key] = tensor
    files = {}
    for part, tensors in sorted(groups.items()):
        name = f"{part}.safetensors"
        write_safetensors(tensors, out / name)
        files[part] = name
    return files
