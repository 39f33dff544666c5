"""Hugging Face models from a local folder: BERT-family encoders, CLIPModel, SigLIP, ViT, DINOv2, CLIP vision
towers, anything AutoModel loads.

Sentence-transformers folders keep their pooling: the text part's output is what ``SentenceTransformer``
would return (pooled, normalised when the folder says so).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mmopt.adapters.inputs import example_images, random_tokens
from mmopt.adapters.structure import (check_patch_multiple, clear_attribute, head_rows, install_swapped,
                                      interpolate_positions, keep_in_list, run_swapped, slice_linear)
from mmopt.core import Model, ModelSpec, PruneLayout, QuantLayout, Quantization, Shapes
from mmopt.errors import ModelSpecError, UnsupportedError, UserError, first_line
from mmopt.paths import local_path
from mmopt.weights import save_parts, unique_state_dict, write_safetensors

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
# Files of the source folder that must not be copied: weights and config are rewritten by mmopt.
NOT_COPIED = set(WEIGHT_FILES) | {"config.json", "mmopt.json", "report.json", "report.md", ".gitattributes"}
ASSET_DIRS_SKIPPED = {"onnx", "openvino", ".git"}
# model_type -> (vision tower, its projection, text tower, its projection); SigLIP's towers pool through their own
# heads, with no projection after them
DUAL_TOWER = {"clip": ("vision_model", "visual_projection", "text_model", "text_projection"),
              "siglip": ("vision_model", None, "text_model", None)}
# Architectures AutoModel maps to a class without their weights (CLIPVisionModelWithProjection's config says
# ``clip_vision_model``, which AutoModel builds as CLIPVisionModel, dropping ``visual_projection``): loaded as named.
NAMED_CLASSES = {"CLIPVisionModelWithProjection"}
# Image normalisation when a folder has no preprocessor_config.json: each family's image processor default
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGE_NORM = {"vit": HALF, "siglip": HALF, "siglip_vision_model": HALF, "dinov2": IMAGENET}
# A student text encoder's projection to its teacher's width (``substitute: {student: ...}``): a Linear held on the
# transformers module under this name, written as a sentence-transformers Dense module (weights ``linear.*``).
DENSE = "sentence_dense"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _folder(spec: ModelSpec) -> Path:
    folder = local_path(spec.path, "model path")
    if not folder.is_dir():
        raise ModelSpecError(f"model path must be a Hugging Face folder, got a file: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"model folder has no config.json: {folder}")
    return folder


class HFAdapter:
    source: ClassVar[str] = "hf"

    # --- loading -----------------------------------------------------------------------------------------

    def parse_spec(self, text: str, weights: str | None) -> ModelSpec:
        """``hf:PATH``: a local Hugging Face folder (or ``pkg://package/subfolder``)."""
        if weights:
            raise UserError("--weights is for open_clip and torchvision models; an hf folder holds its own")
        return ModelSpec(source="hf", path=text)

    def load_empty(self, spec: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> Model:
        raise UnsupportedError("streaming (--stream) takes open_clip and torchvision models with a safetensors "
                               "weights file, not Hugging Face folders")

    def parts_without_weights(self, spec: ModelSpec) -> list[str] | None:
        folder = _folder(spec)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelSpecError(f"model folder {folder}: unreadable config.json ({first_line(exc)})") from None
        if not isinstance(config, dict):
            raise ModelSpecError(f"model folder {folder}: config.json is not a mapping")
        if config.get("model_type") in DUAL_TOWER:        # the same rules as _wrap, on the raw config
            return ["visual", "text"]
        if "vocab_size" in config:
            return ["text"]
        return ["visual"] if "image_size" in config else None

    def load(self, spec: ModelSpec) -> Model:
        folder = _folder(spec)
        _quiet_transformers()
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            raise ModelSpecError(f"model folder {folder}: unreadable config.json ({first_line(exc)})") from None
        has_weights = any((folder / name).exists() for name in WEIGHT_FILES)
        auto = _model_class(config)
        try:
            if has_weights:
                module = auto.from_pretrained(str(folder), local_files_only=True)
            else:
                module = _from_config(auto, config)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise ModelSpecError(f"model folder {folder}: transformers cannot load it ({first_line(exc)})") from None
        # transformers records the absolute folder (inside a virtual environment, say) in ``_name_or_path``,
        # which mmopt.json would carry to every machine: record what the recipe named, if portable, else the name
        origin = str(spec.path)
        module.config._name_or_path = origin if origin.startswith("pkg://") else folder.name
        return self._wrap(module, folder, random_weights=not has_weights)

    def build(self, arch: dict, preprocess: dict, info: dict) -> Model:
        _quiet_transformers()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.for_model(**arch["config"])
        module = _from_config(_model_class(config), config)
        dense = info.get("dense")
        if dense:
            import torch

            module.add_module(DENSE, torch.nn.Linear(dense["in_features"], dense["out_features"]))
        model = Model(module=module.eval(), source=self.source, arch=arch, parts=list(info["part_prefixes"]),
                      preprocess=dict(preprocess), info=dict(info))
        return model

    def _wrap(self, module: nn.Module, folder: Path, random_weights: bool) -> Model:
        config = module.config
        model_type = getattr(config, "model_type", "")
        if model_type in DUAL_TOWER:
            vision, vproj, text, tproj = DUAL_TOWER[model_type]
            prefixes = {"visual": [f"{name}." for name in (vision, vproj) if name],
                        "text": [f"{name}." for name in (text, tproj) if name]}
            preprocess = {"image_size": config.vision_config.image_size, **_image_norm(folder, model_type),
                          "max_length": config.text_config.max_position_embeddings}
        elif hasattr(config, "vocab_size"):
            prefixes = {"text": [""]}
            preprocess = {"max_length": getattr(config, "max_position_embeddings", 512)}
        else:
            prefixes = {"visual": [""]}
            preprocess = {"image_size": getattr(config, "image_size", 224), **_image_norm(folder, model_type)}
        pooling, normalize = _sentence_transformers_pooling(folder)
        info = {"part_prefixes": prefixes, "model_type": model_type, "pooling": pooling, "normalize": normalize,
                "tokenizer": _has_tokenizer(folder), "sentence_transformers": (folder / "modules.json").is_file()}
        arch = {"config": config.to_dict()}
        return Model(module=module.eval(), source=self.source, arch=arch, parts=list(prefixes),
                     preprocess=preprocess, random_weights=random_weights, assets=folder, info=info)

    # --- inputs and running ------------------------------------------------------------------------------

    def example_inputs(self, model: Model, part: str, shapes: Shapes) -> tuple:
        model.check_part(part)
        if part == "visual":
            return example_images(model, part, shapes)
        config = self._text_config(model)
        seq = min(shapes.seq_len, model.preprocess.get("max_length", shapes.seq_len))
        ids = random_tokens(shapes.batch_size, seq, config.vocab_size, seed=shapes.seed).to(model.part_device(part))
        import torch

        return ids, torch.ones_like(ids)

    def tokenize(self, model: Model, texts: list[str], seq_len: int) -> tuple:
        if not model.info.get("tokenizer") or model.assets is None:
            raise UnsupportedError("this model folder has no tokenizer; texts cannot be encoded")
        tokenizer = self._tokenizer(model)
        seq = min(seq_len, model.preprocess.get("max_length", seq_len))
        enc = tokenizer(texts, padding=True, truncation=True, max_length=seq, return_tensors="pt")
        device = model.part_device("text")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def _tokenizer(self, model: Model) -> Any:
        cached = model.info.get("_tokenizer")
        if cached is None:
            from transformers import AutoTokenizer

            cached = AutoTokenizer.from_pretrained(str(model.assets), local_files_only=True)
            model.info["_tokenizer"] = cached
        return cached

    def vocabulary(self, model: Model) -> list[str]:
        from mmopt.distill.augment import vocab_words

        if not model.info.get("tokenizer") or model.assets is None:
            return []
        return vocab_words(self._tokenizer(model))

    def run(self, model: Model, part: str, inputs: tuple) -> torch.Tensor:
        swapped = run_swapped(model, part, inputs)
        if swapped is not None:
            return swapped
        module = model.module
        model_type = model.info.get("model_type")
        if model_type in DUAL_TOWER:
            vision, vproj, text, tproj = DUAL_TOWER[model_type]
            if part == "visual":
                pixels = inputs[0].to(model.part_dtype(part))
                pooled, proj = getattr(module, vision)(pixel_values=pixels).pooler_output, vproj
            else:
                ids, mask = inputs
                pooled, proj = getattr(module, text)(input_ids=ids, attention_mask=mask).pooler_output, tproj
            return getattr(module, proj)(pooled) if proj else pooled
        if part == "visual":
            out = module(pixel_values=inputs[0].to(model.part_dtype(part)))
            # a projection head's embedding, else the pooler's (ViT's tanh dense, DINOv2's and CLIP's normed
            # class token), else the mean of the tokens
            for field in ("image_embeds", "pooler_output"):
                value = getattr(out, field, None)
                if value is not None:
                    return value
            return out.last_hidden_state.mean(dim=1)
        ids, mask = inputs
        hidden = module(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = _pool(hidden, mask, model.info.get("pooling", "mean"), model.info.get("normalize", False))
        dense = model.info.get("dense")
        if not dense:
            return pooled
        import torch

        out = getattr(module, DENSE)(pooled.to(getattr(module, DENSE).weight.dtype))
        return torch.nn.functional.normalize(out, dim=-1) if dense["normalize"] else out

    def can_run_hidden(self, model: Model, part: str) -> bool:
        return part == "text" and part in model.parts

    def run_hidden(self, model: Model, part: str, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The text part's last hidden states and their token mask (for token-level distillation)."""
        if part != "text":
            raise UnsupportedError(f"token-level outputs of part {part!r} are not supported; only text")
        ids, mask = inputs
        module = self._tower(model, part)[0]
        return module(input_ids=ids, attention_mask=mask).last_hidden_state, mask

    def _text_config(self, model: Model) -> Any:
        return _text_config_of(model.module.config)

    # --- structure ---------------------------------------------------------------------------------------

    def drop_part(self, model: Model, part: str) -> None:
        model.check_part(part)
        model_type = model.info.get("model_type")
        if model_type not in DUAL_TOWER:
            raise UnsupportedError(f"cannot drop {part!r}: it is this model's only part")
        for prefix in model.part_prefixes(part):
            clear_attribute(model.module, prefix.rstrip("."))
        model.parts.remove(part)

    def drop_unused_heads(self, model: Model, features: bool) -> list[str]:
        # BERT's pooler feeds only pooler_output, which mean/cls/max pooling of the hidden states never reads.
        # transformers always builds it, though: a stock folder without its weights would load with a "newly
        # initialized" warning, so its original weights are kept aside for the stock file (``save``).
        pooler = getattr(model.module, "pooler", None)
        if "text" in model.parts and pooler is not None and model.info.get("pooling") in ("mean", "cls", "max"):
            model.info["_stock_heads"] = {f"pooler.{k}": v.detach().clone() for k, v in pooler.state_dict().items()}
            model.module.pooler = None
            return ["pooler"]
        return []

    # --- structured pruning ------------------------------------------------------------------------------

    def prune_layout(self, model: Model, part: str) -> PruneLayout:
        """FFN width of every layer (BERT and ViT: intermediate.dense -> output.dense; CLIP, SigLIP, DINOv2:
        mlp.fc1 -> mlp.fc2, SigLIP's pooling head included, as its config gives it the same width), and the
        self-attention heads of BERT-family encoders. Other attentions (ViT's ``attention.attention``, CLIP's
        ``q_proj``) have no head slicing here."""
        model.check_part(part)
        ffn, attention = [], {}
        for name, module in model.named_modules(part):
            pair = _ffn_pair(module)
            if pair is not None:
                ffn.append((f"{name}.{pair[0]}", f"{name}.{pair[1]}"))
            if _is_bert_layer(module):
                attention[f"{name}.attention"] = module.attention.self.num_attention_heads
        if not ffn:
            return PruneLayout()
        targets = ("mlp", "heads") if attention else ("mlp",)
        return PruneLayout(targets=targets, ffn=ffn, attention=attention, ignore=["embeddings", "pooler"])

    def attention_weights(self, model: Model, name: str) -> dict:
        """Per-head projections of one attention layer: q/k/v (weight, bias) with rows head after head, o weight."""
        att = model.module.get_submodule(name)
        s = att.self
        return {"q": (s.query.weight, s.query.bias), "k": (s.key.weight, s.key.bias),
                "v": (s.value.weight, s.value.bias), "o": att.output.dense.weight,
                "heads": s.num_attention_heads, "head_dim": s.attention_head_size}

    def slice_heads(self, model: Model, name: str, keep: list[int]) -> None:
        """Keep heads ``keep`` of a BERT attention layer (transformers 5 has no prune_heads)."""
        att = model.module.get_submodule(name)
        s = att.self
        rows = head_rows(keep, s.attention_head_size)
        for linear in (s.query, s.key, s.value):
            slice_linear(linear, out_idx=rows)
        slice_linear(att.output.dense, in_idx=rows)
        s.num_attention_heads = len(keep)
        s.all_head_size = len(keep) * s.attention_head_size

    def write_pruned_config(self, model: Model, part: str, target: str) -> str | None:
        """Write the pruned sizes into the config; return why the result is not a stock config, or None."""
        layout = self.prune_layout(model, part)
        if target == "mlp":
            sizes = {model.module.get_submodule(fc1).out_features for fc1, _ in layout.ffn}
            if len(sizes) != 1:
                return f"FFN widths differ per layer ({sorted(sizes)}): the config holds one intermediate_size"
            size = sizes.pop()
            config = self._tower(model, part)[1]
            if hasattr(config, "mlp_ratio"):        # DINOv2: the width is hidden_size * mlp_ratio, an integer
                if size % config.hidden_size:
                    return (f"FFN width {size} is not a whole multiple of hidden_size {config.hidden_size}: "
                            "DINOv2 configs hold an integer mlp_ratio")
                config.mlp_ratio = size // config.hidden_size
            else:
                config.intermediate_size = size
            model.arch = {"config": model.module.config.to_dict()}
            return None
        if target == "heads":
            return ("BERT configs derive the head size from hidden_size / num_attention_heads: fewer heads of the "
                    "same size are re-applied by mmopt.load, not by AutoModel")
        return f"{target} is not expressible in this config"

    # --- saving ------------------------------------------------------------------------------------------

    def is_stock_folder(self, model: Model) -> bool:
        """A single-part model is also written as a plain Hugging Face folder (unless a part was swapped)."""
        return model.info.get("model_type") not in DUAL_TOWER and not model.info.get("swapped")

    # --- layer drop, resolution, swap --------------------------------------------------------------------

    def _tower(self, model: Model, part: str) -> tuple[nn.Module, Any]:
        """(module, config) of the encoder behind ``part``."""
        model.check_part(part)
        if part in model.info.get("swapped", {}):
            raise UnsupportedError(f"part {part!r} was swapped for another model; change it before the swap")
        module = model.module
        model_type = model.info.get("model_type")
        if model_type in DUAL_TOWER:
            vision, _, text, _ = DUAL_TOWER[model_type]
            tower = getattr(module, vision if part == "visual" else text)
            config = module.config.vision_config if part == "visual" else module.config.text_config
            return tower, config
        # CLIPVisionModel (with or without projection), SiglipVisionModel: the transformer sits in ``vision_model``
        inner = getattr(module, "vision_model", None) if part == "visual" else None
        return (inner if inner is not None else module), module.config

    def _layers(self, model: Model, part: str) -> tuple[nn.Module, str, nn.ModuleList, Any]:
        """(parent, attribute, ModuleList, config) of the part's transformer layers."""
        import torch.nn as nn

        tower, config = self._tower(model, part)
        # BERT / RoBERTa / CLIP: encoder.layer(s); DistilBERT: transformer.layer
        for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
            parent = tower
            *head, attr = path.split(".")
            for name in head:
                parent = getattr(parent, name, None)
            layers = getattr(parent, attr, None) if parent is not None else None
            if isinstance(layers, nn.ModuleList):
                return parent, attr, layers, config
        raise UnsupportedError(f"layer_drop: no list of transformer layers found in this "
                               f"{model.info.get('model_type')} "
                               f"model's {part} part")

    def layer_count(self, model: Model, part: str) -> int:
        """Number of transformer layers of ``part``."""
        return len(self._layers(model, part)[2])

    def keep_layers(self, model: Model, part: str, keep: list[int]) -> None:
        """Keep only layers ``keep`` of ``part`` and rewrite the config (num_hidden_layers) to match."""
        parent, attr, layers, config = self._layers(model, part)
        setattr(parent, attr, keep_in_list(layers, keep))
        config.num_hidden_layers = len(keep)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]
        model.arch = {"config": model.module.config.to_dict()}

    def set_image_size(self, model: Model, part: str, size: int) -> None:
        """Run ``part`` at ``size`` px: CLIP vision positional embeddings interpolated, config rewritten."""
        import torch
        import torch.nn as nn

        tower, config = self._tower(model, part)
        if part != "visual":
            raise UnsupportedError(f"resolution: part {part!r} takes no images")
        emb = getattr(tower, "embeddings", None)
        table = getattr(emb, "position_embedding", None)
        grid_param = getattr(emb, "position_embeddings", None)
        if not isinstance(table, nn.Embedding) and not isinstance(grid_param, nn.Parameter):
            raise UnsupportedError(f"resolution: {model.info.get('model_type')} vision models are not supported "
                                   "(CLIP, SigLIP, ViT and DINOv2 vision towers are)")
        patch = int(config.patch_size)
        check_patch_multiple(size, patch)
        grid, new_grid = int(config.image_size) // patch, size // patch
        if isinstance(table, nn.Embedding):        # CLIP, SigLIP: a table indexed by position_ids
            old = table.weight.data
            new = interpolate_positions(old, grid, new_grid)
            emb.position_embedding = nn.Embedding(new.shape[0], new.shape[1], device=old.device, dtype=old.dtype)
            emb.position_embedding.weight.data.copy_(new)
            emb.image_size, emb.num_patches, emb.num_positions = size, new_grid * new_grid, new.shape[0]
            emb.register_buffer("position_ids", torch.arange(new.shape[0], device=old.device).expand((1, -1)),
                                persistent=False)
        else:
            # ViT, DINOv2: a (1, tokens, dim) parameter, resized once here (rather than transformers'
            # interpolate_pos_encoding on every call) so the stock folder, rebuilt at the new image_size, matches
            old = grid_param.data
            new = interpolate_positions(old[0], grid, new_grid).unsqueeze(0)
            emb.position_embeddings = nn.Parameter(new, requires_grad=grid_param.requires_grad)
            patches = emb.patch_embeddings
            patches.image_size, patches.num_patches = (size, size), new_grid * new_grid
        config.image_size = size
        model.preprocess["image_size"] = size
        model.arch = {"config": model.module.config.to_dict()}

    def swap_part(self, model: Model, part: str, module: nn.Module) -> None:
        """Replace ``part`` by ``module`` (inputs -> embedding); see ``structure.install_swapped``."""
        model.check_part(part)
        model_type = model.info.get("model_type")
        if model_type in DUAL_TOWER:
            vision, vproj, text, tproj = DUAL_TOWER[model_type]
            names = [vision, vproj] if part == "visual" else [text, tproj]
            install_swapped(model, part, module, [name for name in names if name], False)
        else:
            install_swapped(model, part, module, [], True)

    def adopt_student(self, model: Model, part: str, student: Model, projection: nn.Module | None) -> dict:
        """Make ``model`` (a text encoder) the ``student`` text encoder, with its own tokenizer and
        sentence-transformers modules, and ``projection`` (a Linear to ``model``'s output width) after its pooled
        output, normalised when ``model``'s output is. Returns what ``mmopt.load`` needs: the projection's
        weight names in the written Dense file -> in the module."""
        model.check_part(part)
        student.check_part(part)
        if model.info.get("model_type") in DUAL_TOWER or student.info.get("model_type") in DUAL_TOWER or \
                list(student.parts) != [part] or list(model.parts) != [part]:
            raise UnsupportedError("substitute.student: teacher and student must both be text encoders with one "
                                   "part, text (a CLIP text tower cannot be written as a sentence-transformers "
                                   "folder)")
        info = {k: v for k, v in student.info.items()}
        names = {}
        if projection is not None:
            student.module.add_module(DENSE, projection)
            info["dense"] = {"in_features": projection.in_features, "out_features": projection.out_features,
                             "normalize": bool(model.info.get("normalize"))}
            names = {f"linear.{k}": f"{DENSE}.{k}" for k, _ in projection.named_parameters()}
        model.module, model.arch, model.parts = student.module, student.arch, list(student.parts)
        model.preprocess, model.info, model.assets = dict(student.preprocess), info, student.assets
        model.random_weights = student.random_weights
        return {"state_keys": names}

    def save(self, model: Model, out: Path) -> dict[str, str]:
        """One weight set: a stock Hugging Face folder (``model.safetensors`` + ``config.json``, quantized weights
        in transformers' torchao or bitsandbytes format) that ``mmopt.load`` reads too; mmopt's own per-part files
        when no stock format can carry the model (a swapped part, mmopt's 4-bit groups next to int8 rows)."""
        if model.assets is not None:
            copy_assets(model.assets, out)
        quant = model.quantization
        if not self.is_stock_folder(model) or (quant is not None and quant.has_4bit_groups):
            return save_parts(model, out)
        # transformers loads with dtype="auto" from this field: it must name the dtype actually stored (and a
        # torchao Int8Tensor dequantizes to the dtype it was written in, so the folder runs in that dtype)
        model.module.config.dtype = model.part_dtype(model.parts[0])
        model.module.config.to_json_file(str(out / "config.json"))
        if quant is not None:
            # A dropped head (the pooler) is rebuilt by transformers with fresh weights; it must stay a float module,
            # since transformers cannot initialise a quantized weight it has no data for.
            dropped = [name for name, child in model.module._modules.items() if child is None]
            _add_quantization_config(out / "config.json", quant, dropped)
        # Dropped heads go into the stock file only, so transformers and sentence-transformers load it without a
        # missing-weights report; mmopt's load skips them (Strip.load_state), keeping the memory saving.
        state = unique_state_dict(model.module)
        files = {}
        if model.info.get("dense"):
            dense = {"linear." + k[len(DENSE) + 1:]: state.pop(k) for k in list(state) if k.startswith(f"{DENSE}.")}
            files = _write_sentence_modules(model, out, dense)
        write_safetensors({**state, **_stock_heads(model)}, out / "model.safetensors")
        return {model.parts[0]: "model.safetensors", **files}

    def quantization_layout(self, model: Model) -> QuantLayout:
        """No structural swaps: the folder must still rebuild in transformers (whose CLIP, e.g., reads
        ``patch_embedding.weight.dtype``); its Linear and Embedding modules are what gets quantized."""
        import torch

        if not self.is_stock_folder(model):
            return QuantLayout(structural=False)
        # the folder stays stock: transformers' torchao loader quantizes Linear / Embedding weights, not convolutions
        convs = {name: "convolution: kept float so transformers can load the folder (its torchao format holds "
                       "Linear and Embedding weights)"
                 for name, module in model.module.named_modules() if isinstance(module, torch.nn.modules.conv._ConvNd)}
        return QuantLayout(structural=False, keep=convs,
                           float_tables="embedding table: transformers' bitsandbytes format has no int8 tables "
                                        "(method int8 has)")

    def shares_text_inputs(self, model: Model, other: Model) -> bool:
        """Another Hugging Face text encoder takes the same token ids (its tokenizer is assumed the same)."""
        return other.source == self.source

    # --- training and what-if ----------------------------------------------------------------------------

    def enable_grad_checkpointing(self, model: Model, part: str) -> str:
        model.check_part(part)
        module = model.module
        if not getattr(module, "supports_gradient_checkpointing", False):
            raise UnsupportedError(f"{type(module).__name__} does not support gradient checkpointing")
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "transformers gradient_checkpointing_enable"

    def at_image_size(self, model: Model, size: int) -> Model:
        import copy

        arch = copy.deepcopy(model.arch)
        config = arch["config"]
        target = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
        if "image_size" not in target:
            raise UnsupportedError("this model has no image size to change")
        target["image_size"] = size
        rebuilt = self.build(arch, dict(model.preprocess, image_size=size), model.info)
        rebuilt.module.to(model.part_dtype("visual"))
        rebuilt.random_weights = True
        return rebuilt


def bnb_quantization_config(quant: Quantization, float_linear: list[str]) -> dict:
    """transformers' ``BitsAndBytesConfig`` (as config.json stores it) for what the quantize pass did; the
    ``float_linear`` modules stay in float."""
    import re

    skip = [re.escape(name) for name in float_linear]
    if quant.method == "llm_int8":
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                "llm_int8_threshold": quant.int8_threshold, "llm_int8_has_fp16_weight": False,
                "llm_int8_skip_modules": skip}
    return {"quant_method": "bitsandbytes", "load_in_8bit": False, "load_in_4bit": True,
            "bnb_4bit_quant_type": quant.method, "bnb_4bit_compute_dtype": quant.compute_dtype,
            "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip}


def torchao_quantization_config(quant: Quantization) -> dict:
    """transformers' ``TorchAoConfig`` (as config.json stores it) for torchao int8 weights on exactly the modules
    in ``quant.int8_modules``: one parameter-level regex. A module-name key would also match biases, and a plain
    config with ``include_input_output_embeddings`` still leaves ``nn.Embedding`` float (torchao's default filter
    takes Linear only); a matched ``weight`` is quantized whatever its module is."""
    import re

    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    regex = "re:^(" + "|".join(re.escape(name) for name in quant.int8_modules) + r")\.weight$"
    return TorchAoConfig(FqnToConfig({regex: Int8WeightOnlyConfig()})).to_dict()


def _write_sentence_modules(model: Model, out: Path, dense: dict) -> dict[str, str]:
    """The sentence-transformers modules of a student with a projection: its own (Transformer, Pooling and
    Normalize, or a Transformer and mean Pooling where its folder had none), then ``Dense`` (identity
    activation) and ``Normalize`` when the teacher normalises. Returns {"text.dense": the Dense weights file},
    a weight file of no part (``mmopt.load`` reads it with the part's)."""
    modules_file = out / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
    else:
        hidden = model.module.config.hidden_size
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
             "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2) + "\n")
        (out / "sentence_bert_config.json").write_text(json.dumps(
            {"max_seq_length": model.preprocess.get("max_length", 512), "do_lower_case": False}) + "\n")
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    spec = model.info["dense"]

    def add(kind: str) -> str:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_{kind}",
                        "type": f"sentence_transformers.models.{kind}"})
        return f"{n}_{kind}"

    folder = add("Dense")
    (out / folder).mkdir()
    (out / folder / "config.json").write_text(json.dumps(
        {"in_features": spec["in_features"], "out_features": spec["out_features"], "bias": "linear.bias" in dense,
         "activation_function": "torch.nn.modules.linear.Identity"}, indent=2) + "\n")
    write_safetensors({k: v.contiguous() for k, v in dense.items()}, out / folder / "model.safetensors")
    if spec["normalize"]:
        add("Normalize")
    modules_file.write_text(json.dumps(modules, indent=2) + "\n")
    return {"text.dense": f"{folder}/model.safetensors"}


def _add_quantization_config(file: Path, quant: Quantization, dropped: list[str]) -> None:
    config = json.loads(file.read_text())
    if quant.method == "int8":
        config["quantization_config"] = torchao_quantization_config(quant)
    else:
        config["quantization_config"] = bnb_quantization_config(quant, quant.float_linear + dropped)
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _stock_heads(model: Model) -> dict:
    """The original weights of heads ``drop_unused_heads`` removed, in the dtype the model now computes in, when
    they still fit its config (a width-pruned model's would not: they are left out)."""
    heads = model.info.get("_stock_heads") or {}
    dtype = next((p.dtype for p in model.module.parameters() if p.is_floating_point()), None)
    hidden = getattr(model.module.config, "hidden_size", None)
    if not heads or any(t.shape[-1] != hidden for t in heads.values()):
        return {}
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in heads.items()}


