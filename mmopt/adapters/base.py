"""The adapter protocol every model family implements, and helpers they share."""
from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mmopt.errors import ModelSpecError
from mmopt.model import Model

IMAGE_PARTS = ("visual",)
TEXT_PARTS = ("text",)


@dataclass(frozen=True)
class Shapes:
    """Input shapes for example inputs: batch, image side, token sequence length."""

    batch_size: int = 1
    image_size: int | None = None
    seq_len: int = 128
    seed: int = 0


class Adapter(Protocol):
    source: ClassVar[str]

    def load(self, spec: Any) -> Model:
        """Load the model a (path-resolved) ModelSpec names, from local files only."""

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        """A randomly initialised model of architecture ``arch`` (weights are loaded into it afterwards)."""

    def example_inputs(self, model: Model, part: str, shapes: Shapes) -> tuple:
        """Synthetic inputs for ``part``: random images of ``image_size`` or random token ids of ``seq_len``."""

    def tokenize(self, model: Model, texts: list[str], seq_len: int) -> tuple:
        """Real inputs for the text part from ``texts``."""

    def run(self, model: Model, part: str, inputs: tuple) -> Any:
        """Run ``part`` to its output embedding / features, shape (batch, dim)."""

    def drop_part(self, model: Model, part: str) -> None:
        """Remove ``part``'s modules and weights from the model."""

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        """Remove output heads the part embeddings do not use; return their names."""

    def save(self, model: Model, out: Path) -> dict[str, str]:
        """Write weights (and assets) into ``out``; return part -> file name."""

    def quantization_layout(self, model: Model) -> dict:
        """What the quantize pass needs to know about this family (see ``passes/quantize.py``):
        ``structural`` (may modules be swapped for equivalent Linear-based ones), ``bare_weights``
        (parameter name -> "projection" for an (in, out) matrix used as ``x @ P``, or "table" for an embedding
        table read as a tensor) and ``keep`` (module name -> why its Linear weights must stay as they are)."""

    def prune_layout(self, model: Model, part: str) -> "PruneLayout":
        """What structured pruning may touch in ``part``: FFN pairs, attention modules, ignored modules."""

    def write_pruned_config(self, model: Model, part: str, target: str) -> str | None:
        """Write pruned sizes into ``model.arch``; return why the result is not a stock config, or None."""

    def layer_count(self, model: Model, part: str) -> int:
        """Number of transformer layers of ``part`` (for layer_drop)."""

    def keep_layers(self, model: Model, part: str, keep: list[int]) -> None:
        """Keep only layers ``keep`` of ``part`` and rewrite the architecture config to match."""

    def set_image_size(self, model: Model, part: str, size: int) -> None:
        """Run image ``part`` at ``size`` px (positional embeddings interpolated, config and preprocess updated)."""

    def swap_part(self, model: Model, part: str, module: Any) -> None:
        """Replace ``part`` by ``module`` (inputs -> embedding of the original width)."""

    def enable_grad_checkpointing(self, model: Model, part: str) -> str:
        """Turn on the family's own gradient checkpointing for ``part``; return a few words saying how.
        Raise UnsupportedError where the family has none."""

    def at_image_size(self, model: Model, size: int) -> Model:
        """A model that takes ``size``-pixel images: the same one when it accepts any size, else a random-weight
        rebuild of the architecture at that size (for memory estimates only)."""

    # Optional: families without them leave them out, and the passes that use them say so
    # (``prune: heads``, token-level distillation).

    def attention_weights(self, model: Model, name: str) -> dict:
        """Per-head projections of attention module ``name``: q/k/v (weight, bias) with rows head after head,
        and the output weight (for head importance)."""

    def slice_heads(self, model: Model, name: str, keep: list[int]) -> None:
        """Keep only heads ``keep`` of attention module ``name``."""

    def can_run_hidden(self, model: Model, part: str) -> bool:
        """Whether ``run_hidden`` works for ``part`` (``mmopt.distill.tokens_supported`` checks for both)."""

    def run_hidden(self, model: Model, part: str, inputs: tuple) -> tuple:
        """Every token's last hidden state of ``part`` and the token mask."""


