"""The resolution pass: ViT positional embeddings resampled, CNN preprocessing changed, reload at the new size."""
from __future__ import annotations

import pytest
import torch

from mmopt import checkpoint, registry
from mmopt.core import Shapes
from mmopt.errors import UserError
from mmopt.passes import resolution
from mmopt.passes.base import Context

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"width": 32, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 16},
             "text_cfg": {"width": 32, "layers": 2, "heads": 2, "vocab_size": 64, "context_length": 16}}


def tiny_open_clip():
    torch.manual_seed(0)
    adapter = registry.adapter_for("open_clip")
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_CLIP.items()}
    return adapter, adapter.build({"name": "ViT-B-32", "config": config}, {}, {})


def resize(model, adapter, size: int):
    cfg = resolution.ResolutionConfig(image_size=size)
    result = resolution.Resolution(cfg).apply(model, Context(adapter=adapter))
    return cfg, result


def save_and_reload(model, adapter, cfg, result, folder):
    folder.mkdir()
    passes = [{"name": "resolution", "config": cfg.model_dump(mode="json"), "record": result.record}]
    checkpoint.write_checkpoint(model, adapter, folder, {"source": model.source}, passes)
    return checkpoint.load_model(folder)


def test_open_clip_vit_positions_are_resampled_and_the_class_token_kept(tmp_path):
    adapter, model = tiny_open_clip()
    old = model.module.visual.positional_embedding.detach().clone()
    cfg, result = resize(model, adapter, 16)
    pos = model.module.visual.positional_embedding
    assert pos.shape == (1 + 2 * 2, 32) and torch.equal(pos[0], old[0])
    assert model.preprocess["image_size"] == 16 and model.arch["config"]["vision_cfg"]["image_size"] == 16
    out = adapter.run(model, "visual", adapter.example_inputs(model, "visual", Shapes(batch_size=2)))
    assert out.shape == (2, 32)

    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert reloaded.preprocess["image_size"] == 16
    inputs = adapter.example_inputs(model, "visual", Shapes(batch_size=2, seed=1))
    with torch.no_grad():
        assert torch.allclose(adapter.run(reloaded, "visual", inputs), adapter.run(model, "visual", inputs), atol=1e-6)


def test_a_grid_resampled_to_its_own_size_is_unchanged():
    from mmopt.adapters.structure import interpolate_positions

    pos = torch.randn(1 + 16, 8)
    assert torch.allclose(interpolate_positions(pos, 4, 4), pos, atol=1e-5)


def test_size_not_divisible_by_the_patch_names_sizes_that_work():
    adapter, model = tiny_open_clip()
    with pytest.raises(UserError) as err:
        resize(model, adapter, 20)
    assert err.value.message == ("image_size 20 is not a multiple of the patch size 8; sizes that work: "
                                 "multiples of 8, e.g. 16, 24")
    assert model.preprocess["image_size"] == 32


def test_hf_clip_vision_positions_are_resampled(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 16},
                        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    adapter = registry.adapter_for("hf")
    from mmopt.core import ModelSpec

    model = adapter.load(ModelSpec(source="hf", path=str(tmp_path / "clip")))
    cfg, result = resize(model, adapter, 48)
    assert model.module.vision_model.embeddings.position_embedding.weight.shape == (1 + 36, 32)
    assert model.arch["config"]["vision_config"]["image_size"] == 48
    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    inputs = adapter.example_inputs(reloaded, "visual", Shapes(batch_size=2))
    assert inputs[0].shape[-1] == 48
    with torch.no_grad():
        assert torch.allclose(adapter.run(reloaded, "visual", inputs), adapter.run(model, "visual", inputs), atol=1e-5)


def test_cnn_only_changes_preprocessing_and_reloads_at_the_new_size(tmp_path):
    adapter = registry.adapter_for("torchvision")
    model = adapter.build({"name": "resnet18", "kwargs": {}}, {}, {})
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    cfg, result = resize(model, adapter, 160)
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert reloaded.preprocess["image_size"] == 160
    assert adapter.example_inputs(reloaded, "visual", Shapes())[0].shape[-1] == 160


def test_optimize_compares_the_new_size_with_the_original_at_its_own(tmp_path):
    from PIL import Image

    from mmopt import api

    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 100, 200 - 50 * i)).save(images / f"{i}.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\n"
                      "calibration: {images: imgs, batch_size: 3}\n"
                      "profile: {batch_size: 1}\n"
                      "passes:\n  - resolution: {image_size: 64}\n"
                      "output: out\n")
    report = api.optimize(recipe)
    visual = report["parts"]["visual"]
    assert report["passes"][0]["metrics"]["visual"]["image_size"] == {"before": 224, "after": 64}
    assert visual["fidelity"]["inputs"] == "calibration images (3)" and visual["fidelity"]["samples"] == 3
    assert api.load(tmp_path / "out").mmopt_model.preprocess["image_size"] == 64


def test_example_recipe_validates():
    from pathlib import Path

    from mmopt import api

    recipe = api.validate(Path(__file__).parents[2] / "configs" / "clip-visual-160px.yaml")
    assert recipe.passes[0].config.image_size == 160
