"""The adapter protocol every model family implements: all family knowledge lives behind it.

No pass branches on the model family; when a pass needs family knowledge, it asks its adapter through one of
these methods. Helpers the three adapters share live in ``structure.py`` (module surgery) and ``inputs.py``
(synthetic inputs); paths and weight files in ``mmopt/paths.py`` and ``mmopt/weights.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.core import Model, ModelSpec, PruneLayout, QuantLayout, Shapes


class Adapter(Protocol):
    source: ClassVar[str]           # "hf" | "open_clip" | "torchvision"

    # --- loading and saving --------------------------------------------------------------------------------

    def parse_spec(self, text: str, weights: str | None) -> ModelSpec:
        """The ModelSpec for REST of a command-line ``SOURCE:REST`` (``hf:PATH``, ``open_clip:ARCH``, ...)."""

    def parts_without_weights(self, spec: ModelSpec) -> list[str] | None:
        """The parts the (path-resolved) ``spec``'s model has, from small files only (no weights read, no torch),
        for ``validate``; raise ModelSpecError for what is wrong already (a missing folder, a file that is not
        weights, an unknown architecture). None when the parts cannot be told without loading."""

    def load(self, spec: ModelSpec) -> Model:
        """Load the model a (path-resolved) ModelSpec names, from local files only."""

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        """A randomly initialised model of architecture ``arch`` (weights are loaded into it afterwards)."""

    def load_empty(self, spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> Model:
        """The model ``spec`` names with meta tensors (dtypes and shapes, no memory), for a cast or strip that
        streams its weights file tensor by tensor; ``shapes`` are the file's, for architectures that read sizes
        from the weights. Raises UnsupportedError for families that cannot stream."""

    def save(self, model: Model, out: Path) -> dict[str, str]:
        """Write weights (and assets) into ``out``; return part -> file name."""

    # --- inputs and running --------------------------------------------------------------------------------

    def example_inputs(self, model: Model, part: str, shapes: Shapes) -> tuple:
        """Synthetic inputs for ``part``: random images of ``image_size`` or random token ids of ``seq_len``."""

    def tokenize(self, model: Model, texts: list[str], seq_len: int) -> tuple:
        """Real inputs for the text part from ``texts``; UnsupportedError when the model has no tokenizer."""

    def vocabulary(self, model: Model) -> list[str]:
        """The tokenizer's whole words, frequent first where the vocabulary is so ordered (text augmentation
        draws from them); empty where there is none."""
        return []

    def run(self, model: Model, part: str, inputs: tuple) -> torch.Tensor:
        """Run ``part`` to its output embedding / features, shape (batch, dim)."""

    def can_run_hidden(self, model: Model, part: str) -> bool:
        """Whether ``run_hidden`` works for ``part`` (token-level distillation)."""

    def run_hidden(self, model: Model, part: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's last hidden state of ``part`` and the token mask."""

    # --- structure -----------------------------------------------------------------------------------------

    def drop_part(self, model: Model, part: str) -> None:
        """Remove ``part``'s modules and weights from the model."""

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        """Remove output heads the part embeddings do not use; return their names."""

    def quantization_layout(self, model: Model) -> QuantLayout:
        """What the quantize pass may swap, which bare weights it must know about, what it must keep."""

    def prune_layout(self, model: Model, part: str) -> PruneLayout:
        """What structured pruning may touch in ``part``: FFN pairs, attention modules, ignored modules."""

    def write_pruned_config(self, model: Model, part: str, target: str) -> str | None:
        """Write pruned sizes into ``model.arch``; return why the result is not a stock config, or None."""

    def attention_weights(self, model: Model, name: str) -> dict:
        """Per-head projections of attention module ``name``: q/k/v (weight, bias) with rows head after head,
        and the output weight (for head importance)."""

    def slice_heads(self, model: Model, name: str, keep: list[int]) -> None:
        """Keep only heads ``keep`` of attention module ``name``."""

    def layer_count(self, model: Model, part: str) -> int:
        """Number of transformer layers of ``part`` (for layer_drop)."""

    def keep_layers(self, model: Model, part: str, keep: list[int]) -> None:
        """Keep only layers ``keep`` of ``part`` and rewrite the architecture config to match."""

    def set_image_size(self, model: Model, part: str, size: int) -> None:
        """Run image ``part`` at ``size`` px (positional embeddings interpolated, config and preprocess updated)."""

    def swap_part(self, model: Model, part: str, module: nn.Module) -> None:
        """Replace ``part`` by ``module`` (inputs -> embedding of the original width)."""

    def shares_text_inputs(self, model: Model, other: Model) -> bool:
        """Whether ``other``'s text part takes ``model``'s text inputs as they are (the same token ids), so it
        can be swapped in for ``model``'s text part."""

    def adopt_student(self, model: Model, part: str, student: Model, projection: nn.Module | None) -> dict:
        """Make ``model`` the ``student`` model whole (its own inputs, tokenizer and files), with ``projection``
        after its output; return what ``mmopt.load`` needs (``substitute: {student: ...}``). UnsupportedError
        where the family cannot be written as its student."""

    # --- training and what-if ------------------------------------------------------------------------------

    def enable_grad_checkpointing(self, model: Model, part: str) -> str:
        """Turn on the family's own gradient checkpointing for ``part``; return a few words saying how.
        Raise UnsupportedError where the family has none."""

    def at_image_size(self, model: Model, size: int) -> Model:
        """A model that takes ``size``-pixel images: the same one when it accepts any size, else a random-weight
        rebuild of the architecture at that size (for memory estimates only)."""