# --- paths -----------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/"))


def local_path(value: str | Path, what: str) -> Path:
    """Resolve ``pkg://package/sub`` and plain paths to an existing local path, or raise one clear line."""
    text = str(value)
    if text.startswith("pkg://"):
        package, _, sub = text[len("pkg://"):].partition("/")
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


# --- weights ---------------------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict:
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
            raise ModelSpecError(f"weights {path.name}: not a readable safetensors file ({_short(exc)})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated, pickled-object or text files
        raise ModelSpecError(f"weights {path.name}: not a safetensors or weights-only torch checkpoint "
                             f"({_short(exc)})") from None
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


def load_weights_into(module: Any, state: dict, where: str) -> None:
    """Strictly load ``state`` into ``module``: a missing or unexpected key or a wrong shape is an error."""
    result_error = None
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        result_error = _short(exc)
        result = None
    if result_error:
        raise ModelSpecError(f"{where}: weights do not fit this architecture: {result_error}")
    if result.missing_keys or result.unexpected_keys:
        detail = []
        if result.missing_keys:
            detail.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            detail.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise ModelSpecError(f"{where}: weights do not fit this architecture: {', '.join(detail)}")


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if "size mismatch" in str(exc):
        text = next(line for line in lines if "size mismatch" in line)
    return text[:300]


# --- inputs ----------------------------------------------------------------------------------------------

def random_images(batch: int, size: int, dtype: Any = None, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen, dtype=dtype or torch.float32)


def random_tokens(batch: int, seq_len: int, vocab: int, low: int = 0, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, seq_len), generator=gen)


def part_dtype(model: Model, part: str):
    """The floating dtype a part computes in (that of its first floating parameter)."""
    import torch

    for _, tensor in model.named_tensors(part, buffers=False):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def part_device(model: Model, part: str):
    import torch

    for _, tensor in model.named_tensors(part):
        return tensor.device
    return torch.device("cpu")


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


def unique_state_dict(module: Any) -> dict:
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


# --- structure facts for structured pruning -----------------------------------------------------------------

@dataclass
class PruneLayout:
    """What the prune pass needs to know about one part; module names are relative to the root module.

    ``ffn``: (expanding linear, contracting linear) of each transformer FFN; ``attention``: the attention modules
    ``slice_heads`` understands, with their head counts; ``ignore``: modules never pruned (classifiers, output
    projections, embeddings); ``width_round``: hidden widths must stay a multiple of this (the head count);
    ``unwrapped``: bare parameters on the hidden width and the dimension that is the width (Torch-Pruning's guess
    can pick the wrong one).
    """

    targets: tuple = ()
    ffn: list = field(default_factory=list)
    attention: dict = field(default_factory=dict)
    ignore: list = field(default_factory=list)
    width_round: int = 1
    unwrapped: dict = field(default_factory=dict)


def slice_linear(linear: Any, out_idx: Any = None, in_idx: Any = None) -> None:
    """Keep rows ``out_idx`` and columns ``in_idx`` of an ``nn.Linear`` in place (features updated)."""
    import torch

    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if out_idx is not None:
        weight, bias = weight[out_idx], (bias[out_idx] if bias is not None else None)
        linear.out_features = len(out_idx)
    if in_idx is not None:
        weight = weight[:, in_idx]
        linear.in_features = len(in_idx)
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)


def head_rows(keep: list[int], head_dim: int) -> list[int]:
    """Row (or column) indices of heads ``keep`` in a projection laid out head after head."""
    return [h * head_dim + i for h in keep for i in range(head_dim)]

# --- training and what-if helpers shared by adapters -----------------------------------------------------

