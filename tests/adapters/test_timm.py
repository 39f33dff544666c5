"""timm backbones: ResNet, EfficientNet, ConvNeXt and ViT through the passes, reload and profile."""
from __future__ import annotations

import json

import pytest
import torch

import mmopt
from mmopt.adapters.timm import TimmAdapter
from mmopt.core import ModelSpec
from mmopt.errors import ModelSpecError

SMALL = {"resnet18": 32, "efficientnet_b0": 32, "convnext_atto": 32, "vit_tiny_patch16_224": 224}


def recipe(name: str, passes: str, extra: str = "", image_size: int | None = None) -> str:
    size = image_size or SMALL.get(name, 224)
    return (f"model: {{source: timm, name: {name}{extra}}}\nprofile: {{batch_size: 2, image_size: {size}}}\n"
            f"calibration: {{num_samples: 4, batch_size: 2}}\npasses: {passes}\noutput: out\n")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_cast_reloads_with_timm_preprocessing(name, recipe_file):
    path = recipe_file(recipe(name, "[cast: {dtype: bfloat16}]"))
    report = mmopt.optimize(path)
    assert report["random_weights"] and report["parts"]["visual"]["fidelity"]["mean_cosine"] > 0.98
    assert "top1_agreement" in report["parts"]["visual"]["fidelity"]
    manifest = json.loads((path.parent / "out" / "mmopt.json").read_text())
    assert manifest["preprocessing"]["mean"] and manifest["source"]["source"] == "timm"
    module = mmopt.load(path.parent / "out")
    assert next(module.parameters()).dtype == torch.bfloat16 and module.num_classes == 1000


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_int8_covers_nearly_all_parameters_of_vit_and_convnext(name, recipe_file):
    report = mmopt.optimize(recipe_file(recipe(name, "[quantize: {method: int8}]")))
    metrics = report["passes"][0]["metrics"]["visual"]
    assert metrics["quantized_fraction"] >= 0.95, metrics


def test_features_strip_rebuilds_headless(recipe_file):
    path = recipe_file(recipe("convnext_atto", "[strip: {features: true}]"))
    report = mmopt.optimize(path)
    assert report["passes"][0]["changed"][0]["module"] == "head.fc"
    module = mmopt.load(path.parent / "out")
    assert module.num_classes == 0 and module(torch.zeros(1, 3, 32, 32)).shape == (1, 320)


@pytest.mark.parametrize("name, target", [("resnet18", "channels"), ("vit_tiny_patch16_224", "mlp")])
def test_pruning_shrinks_and_reloads(name, target, recipe_file):
    path = recipe_file(recipe(name, f"[prune: {{target: {target}, amount: 0.25}}]"))
    report = mmopt.optimize(path)
    visual = report["parts"]["visual"]
    assert visual["after"]["params"] < 0.9 * visual["before"]["params"]
    module = mmopt.load(path.parent / "out")
    size = SMALL[name]
    assert module(torch.zeros(1, 3, size, size)).shape == (1, 1000)


def test_vit_resolution_interpolates_positions_and_reloads(recipe_file):
    path = recipe_file("model: {source: timm, name: vit_tiny_patch16_224}\nprofile: {batch_size: 2}\n"
                       "calibration: {num_samples: 4, batch_size: 2}\npasses: [resolution: {image_size: 160}]\n"
                       "output: out\n")
    mmopt.optimize(path)
    module = mmopt.load(path.parent / "out")
    assert module.pos_embed.shape[1] == (160 // 16) ** 2 + 1
    assert module(torch.zeros(1, 3, 160, 160)).shape == (1, 1000)


def test_a_fine_tuned_head_is_read_from_safetensors_weights(tmp_path, recipe_file):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit_binary.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=1).state_dict(), str(weights))
    path = recipe_file(recipe("vit_tiny_patch16_224", "[quantize: {method: int8}]",
                              extra=f", weights: {weights}"))
    report = mmopt.optimize(path)
    assert not report["random_weights"] and "sign_agreement" in report["parts"]["visual"]["fidelity"]
    assert mmopt.load(path.parent / "out").num_classes == 1


def test_profile_a_timm_vit(capsys, monkeypatch):
    import sys

    from mmopt import cli

    monkeypatch.setattr(sys, "argv", ["mmopt", "profile", "timm:vit_tiny_patch16_224", "--batch", "4", "--json"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = json.loads(capsys.readouterr().out)
    assert info.value.code in (0, None) and out["parts"]["visual"]["peak_activation_bytes"] > 0


def test_an_unknown_name_gets_the_closest_ones():
    with pytest.raises(ModelSpecError, match="unknown timm model") as info:
        TimmAdapter().load(ModelSpec(source="timm", name="convnext_tiniest"))
    assert "convnext_tiny" in info.value.hint
