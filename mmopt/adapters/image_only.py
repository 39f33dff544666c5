"""What every family whose model is one image part (torchvision, timm classifiers and backbones) answers alike."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from mmopt.adapters.inputs import example_images
from mmopt.adapters.structure import run_swapped
from mmopt.core import Model, ModelSpec, Shapes
from mmopt.errors import UnsupportedError
from mmopt.weights import check_weights_file

if TYPE_CHECKING:
    import torch
    from torch import nn


class ImageOnlyAdapter:
    """Inputs, running and part handling of a model whose only part is ``visual``: images in, logits or pooled
    features out (or a swapped-in module's embedding)."""

    family: ClassVar[str]       # for messages: "torchvision", "timm"
    source: ClassVar[str]

    def parse_spec(self, text: str, weights: str | None) -> ModelSpec:
        """``SOURCE:NAME``, with an optional local checkpoint."""
        return ModelSpec(source=self.source, name=text, weights=weights)

    def parts_without_weights(self, spec: ModelSpec) -> list[str] | None:
        """The name is checked at load: listing the family's models needs torch."""
        if spec.weights:
            check_weights_file(spec.weights)
        return ["visual"]

    def example_inputs(self, model: Model, part: str, shapes: Shapes) -> tuple:
        model.check_part(part)
        return example_images(model, part, shapes)

    def tokenize(self, model: Model, texts: list[str], seq_len: int) -> tuple:
        raise UnsupportedError(f"{self.family} models have no text part")

    def run(self, model: Model, part: str, inputs: tuple) -> torch.Tensor:
        swapped = run_swapped(model, part, inputs)
        if swapped is not None:
            return swapped
        return model.module(inputs[0].to(model.part_dtype(part)))

    def can_run_hidden(self, model: Model, part: str) -> bool:
        return False

    def run_hidden(self, model: Model, part: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        raise UnsupportedError(f"{self.family} models have no token-level outputs")

    def drop_part(self, model: Model, part: str) -> None:
        model.check_part(part)
        raise UnsupportedError(f"cannot drop {part!r}: it is this model's only part")

    def adopt_student(self, model: Model, part: str, student: Model, projection: nn.Module | None) -> dict:
        raise UnsupportedError("substitute.student replaces a Hugging Face text encoder by another; image models "
                               "take substitute.swap")

    def shares_text_inputs(self, model: Model, other: Model) -> bool:
        return False      # no text part

    def write_pruned_config(self, model: Model, part: str, target: str) -> str | None:
        return (f"{self.family} builders take no per-layer widths: the pruned sizes are recorded in the manifest "
                "and re-applied by mmopt.load")

    def attention_weights(self, model: Model, name: str) -> dict:
        raise UnsupportedError(f"prune: heads of {self.family} models are not supported")

    def slice_heads(self, model: Model, name: str, keep: list[int]) -> None:
        raise UnsupportedError(f"prune: heads of {self.family} models are not supported")

    def layer_count(self, model: Model, part: str) -> int:
        raise UnsupportedError(f"layer_drop needs a transformer encoder; {self.family} models are not supported")

    def keep_layers(self, model: Model, part: str, keep: list[int]) -> None:
        self.layer_count(model, part)
