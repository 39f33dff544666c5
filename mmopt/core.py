"""The types everyone shares: the loaded Model, input Shapes, part kinds, the ModelSpec a recipe names, and the
layouts adapters hand to passes (PruneLayout, QuantLayout) and passes hand back (Quantization).

Only the standard library and pydantic at the top: ``import mmopt.recipe`` (and so ``mmopt validate``) must not
import torch. Module types appear in annotations only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmopt.errors import UnsupportedError

if TYPE_CHECKING:
    import torch
    from torch import nn

Source = Literal["hf", "open_clip", "torchvision", "timm"]


# --- parts ---------------------------------------------------------------------------------------------------

class PartKind(str, Enum):
    """What a part takes as input."""

    IMAGE = "image"
    TEXT = "text"


# Every family names its parts from this table, so a pass asks ``is_text_part(part)``, never ``part == "text"``.
PART_KINDS: dict[str, PartKind] = {"visual": PartKind.IMAGE, "text": PartKind.TEXT}


def part_kind(part: str) -> PartKind:
    """The kind of input ``part`` takes."""
    if part not in PART_KINDS:
        raise UnsupportedError(f"unknown part {part!r}; parts are {', '.join(PART_KINDS)}")
    return PART_KINDS[part]


def is_image_part(part: str) -> bool:
    return part_kind(part) is PartKind.IMAGE


def is_text_part(part: str) -> bool:
    return part_kind(part) is PartKind.TEXT


@dataclass(frozen=True)
class Shapes:
    """Input shapes for example inputs: batch, image side, token sequence length."""

    batch_size: int = 1
    image_size: int | None = None
    seq_len: int = 128
    seed: int = 0


# --- where a model comes from -----------------------------------------------------------------------------------

class ModelSpec(BaseModel):
    """Where the model comes from. Only local files: nothing is downloaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Source = Field(description="hf | open_clip | torchvision | timm")
    path: str | None = Field(None, description="hf: a local Hugging Face folder, or pkg://package/subfolder")
    name: str | None = Field(None, description="open_clip architecture (ViT-B-32), torchvision name (resnet50) or "
                                                "timm model name (convnext_tiny)")
    weights: str | None = Field(None, description="open_clip / torchvision / timm: a local checkpoint file")
    num_classes: int | None = Field(None, ge=0, description="torchvision / timm: outputs of the classifier head "
                                                              "(default: read from the weights' head)")
    kwargs: dict[str, Any] = Field({}, description="torchvision / timm: other keyword arguments of the model "
                                                   "builder (e.g. dropout, representation_size, drop_path_rate)")

    def __hash__(self) -> int:
        # frozen, but ``kwargs`` is a dict: hash the spec by its JSON form (specs key caches, e.g. preflight's)
        return hash(self.model_dump_json())

    @model_validator(mode="after")
    def _needs_what_source_needs(self) -> "ModelSpec":
        if self.source not in ("torchvision", "timm") and (self.num_classes is not None or self.kwargs):
            raise ValueError(f"num_classes and kwargs are for torchvision and timm models, not source {self.source}")
        if {"num_classes", "weights", "pretrained"} & set(self.kwargs):
            raise ValueError("kwargs: give num_classes as its own key, and weights as a local file in weights")
        if self.source == "hf":
            if not self.path:
                raise ValueError("source hf needs path: a local Hugging Face folder")
            if self.name or self.weights:
                raise ValueError("source hf takes path only (name and weights are for open_clip / torchvision / timm)")
        else:
            if not self.name:
                raise ValueError(f"source {self.source} needs name: the architecture")
            if self.path:
                raise ValueError(f"source {self.source} takes name and weights, not path")
        return self


# --- what passes and adapters tell each other ---------------------------------------------------------------------

@dataclass
class PruneLayout:
    """What the prune pass may touch in one part; module names are relative to the root module.

    ``targets``: the prune targets this part supports; ``ffn``: (expanding linear, contracting linear) of each
    transformer FFN; ``attention``: the attention modules ``slice_heads`` understands, with their head counts;
    ``ignore``: modules never pruned (classifiers, output projections, embeddings); ``width_round``: hidden
    widths must stay a multiple of this (the head count); ``unwrapped``: bare parameters on the hidden width and
    the dimension that is the width (Torch-Pruning's guess can pick the wrong one).
    """

    targets: tuple[str, ...] = ()
    ffn: list[tuple[str, str]] = field(default_factory=list)
    attention: dict[str, int] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    width_round: int = 1
    unwrapped: dict[str, int] = field(default_factory=dict)


def _no_module(module: nn.Module) -> bool:
    return False


