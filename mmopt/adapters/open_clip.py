"""open_clip models by architecture name (ViT-B-32, RN50, ...) with optional local weights.

The text tower of open_clip's ``CLIP`` is not one submodule: token embedding, positional embedding,
transformer, final norm and projection hang off the root, so parts are named by state-dict prefixes.
"""
from __future__ import annotations

import copy
import difflib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mmopt.adapters.inputs import example_images, random_tokens
from mmopt.adapters.structure import (check_patch_multiple, checkpoint_blocks, clear_attribute, head_rows,
                                      install_swapped, interpolate_positions, keep_in_list, run_swapped)
from mmopt.core import Model, ModelSpec, PruneLayout, QuantLayout, Shapes
from mmopt.errors import ModelSpecError, UnsupportedError, first_line
from mmopt.weights import check_weights_file, load_weights_file, save_parts, uninitialised

if TYPE_CHECKING:
    import torch
    from torch import nn

CLIP_TEXT = ["token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "attn_mask"]


def _open_clip() -> Any:
    logging.getLogger("root").setLevel(logging.ERROR)  # open_clip logs "initialized randomly" at WARNING
    import open_clip

    return open_clip


def _shipped_architectures() -> set[str] | None:
    """The architecture names open_clip ships (its model_configs/*.json), found without importing it (torch)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return {p.stem for p in folder.glob("*.json")} if folder.is_dir() else None


class OpenClipAdapter:
    source: ClassVar[str] = "open_clip"

    def parse_spec(self, text: str, weights: str | None) -> ModelSpec:
        """``open_clip:ARCH``, with an optional local checkpoint."""
        return ModelSpec(source="open_clip", name=text, weights=weights)

    def parts_without_weights(self, spec: ModelSpec) -> list[str] | None:
        if spec.weights:
            check_weights_file(spec.weights)
        known = _shipped_architectures()
        # an architecture registered at run time (open_clip.add_model_config) is known only to a loaded open_clip
        registered = "open_clip" in sys.modules and sys.modules["open_clip"].get_model_config(spec.name) is not None
        if known is not None and spec.name not in known and not registered:
            close = difflib.get_close_matches(spec.name, sorted(known), n=3)
            raise ModelSpecError(f"unknown open_clip architecture {spec.name!r}",
                                 hint=f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()")
        return ["visual", "text"]

    def load(self, spec: ModelSpec) -> Model:
        with uninitialised(skip=bool(spec.weights)):      # the weights file overwrites every parameter
            model = self._create(spec.name, _known_config(spec.name))
        if spec.weights:
            load_weights_file(model.module, spec.weights, f"weights {Path(spec.weights).name}")
        model.random_weights = not spec.weights
        return model

    def load_empty(self, spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> Model:
        import torch

        config = _known_config(spec.name)
        with torch.device("meta"):      # open_clip builds on the CPU and then moves: build on meta from the start
            return self._create(spec.name, config, device="meta")

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        model = self._create(arch["name"], copy.deepcopy(arch["config"]), custom_text=arch.get("custom_text"))
        model.preprocess = {**model.preprocess, **preprocess}   # a changed size (resolution pass) wins
        return model

    def _create(self, name: str, config: dict, custom_text: bool | None = None, device: str = "cpu") -> Model:
        open_clip = _open_clip()
        base = open_clip.get_model_config(name) or {}
        force_custom = bool(custom_text) if custom_text is not None else bool(base.get("custom_text"))
        # Config overrides as kwargs rebuild changed architectures (pruned widths, fewer layers) by name.
        module = open_clip.create_model(name, pretrained=None, load_weights=False, pretrained_image=False,
                                        pretrained_text=False, force_custom_text=force_custom, device=device,
                                        **config)
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
        if part == "visual":
            return example_images(model, part, shapes)
        # open_clip's text towers add a positional embedding of fixed length: the context length is the shape.
        context = model.preprocess.get("context_length", 77)
        vocab = getattr(model.module, "vocab_size", None) or model.arch["config"]["text_cfg"].get("vocab_size", 49408)
        return (random_tokens(shapes.batch_size, context, vocab, seed=shapes.seed).to(model.part_device(part)),)

    def tokenize(self, model: Model, texts: list[str], seq_len: int) -> tuple:
        open_clip = _open_clip()
        try:
            tokenizer = open_clip.get_tokenizer(model.arch["name"])
        except Exception as exc:  # an hf-hub tokenizer cannot be fetched offline
            raise UnsupportedError(f"open_clip tokenizer for {model.arch['name']} is not available offline "
                                   f"({first_line(exc, 120)})") from None
        return (tokenizer(texts).to(model.part_device("text")),)

    def run(self, model: Model, part: str, inputs: tuple) -> torch.Tensor:
        swapped = run_swapped(model, part, inputs)
        if swapped is not None:
            return swapped
        if part == "visual":
            return model.module.encode_image(inputs[0].to(model.part_dtype(part)))
        return model.module.encode_text(inputs[0])

    def can_run_hidden(self, model: Model, part: str) -> bool:
        return False

    def run_hidden(self, model: Model, part: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        raise UnsupportedError("token-level outputs of open_clip models are not supported")

    def drop_part(self, model: Model, part: str) -> None:
        model.check_part(part)
        for prefix in model.part_prefixes(part):
            clear_attribute(model.module, prefix.rstrip("."))
        model.parts.remove(part)

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        return []  # CLIP towers end in their embedding projection: nothing is unused

    # --- structured pruning ------------------------------------------------------------------------------

    def _blocks(self, model: Model, part: str) -> tuple[str, list[nn.Module]]:
        """(resblocks module name, blocks) of a part's transformer, or ("", []) when it has none (ResNet towers)."""
        model.check_part(part)
        if part == "visual":
            name = "visual.transformer.resblocks"
        else:
            name = "text.transformer.resblocks" if model.arch.get("custom_text") else "transformer.resblocks"
        try:
            return name, list(model.module.get_submodule(name))
        except AttributeError:
            return "", []

    def prune_layout(self, model: Model, part: str) -> PruneLayout:
        """ViT / text transformers: FFN c_fc -> c_proj and attention per block; width rounds to the head count."""
        import torch.nn as nn

        name, blocks = self._blocks(model, part)
        if not blocks or not all(isinstance(getattr(b, "attn", None), nn.Module) for b in blocks):
            return PruneLayout()
        ffn = [(f"{name}.{i}.mlp.c_fc", f"{name}.{i}.mlp.c_proj") for i in range(len(blocks))]
        attention = {f"{name}.{i}.attn": b.attn.num_heads for i, b in enumerate(blocks)}
        # Bare parameters on the residual width: (tokens, width) embeddings, (width, embed_dim) projections.
        if part == "visual":
            unwrapped = {"visual.class_embedding": 0, "visual.positional_embedding": 1, "visual.proj": 0}
        else:
            prefix = "text." if model.arch.get("custom_text") else ""
            unwrapped = {f"{prefix}positional_embedding": 1, f"{prefix}text_projection": 0}
        names = {n for n, _ in model.module.named_parameters()}
        return PruneLayout(targets=("mlp", "heads", "width"), ffn=ffn, attention=attention,
                           width_round=blocks[0].attn.num_heads,
                           unwrapped={n: d for n, d in unwrapped.items() if n in names})

    def attention_weights(self, model: Model, name: str) -> dict:
        attn = model.module.get_submodule(name)
        w, b = attn.in_proj_weight, attn.in_proj_bias
        inner = w.shape[0] // 3
        split = [(w[i * inner:(i + 1) * inner], None if b is None else b[i * inner:(i + 1) * inner]) for i in range(3)]
        return {"q": split[0], "k": split[1], "v": split[2], "o": attn.out_proj.weight,
                "heads": attn.num_heads, "head_dim": inner // attn.num_heads}

    def slice_heads(self, model: Model, name: str, keep: list[int]) -> None:
        """Replace an attention layer by one with heads ``keep`` only (q/k/v rows, out_proj columns)."""
        import torch

        from mmopt.modules.attention import HeadSlicedAttention

        old = model.module.get_submodule(name)
        weights = self.attention_weights(model, name)
        rows = head_rows(keep, weights["head_dim"])
        bias = old.in_proj_bias is not None
        new = HeadSlicedAttention(old.embed_dim, len(keep), weights["head_dim"],
                                  batch_first=getattr(old, "batch_first", False), bias=bias)
        with torch.no_grad():
            new.in_proj_weight.copy_(torch.cat([weights[k][0][rows] for k in "qkv"]))
            if bias:
                new.in_proj_bias.copy_(torch.cat([weights[k][1][rows] for k in "qkv"]))
                new.out_proj.bias.copy_(old.out_proj.bias)
            new.out_proj.weight.copy_(old.out_proj.weight[:, rows])
        new.to(device=old.in_proj_weight.device, dtype=old.in_proj_weight.dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.module.get_submodule(parent), attr, new)

    def write_pruned_config(self, model: Model, part: str, target: str) -> str | None:
        """Write the pruned sizes into ``arch["config"]`` (create_model kwargs); return why not, or None."""
        name, blocks = self._blocks(model, part)
        cfg = model.arch["config"].setdefault("vision_cfg" if part == "visual" else "text_cfg", {})
        hidden = {b.mlp.c_fc.out_features for b in blocks}
        widths = {b.mlp.c_fc.in_features for b in blocks}
        if target == "heads":
            return ("open_clip configs derive the head count from width / head_width: per-layer head counts are "
                    "re-applied by mmopt.load")
        if len(hidden) != 1 or len(widths) != 1:
            return f"widths differ per layer (FFN {sorted(hidden)}, model {sorted(widths)}): not one open_clip config"
        width, mlp = widths.pop(), hidden.pop()
        if target == "width":
            heads = blocks[0].attn.num_heads
            if width % heads:
                return f"width {width} is not a multiple of the {heads} heads"
            cfg["width"] = width
            if part == "visual":
                cfg["head_width"] = width // heads
        ratio = mlp / width
        # open_clip builds int(width * mlp_ratio): nudge the ratio so float rounding cannot lose a unit.
        cfg["mlp_ratio"] = ratio if int(width * ratio) == mlp else (mlp + 0.5) / width
        return None

    def save(self, model: Model, out: Path) -> dict[str, str]:
        return save_parts(model, out)

    def quantization_layout(self, model: Model) -> QuantLayout:
        """CLIP's projections are bare (in, out) matrices used as ``x @ P``; positional embeddings are bare
        tables added to the tokens; the ResNet towers' attention pool passes its q/k/v weights to
        ``F.multi_head_attention_forward`` directly, so they cannot become bitsandbytes modules; open_clip's own
        ``Attention`` (custom text towers, some ViTs) holds a fused ``in_proj_weight`` and is called as
        ``(x, attn_mask)``."""
        import torch

        params = dict(model.module.named_parameters())
        bare: dict = {}
        for name in ("visual.proj", "text_projection", "text.text_projection"):
            if isinstance(params.get(name), torch.Tensor) and params[name].dim() == 2:
                bare[name] = "projection"
        for name in ("visual.positional_embedding", "positional_embedding", "text.positional_embedding"):
            if isinstance(params.get(name), torch.Tensor) and params[name].dim() == 2:
                bare[name] = "table"
        keep = {name: "open_clip's AttentionPool2d reads its q/k/v weights directly"
                for name, module in model.module.named_modules() if type(module).__name__ == "AttentionPool2d"}
        return QuantLayout(structural=True, bare_weights=bare, keep=keep, fused_attention=_is_open_clip_attention)

    def adopt_student(self, model: Model, part: str, student: Model, projection: nn.Module | None) -> dict:
        raise UnsupportedError("substitute.student replaces a Hugging Face text encoder by another; open_clip models "
                               "take substitute.swap")

    def shares_text_inputs(self, model: Model, other: Model) -> bool:
        return False      # no other model is known to take open_clip's token ids

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
        rebuilt.module.to(model.part_dtype("visual"))
        rebuilt.random_weights = True
        return rebuilt

    # --- layer drop, resolution, swap --------------------------------------------------------------------

    def _transformer(self, model: Model, part: str) -> tuple[nn.Module, str]:
        """(open_clip Transformer, config key) of a tower; the text tower hangs off the root unless custom."""
        model.check_part(part)
        if part in model.info.get("swapped", {}):
            raise UnsupportedError(f"part {part!r} was swapped for another model; change it before the swap")
        module = model.module
        if part == "visual":
            tower, key = getattr(module.visual, "transformer", None), "vision_cfg"
        else:
            text = getattr(module, "text", None)
            tower, key = (getattr(text, "transformer", None) if text is not None else module.transformer), "text_cfg"
        if tower is None or not hasattr(tower, "resblocks"):
            raise UnsupportedError(f"layer_drop: this open_clip {part} tower has no transformer blocks "
                                   "(ResNet and Hugging Face towers are not supported)")
        return tower, key

    def layer_count(self, model: Model, part: str) -> int:
        return len(self._transformer(model, part)[0].resblocks)

    def keep_layers(self, model: Model, part: str, keep: list[int]) -> None:
        """Keep only blocks ``keep`` and rewrite ``layers`` in the tower's config so it rebuilds by name."""
        tower, key = self._transformer(model, part)
        tower.resblocks = keep_in_list(tower.resblocks, keep)
        tower.layers = len(keep)
        model.arch["config"].setdefault(key, {})["layers"] = len(keep)

    def set_image_size(self, model: Model, part: str, size: int) -> None:
        """Run the ViT image tower at ``size`` px: positional embedding resampled bicubically, class token kept."""
        import torch.nn as nn

        model.check_part(part)
        if part != "visual":
            raise UnsupportedError(f"resolution: part {part!r} takes no images")
        if part in model.info.get("swapped", {}):
            raise UnsupportedError("resolution: the image tower was swapped; change its size before the swap")
        visual = model.module.visual
        if not isinstance(getattr(visual, "positional_embedding", None), nn.Parameter) \
                or not hasattr(visual, "grid_size"):
            raise UnsupportedError("resolution: only open_clip ViT image towers are supported (not ResNet towers)")
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else int(visual.patch_size)
        check_patch_multiple(size, patch)
        grid, new_grid = visual.grid_size[0], size // patch
        visual.positional_embedding = nn.Parameter(interpolate_positions(visual.positional_embedding.data, grid,
                                                                         new_grid))
        visual.grid_size = (new_grid, new_grid)
        visual.image_size = (size, size)
        model.arch["config"].setdefault("vision_cfg", {})["image_size"] = size
        model.preprocess["image_size"] = size

    def swap_part(self, model: Model, part: str, module: nn.Module) -> None:
        model.check_part(part)
        custom = model.arch.get("custom_text")
        attrs = ["visual"] if part == "visual" else (["text"] if custom else [p.rstrip(".") for p in CLIP_TEXT])
        # Prefixes are recomputed from the family's layout, not read back from info, which may already be swapped.
        install_swapped(model, part, module, attrs, False)


def _is_open_clip_attention(module: nn.Module) -> bool:
    """open_clip's own ``Attention``: a fused ``in_proj_weight`` and an ``out_proj``, called as (x, attn_mask)."""
    from open_clip.transformer import Attention

    return isinstance(module, Attention)


def _known_config(name: str) -> dict:
    """A copy of open_clip's config for architecture ``name`` (its create_model kwargs), or one line naming the
    closest known ones."""
    open_clip = _open_clip()
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise ModelSpecError(f"unknown open_clip architecture {name!r}",
                             hint=f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()")
    config = copy.deepcopy(config)
    config.pop("custom_text", None)
    return config