def _ffn_pair(module: nn.Module) -> tuple[str, str] | None:
    """(fc1, fc2) names of ``module``'s feed-forward block, relative to it: BERT / ViT layers
    (intermediate.dense -> output.dense) or CLIP / SigLIP / DINOv2 ones (mlp.fc1 -> mlp.fc2); None otherwise."""
    import torch.nn as nn

    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
        return "intermediate.dense", "output.dense"
    mlp = getattr(module, "mlp", None)
    if isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear):
        return "mlp.fc1", "mlp.fc2"
    return None


def _model_class(config: Any) -> Any:
    """The class that builds ``config`` with all its weights: AutoModel, or the one named in ``architectures``
    when AutoModel would build another (NAMED_CLASSES)."""
    import transformers

    named = [name for name in (getattr(config, "architectures", None) or []) if name in NAMED_CLASSES]
    return getattr(transformers, named[0]) if named else transformers.AutoModel


def _from_config(cls: Any, config: Any) -> nn.Module:
    """A random-weight model: AutoModel's ``from_config``; a named class has the private ``_from_config``."""
    return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)


def _is_bert_layer(module: nn.Module) -> bool:
    att, inter, out = (getattr(module, n, None) for n in ("attention", "intermediate", "output"))
    return all(hasattr(x, "dense") for x in (inter, out)) and hasattr(getattr(att, "self", None), "query")