@dataclass(frozen=True)
class QuantLayout:
    """What the quantize pass needs to know about a family.

    ``structural``: whether modules may be swapped for equivalent Linear-based ones (a Hugging Face folder must
    still rebuild in transformers, so there they may not); ``bare_weights``: parameter name -> "projection" for
    an (in, out) matrix used as ``x @ P``, or "table" for an embedding table read as a tensor; ``keep``: module
    name -> why its weights (Linear, convolution) must stay as they are; ``fused_attention``: a filter (torchao's
    ``filter_fn``) telling the family's own self-attention modules that hold a fused ``in_proj_weight`` and are
    called as ``(x, attn_mask) -> out``, batch first (``nn.MultiheadAttention`` is recognised without it).
    """

    structural: bool = False
    bare_weights: dict[str, Literal["projection", "table"]] = field(default_factory=dict)
    # why bitsandbytes methods leave embedding tables float here (None: they may be int8); a stock Hugging Face
    # folder is written in transformers' bitsandbytes format, which has no int8 tables
    float_tables: str | None = None
    keep: dict[str, str] = field(default_factory=dict)
    fused_attention: Callable[[nn.Module], bool] = _no_module


@dataclass
class Quantization:
    """What the quantize pass tells the adapter's ``save`` (a Hugging Face folder writes it as transformers'
    ``quantization_config``, so the folder loads quantized without mmopt); recorded in the manifest."""

    method: str                     # int8 (torchao) | int4 (mmopt's 4-bit groups + torchao) | llm_int8 | nf4 | fp4
    int8_threshold: float
    blocksize: int
    embeddings: str                 # int8 | int4 | keep
    compute_dtype: str              # the dtype the quantized layers compute in ("float32", "float16")
    float_linear: list[str] = field(default_factory=list)   # Linear modules left in float, by name
    int8_modules: list[str] = field(default_factory=list)   # int8: modules whose weight is a torchao Int8Tensor
    group_size: int = 64            # int4 Linear layers and tables: values per group

    @property
    def has_4bit_groups(self) -> bool:
        """mmopt's own 4-bit groups (Linear layers or tables) next to int8 rows: no stock loader reads the mix
        (transformers' compressed-tensors loader decodes one scheme per checkpoint)."""
        return self.method == "int4" or self.embeddings == "int4"

    def to_json(self) -> dict:
        return {"method": self.method, "int8_threshold": self.int8_threshold, "blocksize": self.blocksize,
                "embeddings": self.embeddings, "compute_dtype": self.compute_dtype,
                "float_linear": list(self.float_linear), "int8_modules": list(self.int8_modules),
                "group_size": self.group_size}


# --- the model ---------------------------------------------------------------------------------------------------

@dataclass
class Model:
    """A model of one family, its parts, and what is needed to rebuild and preprocess it.

    ``arch`` is the adapter's rebuild config (JSON-able): passes that change the structure update it, and
    ``mmopt.load`` rebuilds the module from it before the weights go in. ``info`` holds adapter-private facts
    (pooling, embedding kind, which state-dict prefixes make up each part); keys starting with ``_`` are caches
    (a tokenizer) that are neither saved nor copied.
    """

    module: nn.Module               # the family's root module
    source: Source
    arch: dict
    parts: list[str]
    preprocess: dict = field(default_factory=dict)
    random_weights: bool = False
    assets: Path | None = None      # a folder whose non-weight files travel with the checkpoint (tokenizer, ...)
    info: dict = field(default_factory=dict)
    quantization: Quantization | None = None   # set by the quantize pass

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

    def named_modules(self, part: str) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) of every module in ``part``; names are relative to the root module."""
        for name, module in self.module.named_modules():
            if name and self.owns(part, name):
                yield name, module

    def named_tensors(self, part: str, buffers: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
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

    def part_dtype(self, part: str) -> torch.dtype:
        """The floating dtype ``part`` computes in (that of its first floating parameter)."""
        import torch

        for _, tensor in self.named_tensors(part, buffers=False):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def part_device(self, part: str) -> torch.device:
        """The device ``part``'s tensors are on."""
        import torch

        for _, tensor in self.named_tensors(part):
            return tensor.device
        return torch.device("cpu")

    def saved_info(self) -> dict:
        """``info`` without its caches: what a manifest records."""
        return {k: v for k, v in self.info.items() if not k.startswith("_")}


def _under(key: str, prefix: str) -> bool:
    if prefix == "":
        return True
    if prefix.endswith("."):
        return key.startswith(prefix) or key == prefix[:-1]
    return key == prefix or key.startswith(prefix + ".")
