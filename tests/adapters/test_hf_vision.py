"""Hugging Face vision encoders (ViT, DINOv2, SigLIP, CLIP vision towers) through AutoModel: parts, passes, and
an output that transformers loads as it is, without a warning."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import mmopt

SINGLE = ["vit", "dinov2", "clip_vision", "clip_vision_projection"]
SILENT = ("missing", "newly initialized", "unexpected", "not used", "not initialized", "mismatch", "load report")


def recipe(folder, passes: str) -> str:
    return (f"model: {{source: hf, path: {folder}}}\nprofile: {{batch_size: 2, seq_len: 8}}\n"
            f"calibration: {{num_samples: 4, batch_size: 2}}\npasses: {passes}\noutput: out\n")


def stock_load(out):
    """What a user of transformers does with the folder: AutoModel, or the class its config names when AutoModel
    maps the model_type to another one (CLIPVisionModelWithProjection)."""
    import transformers

    config = json.loads((out / "config.json").read_text())
    named = config.get("architectures", [""])[0]
    cls = getattr(transformers, named) if named == "CLIPVisionModelWithProjection" else transformers.AutoModel
    return cls.from_pretrained(str(out))


@pytest.mark.parametrize("kind", SINGLE)
def test_int8_output_is_a_stock_folder_that_loads_silently(kind, tiny_hf_vision, recipe_file, capfd, caplog):
    path = recipe_file(recipe(tiny_hf_vision(kind), "[quantize: {method: int8}]"))
    report = mmopt.optimize(path)
    assert list(report["parts"]) == ["visual"]
    out = path.parent / "out"
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        stock = stock_load(out)
    said = capfd.readouterr()
    said = (said.out + said.err + caplog.text).lower()
    assert not any(word in said for word in SILENT), said
    ours = mmopt.load(out)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = stock(pixel_values=pixels), ours(pixel_values=pixels)
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-5)
    assert mmopt.profile(str(out), batch_size=2)["parts"]


def test_family_preprocessing_without_a_preprocessor_file(tiny_hf_vision):
    from mmopt.adapters.hf import HFAdapter
    from mmopt.core import ModelSpec

    means = {kind: HFAdapter().load(ModelSpec(source="hf", path=str(tiny_hf_vision(kind)))).preprocess["mean"]
             for kind in ("vit", "dinov2", "siglip", "clip_vision")}
    assert means["vit"] == means["siglip"] == [0.5, 0.5, 0.5]
    assert means["dinov2"] == [0.485, 0.456, 0.406] and means["clip_vision"][0] == pytest.approx(0.48145466)


def test_siglip_has_two_towers_and_loads_one(tiny_hf_vision, recipe_file):
    path = recipe_file(recipe(tiny_hf_vision("siglip"), "[cast: {dtype: bfloat16}]"))
    report = mmopt.optimize(path)
    assert sorted(report["parts"]) == ["text", "visual"]
    assert report["parts"]["visual"]["fidelity"]["mean_cosine"] > 0.98
    text = mmopt.load(path.parent / "out", parts=["text"])
    assert text.mmopt_model.parts == ["text"] and text.vision_model is None


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_resolution_interpolates_positions_and_the_stock_folder_runs_at_the_new_size(kind, tiny_hf_vision,
                                                                                     recipe_file):
    path = recipe_file(recipe(tiny_hf_vision(kind), "[resolution: {image_size: 48}]"))
    report = mmopt.optimize(path)
    assert report["parts"]["visual"]["fidelity"]["mean_cosine"] > 0.5
    stock = stock_load(path.parent / "out")
    assert stock.config.image_size == 48 and stock.embeddings.position_embeddings.shape[1] == 36 + 1
    assert stock(pixel_values=torch.randn(1, 3, 48, 48)).last_hidden_state.shape[1] == 37


@pytest.mark.parametrize("kind", ["vit", "clip_vision"])
def test_mlp_pruning_writes_a_smaller_stock_config(kind, tiny_hf_vision, recipe_file):
    path = recipe_file(recipe(tiny_hf_vision(kind), "[prune: {target: mlp, amount: 0.5}]"))
    report = mmopt.optimize(path)
    assert report["passes"][0]["metrics"]["visual"]["pruned"]["stock_config"]
    assert stock_load(path.parent / "out").config.intermediate_size == 32


def test_int8_covers_95_percent_of_a_vit_at_a_realistic_width(tmp_path, recipe_file):
    """At width 32 the float patch convolution and position table weigh too much; at ViT widths they are ~1%."""
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    report = mmopt.optimize(recipe_file(recipe(tmp_path / "vit", "[quantize: {method: int8}]")))
    assert report["passes"][0]["metrics"]["visual"]["quantized_fraction"] >= 0.95