def _text_config_of(config: Any) -> Any:
    return getattr(config, "text_config", config)


def copy_assets(source: Path, out: Path) -> None:
    """Tokenizer, sentence-transformers modules and other small files travel with the checkpoint."""
    for item in sorted(source.iterdir()):
        if item.name in NOT_COPIED or item.name.startswith("."):
            continue
        if item.is_dir():
            if item.name not in ASSET_DIRS_SKIPPED:
                shutil.copytree(item, out / item.name)
        elif not item.name.endswith((".safetensors", ".bin", ".onnx", ".h5", ".msgpack", ".ot")):
            shutil.copy2(item, out / item.name)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    import torch

    mask_f = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = hidden.masked_fill(mask_f == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        pooled = (hidden * mask_f).sum(dim=1) / mask_f.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def _sentence_transformers_pooling(folder: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation from a sentence-transformers folder; mean pooling otherwise."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for entry in modules:
        kind = entry.get("type", "")
        if kind.endswith("Pooling"):
            cfg_file = folder / entry.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def _image_norm(folder: Path, model_type: str) -> dict:
    """Mean and std from the folder's preprocessor_config.json, else the family's image processor defaults
    (CLIP's for families not listed in IMAGE_NORM)."""
    cfg_file = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    mean, std = IMAGE_NORM.get(model_type, CLIP_NORM)
    return {"mean": list(cfg.get("image_mean", mean)), "std": list(cfg.get("image_std", std))}
