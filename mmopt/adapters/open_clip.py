"""open_clip models by architecture name (ViT-B-32, RN50, ...) with optional local weights.

The text tower of open_clip's ``CLIP`` is not one submodule: token embedding, positional embedding,
transformer, final norm and projection hang off the root, so parts are named by state-dict prefixes.
"""
from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, ClassVar

from mmopt.adapters.base import (Shapes, checkpoint_blocks, load_weights_into, part_device, part_dtype, random_images, random_tokens,
                                 read_state_dict, save_parts)
from mmopt.errors import ModelSpecError, UnsupportedError
from mmopt.model import Model

CLIP_TEXT = ["token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "attn_mask"]


def _open_clip():
    logging.getLogger("root").setLevel(logging.ERROR)  # open_clip logs "initialized randomly" at WARNING
    import open_clip

    return open_clip


class Adapter:
    source: ClassVar[str] = "open_clip"

    def load(self, spec: Any) -> Model:
        open_clip = _open_clip()
        name = spec.name
        config = open_clip.get_model_config(name)
        if config is None:
            close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
            raise ModelSpecError(f"unknown open_clip architecture {name!r}",
                                 hint=f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()")
        config = copy.deepcopy(config)
        config.pop("custom_text", None)
        model = self._create(name, config)
        if spec.weights:
            load_weights_into(model.module, read_state_dict(Path(spec.weights)), f"weights {Path(spec.weights).name}")
        model.random_weights = not spec.weights
        return model

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        model = self._create(arch["name"], copy.deepcopy(arch["config"]), custom_text=arch.get("custom_text"))
        model.preprocess = dict(preprocess)
        return model

    def _create(self, name: str, config: dict, custom_text: bool | None = None) -> Model:
        open_clip = _open_clip()
        base = open_clip.get_model_config(name) or {}
        force_custom = bool(custom_text) if custom_text is not None else bool(base.get("custom_text"))
        # Config overrides as kwargs rebuild changed architectures (pruned widths, fewer layers) by name.
        module = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_image=False,
                                        pretrained_text=False, force_custom_text=force_custom, **config)
        custom = hasattr(module, "text") and not hasattr(module, "transformer")
        prefixes = {"visual": ["visual."], "text": ["text."] if custom else list(CLIP_TEXT)}
        pp = getattr(module.visual, "preprocess_cfg", {}) or {}
        size = module.visual.image_size
        preprocess = {"image_size": size[0] if isinstance(size, (tuple, list)) else size,
                      "mean": list(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                      "std": list(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
                      "interpolation": pp.get("interpolation", "bicubic"),
                      "context_length": getattr(module, "context_length", 77)}
        arch = {"name": name, "config": config, "custom_text": custom}
        return Model(module=module.eval(), source=self.source, arch=arch, parts=["visual", "text"],
                     preprocess=preprocess, info={"part_prefixes": prefixes})

    def example_inputs(self, model: Model, part: str, shapes: Shapes) -> tuple:
        model.check_part(part)
        device = part_device(model, part)
        if part == "visual":
            size = shapes.image_size or model.preprocess["image_size"]
            return (random_images(shapes.batch_size, size, part_dtype(model, part), shapes.seed).to(device),)
        # open_clip's text towers add a positional embedding of fixed length: the context length is the shape.
        context = model.preprocess.get("context_length", 77)
        vocab = getattr(model.module, "vocab_size", None) or model.arch["config"]["text_cfg"].get("vocab_size", 49408)
        return (random_tokens(shapes.batch_size, context, vocab, seed=shapes.seed).to(device),)

    def tokenize(self, model: Model, texts: list[str], seq_len: int) -> tuple:
        open_clip = _open_clip()
        try:
            tokenizer = open_clip.get_tokenizer(model.arch["name"])
        except Exception as exc:  # an hf-hub tokenizer cannot be fetched offline
            raise UnsupportedError(f"open_clip tokenizer for {model.arch['name']} is not available offline "
                                   f"({str(exc).splitlines()[0][:120]})") from None
        return (tokenizer(texts).to(part_device(model, "text")),)

    def run(self, model: Model, part: str, inputs: tuple) -> Any:
        if part == "visual":
            return model.module.encode_image(inputs[0].to(part_dtype(model, part)))
        return model.module.encode_text(inputs[0])

    def drop_part(self, model: Model, part: str) -> None:
        model.check_part(part)
        for prefix in model.part_prefixes(part):
            setattr(model.module, prefix.rstrip("."), None)
        model.parts.remove(part)

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        return []  # CLIP towers end in their embedding projection: nothing is unused

    def save(self, model: Model, out: Path) -> dict[str, str]:
        return save_parts(model, out)

    def enable_grad_checkpointing(self, model: Model, part: str) -> str:
        model.check_part(part)
        model.module.set_grad_checkpointing(True)
        tower = model.module.visual if part == "visual" else getattr(model.module, "text", model.module)
        # open_clip's ModifiedResNet (RN50, ...) ignores the switch: checkpoint its stages' blocks instead.
        if part == "visual" and type(tower).__name__ == "ModifiedResNet":
            return f"torch.utils.checkpoint over {checkpoint_blocks(tower)} ResNet blocks"
        return "open_clip set_grad_checkpointing"

    def at_image_size(self, model: Model, size: int) -> Model:
        arch = copy.deepcopy(model.arch)
        base = _open_clip().get_model_config(arch["name"]) or {}
        vision = dict(base.get("vision_cfg", {}), **arch["config"].get("vision_cfg", {}))
        vision["image_size"] = size
        arch["config"]["vision_cfg"] = vision
        rebuilt = self._create(arch["name"], arch["config"], custom_text=arch.get("custom_text"))
        rebuilt.module.to(part_dtype(model, "visual"))
        rebuilt.random_weights = True
        return rebuilt
