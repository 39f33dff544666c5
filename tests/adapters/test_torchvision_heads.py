"""torchvision models as users have them: fine-tuned heads of another size, builder keywords, other head stacks,
and whole pickled models (refused without unpickling)."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision

import mmopt
from mmopt import cli
from mmopt.adapters.torchvision import TorchvisionAdapter
from mmopt.core import ModelSpec
from mmopt.errors import ModelSpecError


@pytest.fixture(scope="module")
def one_output_efficientnet(tmp_path_factory):
    """An efficientnet_b0 'fine-tuned' to one output: a plain state dict whose classifier.1 is [1, 1280]."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=1)
    path = tmp_path_factory.mktemp("finetuned") / "efficientnet_b0_binary.pth"
    torch.save(model.state_dict(), path)
    return path


def test_head_size_is_read_from_the_checkpoint(one_output_efficientnet):
    model = TorchvisionAdapter().load(ModelSpec(source="torchvision", name="efficientnet_b0",
                                                weights=str(one_output_efficientnet)))
    assert model.module.classifier[1].out_features == 1 and model.arch["kwargs"] == {"num_classes": 1}
    assert not model.random_weights


@pytest.mark.parametrize("passes", ["[quantize: {method: int8}]", "[cast: {dtype: float16}]"])
def test_a_one_output_classifier_goes_through_a_recipe_and_reloads_with_its_head(one_output_efficientnet,
                                                                                 recipe_file, passes):
    path = recipe_file(f"""
model: {{source: torchvision, name: efficientnet_b0, weights: {one_output_efficientnet}}}
profile: {{batch_size: 2, image_size: 64}}
calibration: {{num_samples: 8, batch_size: 4}}
passes: {passes}
gates: {{min_top1_agreement: 0.0}}
output: out
""")
    report = mmopt.optimize(path)
    fid = report["parts"]["visual"]["fidelity"]
    assert 0 <= fid["sign_agreement"] <= 1 and "top1_agreement" not in fid
    [gate] = report["gates"]
    assert gate["gate"] == "min_top1_agreement" and gate["value"] == fid["sign_agreement"] and gate["passed"]
    module = mmopt.load(path.parent / "out")
    assert module.classifier[1].out_features == 1
    assert "sign agreement" in (path.parent / "out" / "report.md").read_text()


def test_num_classes_and_builder_kwargs_are_taken_and_recorded(tmp_path, recipe_file):
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    path = recipe_file(f"""
model: {{source: torchvision, name: resnet18, weights: {weights}, num_classes: 7, kwargs: {{zero_init_residual: true}}}}
profile: {{batch_size: 2, image_size: 32}}
calibration: {{num_samples: 4, batch_size: 2}}
passes: [cast: {{dtype: bfloat16}}]
output: out
""")
    report = mmopt.optimize(path)
    assert 0 <= report["parts"]["visual"]["fidelity"]["top1_agreement"] <= 1
    manifest = json.loads((path.parent / "out" / "mmopt.json").read_text())
    assert manifest["architecture"]["kwargs"] == {"zero_init_residual": True, "num_classes": 7}
    assert mmopt.load(path.parent / "out").fc.out_features == 7


def test_a_head_of_another_shape_is_named_key_by_key(tmp_path):
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    weights = tmp_path / "mlp_head.pth"
    torch.save(model.state_dict(), weights)
    with pytest.raises(ModelSpecError) as info:
        TorchvisionAdapter().load(ModelSpec(source="torchvision", name="resnet18", weights=str(weights)))
    message = str(info.value)
    assert "fc.0.weight" in message and "fc.weight" in message and "\n" not in message
    assert "kwargs" in info.value.hint


def test_a_builder_keyword_it_does_not_take_is_one_line(tmp_path):
    with pytest.raises(ModelSpecError, match="unexpected keyword"):
        TorchvisionAdapter().load(ModelSpec(source="torchvision", name="resnet18", kwargs={"colour": "blue"}))


def test_num_classes_is_only_for_torchvision():
    with pytest.raises(ValueError, match="torchvision"):
        ModelSpec(source="open_clip", name="ViT-B-32", num_classes=3)


def test_a_whole_pickled_model_is_refused_without_unpickling_and_says_how_to_save(tmp_path, monkeypatch, capsys):
    weights = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(), weights)
    called = []
    monkeypatch.setattr(torchvision.models.ResNet, "__setstate__", lambda self, state: called.append(1),
                        raising=False)
    monkeypatch.setattr(sys, "argv", ["mmopt", "profile", "torchvision:resnet18", "--weights", str(weights)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and not called
    assert "whole pickled model (torchvision.models.resnet.ResNet)" in err and "state_dict()" in err
    assert "Traceback" not in err
