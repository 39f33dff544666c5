"""Weight files: reading a state dict without unpickling, strict loading, writing one safetensors file per part."""
from __future__ import annotations

from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

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
        pickled = _pickled_class(str(exc))
        if pickled:
            raise ModelSpecError(
                f"weights {path.name}: holds a whole pickled model ({pickled}), which mmopt does not unpickle",
                hint="save its state dict instead: torch.save(model.state_dict(), PATH), or "
                     "safetensors.torch.save_file(model.state_dict(), PATH)") from None
        raise ModelSpecError(f"weights {path.name}: not a safetensors or weights-only torch checkpoint "
                             f"({first_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"weights {path.name}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def weight_shapes(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as meta tensors (names, dtypes, shapes; no data): for a safetensors file read
    from its header alone, for a torch checkpoint by loading it."""
    import torch

    path = local_path(path, "weights")
    if not is_safetensors_file(path):
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in read_state_dict(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as reader:
            out = {}
            for key in reader.keys():
                piece = reader.get_slice(key)
                out[key] = torch.empty(piece.get_shape(), dtype=_torch_dtype(piece.get_dtype()), device="meta")
            return out
    except ModelSpecError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ModelSpecError(f"weights {path.name}: not a readable safetensors file ({first_line(exc)})") from None


@contextmanager
def uninitialised(skip: bool = True) -> Iterator[None]:
    """Build modules without running ``torch.nn.init`` on their parameters, for a model whose every parameter
    is loaded right after (``load_weights_*`` are strict). Random init costs time, and it writes every page of
    the weights: untouched, a large tensor's pages are not resident, so a layer that a later step replaces
    (a quantized one on reload) never occupies memory in float32. Buffers are computed, not initialised: kept."""
    import torch

    if not skip:
        yield
        return
    init = torch.nn.init
    names = [n for n in vars(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}

    def leave_as_is(tensor, *args, **kwargs):
        return tensor

    try:
        for name in names:
            setattr(init, name, leave_as_is)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def load_weights_file(module: nn.Module, path: str | Path, where: str) -> None:
    """Strictly load the weights file ``path`` into ``module``. A safetensors file is copied in tensor by tensor,
    so loading holds the model plus one tensor, not the model twice."""
    import torch

    path = local_path(path, "weights")
    if not is_safetensors_file(path):
        load_weights_into(module, read_state_dict(path), where)
        return
    from safetensors import safe_open

    shapes = weight_shapes(path)
    targets = module.state_dict(keep_vars=True)
    check_fit({k: tuple(v.shape) for k, v in shapes.items()},
               {k: tuple(v.shape) for k, v in targets.items() if v is not None}, where)
    with torch.no_grad():
        for key, target in targets.items():
            if target is None:
                continue
            # Opened per tensor: safetensors memory-maps the file, and pages a read touched stay resident while
            # the map is open.
            with safe_open(str(path), framework="pt") as reader:
                target.copy_(reader.get_tensor(key))


def check_fit(found: dict[str, tuple], expected: dict[str, tuple], where: str) -> None:
    """One line when the file's tensors are not the architecture's: missing, unexpected, or of another shape."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong and not detail:
        detail.append(f"size mismatch for {wrong[0]}: copying a param with shape {list(found[wrong[0]])} from "
                      f"checkpoint, the shape in current model is {list(expected[wrong[0]])}")
    if detail:
        raise ModelSpecError(f"{where}: weights do not fit this architecture: {', '.join(detail)}")


def is_safetensors_file(path: Path) -> bool:
    if path.is_dir():
        raise ModelSpecError(f"weights must be a file, got a folder: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    return path.suffix == ".safetensors" or _looks_like_safetensors(path, head)


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    by_name = {spec[0]: dtype for dtype, spec in SAFETENSORS_DTYPES.items()}
    return getattr(torch, by_name[name])


def _pickled_class(message: str) -> str | None:
    """The class a weights-only load refused (``Unsupported global: GLOBAL torchvision.models.resnet.ResNet``)."""
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    return found.group(1) if found else None


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
        if tensor.device.type == "meta":        # a model built without memory: streamed from its source
            out[key] = tensor.detach()
        else:
            out[key] = tensor.detach().to("cpu") if is_wrapper(tensor) else tensor.detach().to("cpu").contiguous()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """One safetensors file; torchao tensors are flattened into their inner tensors (``<module>._weight_qdata``,
    ``._weight_scale``) with torchao's metadata, which transformers and ``mmopt.load`` rebuild them from.

    Written one tensor at a time (safetensors' own writer first copies every tensor into a bytes object: the
    model twice in memory), with the metadata keys sorted (safetensors writes its metadata map in hash order, so
    the same weights would otherwise give different bytes from run to run)."""
    metadata = {"format": "pt"}
    if any(is_wrapper(t) for t in tensors.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, extra = flatten_tensor_state_dict(tensors)
        metadata.update(extra)
    write_streamed(Path(file), {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, tensors.__getitem__,
                   metadata=dict(sorted(metadata.items())))


def save_parts(model: Model, out: Path) -> dict[str, str]:
    """One ``<part>.safetensors`` per part, keys as in the root module's state dict; keys of no part -> shared."""
    groups: dict[str, dict] = {}
    for key, tensor in unique_state_dict(model.module).items():
        part = model.part_of(key) or "shared"
        groups.setdefault(part, {})[key] = tensor
    files = {}
    source = model.info.get("_stream_from")      # a model built on the meta device: its weights are in this file
    for part, tensors in sorted(groups.items()):
        name = f"{part}.safetensors"
        if any(t.device.type == "meta" for t in tensors.values()):
            if source is None:
                raise RuntimeError("a model on the meta device has no source to stream its weights from")
            stream_part(out / name, tensors, source, model.info.get("_stream_made"))
        else:
            write_safetensors(tensors, out / name)
        files[part] = name
    return files


def stream_part(path: Path, tensors: dict[str, torch.Tensor], source: Path, made: Callable | None = None) -> None:
    """Write ``tensors`` (meta tensors: dtypes and shapes) with their values read one by one from the safetensors
    file ``source``, converted to each tensor's dtype: a cast and strip of a model larger than memory. ``made``
    (``passes.quantize_streamed.UnitValues``) makes the tensors a quantize pass rewrote, unit by unit; torchao
    tensors are written flattened, as ``write_safetensors`` writes them."""
    from safetensors import safe_open

    metadata = {"format": "pt"}
    if any(is_wrapper(t) for t in tensors.values()):
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        tensors, extra = flatten_tensor_state_dict(tensors)
        metadata = dict(sorted({**metadata, **extra}.items()))
    copied = [key for key in tensors if made is None or made.unit_of(key) is None]
    with safe_open(str(source), framework="pt") as reader:
        missing = [key for key in copied if key not in reader.keys()]
    if missing:
        raise ModelSpecError(f"weights {source.name}: no tensor {missing[0]} (and {len(missing) - 1} more): "
                             "streaming needs a state dict saved from this architecture")

    def fetch(key: str) -> torch.Tensor:
        if made is not None and made.unit_of(key) is not None:
            return made(key)
        # Opened per tensor: safetensors memory-maps the file, and the pages a read touches stay resident for as
        # long as the map is open (a 1.7 GB cast held 0.9 GB more with one reader kept open).
        with safe_open(str(source), framework="pt") as reader:
            return reader.get_tensor(key).to(tensors[key].dtype)

    write_streamed(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, fetch, metadata=metadata)


# --- writing tensor by tensor -------------------------------------------------------------------------------------
# safetensors can only write a dict of tensors that are all in memory. A model larger than memory is written here
# one tensor at a time, in exactly safetensors' layout, so that safetensors (and anything else) reads it as its own.

SAFETENSORS_DTYPES = {  # torch dtype name -> (safetensors name, rank in safetensors' Dtype enum: it sorts by it)
    "bool": ("BOOL", 0), "uint8": ("U8", 1), "int8": ("I8", 2), "float8_e5m2": ("F8_E5M2", 3),
    "float8_e4m3fn": ("F8_E4M3", 4), "int16": ("I16", 5), "uint16": ("U16", 6), "float16": ("F16", 7),
    "bfloat16": ("BF16", 8), "int32": ("I32", 9), "uint32": ("U32", 10), "float32": ("F32", 11),
    "float64": ("F64", 12), "int64": ("I64", 13), "uint64": ("U64", 14),
}


def safetensors_layout(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, list[str], int]:
    """(header bytes, names in data order, data bytes) of a safetensors file holding tensors of these dtypes and
    shapes, laid out as safetensors lays them out: larger dtypes first, then by name; header padded to 8 bytes."""
    import json
    import math

    def spec(dtype: torch.dtype) -> tuple[str, int]:
        return SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")]

    order = sorted(entries, key=lambda name: (-spec(entries[name][0])[1], name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        size = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": spec(dtype)[0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8), order, offset


def safetensors_size(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                     metadata: dict[str, str] | None = None) -> int:
    """Bytes of the safetensors file these tensors make, computed from dtypes and shapes alone."""
    header, _, data = safetensors_layout(entries, metadata)
    return 8 + len(header) + data


def write_streamed(path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   fetch: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors come one at a time from ``fetch(name)``: memory holds one tensor."""
    header, order, _ = safetensors_layout(entries, metadata)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        for name in order:
            dtype, shape = entries[name]
            tensor = fetch(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ModelSpecError(f"{name}: the source has {tuple(tensor.shape)} {tensor.dtype}, the model "
                                     f"{tuple(shape)} {dtype}")
            fh.write(_raw_bytes(tensor))
            del tensor


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (little-endian on every platform torch runs on)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