def checkpoint_blocks(root: Any) -> int:
    """Gradient checkpointing for models without their own switch (torchvision, open_clip's ResNets): every
    item of the outermost ``nn.Sequential`` containers of blocks (ResNet stages, MobileNet's features)
    recomputes its activations in backward (torch.utils.checkpoint, non-reentrant). The weights and state-dict
    keys do not change: only the instances' ``forward`` is wrapped. Returns how many blocks were wrapped."""
    import functools

    import torch
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    def wrap(block: Any) -> None:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if block.training and torch.is_grad_enabled():
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        block.forward = forward

    count = 0

    def visit(module: Any) -> None:
        nonlocal count
        for child in module.children():
            # a Sequential of blocks (items with submodules), not of plain layers like a downsample pair
            if isinstance(child, nn.Sequential) and any(next(item.children(), None) is not None for item in child):
                for block in child:
                    if next(block.parameters(), None) is not None:
                        wrap(block)
                        count += 1
            else:
                visit(child)

    visit(root)
    return count

# --- structure helpers shared by the adapters (layer drop, resolution, part swap) ------------------------

def check_patch_multiple(size: int, patch: int) -> None:
    """A ViT's input side must be a whole number of patches; say which sizes work."""
    from mmopt.errors import UserError

    if size % patch == 0 and size >= patch:
        return
    below = max(patch, size // patch * patch)
    near = sorted({below, below + patch})
    raise UserError(f"image_size {size} is not a multiple of the patch size {patch}; sizes that work: "
                    f"multiples of {patch}, e.g. {', '.join(str(s) for s in near)}")


def uncheckpoint_blocks(root: Any) -> None:
    """Undo ``checkpoint_blocks`` on ``root``: drop the instance-level ``forward`` wrappers. A deep copy of a
    wrapped model shares the wrapper functions, which would still run the original's blocks."""
    for module in root.modules():
        module.__dict__.pop("forward", None)


def interpolate_positions(pos: Any, grid: int, new_grid: int) -> Any:
    """Resize a ViT positional embedding (tokens, dim) from a ``grid``² to a ``new_grid``² patch grid.

    Tokens before the grid (the class token) are kept as they are; the grid is resampled bicubically.
    """
    import torch

    prefix = pos.shape[0] - grid * grid
    if prefix < 0:
        raise ValueError(f"positional embedding of {pos.shape[0]} tokens has no {grid}x{grid} grid")
    head, body = pos[:prefix], pos[prefix:]
    dim = body.shape[-1]
    body = body.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    body = torch.nn.functional.interpolate(body, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(pos.dtype)
    return torch.cat([head, body], dim=0)


def keep_in_list(layers: Any, keep: list[int]) -> Any:
    """A new ModuleList of ``layers[i] for i in keep``; per-layer indices (used by caches) renumbered."""
    import torch.nn as nn

    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_index
    return kept


def install_swapped(model: Model, part: str, module: Any, attrs: list[str], root_is_part: bool) -> None:
    """Put ``module`` (which maps the part's inputs to its embedding) in place of ``part``.

    ``attrs``: the root attributes that made up the part (set to None); with ``root_is_part`` the root module
    itself was the part and is replaced by a container. Either way the new part lives at root attribute
    ``part`` and ``model.info["swapped"]`` tells the adapter's ``run`` to call it.
    """
    import torch.nn as nn

    if root_is_part:
        container = nn.Module()
        config = getattr(model.module, "config", None)
        if config is not None:
            container.config = config           # tokenizer and example inputs still read the vocabulary
        setattr(container, part, module)
        model.module = container
    else:
        for attr in attrs:
            setattr(model.module, attr, None)
        setattr(model.module, part, module)
    model.info["part_prefixes"][part] = [f"{part}."]
    model.info.setdefault("swapped", {})[part] = part


def run_swapped(model: Model, part: str, inputs: tuple) -> Any:
    """The output of a swapped part, or None when ``part`` is not swapped."""
    attr = model.info.get("swapped", {}).get(part)
    if attr is None:
        return None
    return getattr(model.module, attr)(*inputs)
