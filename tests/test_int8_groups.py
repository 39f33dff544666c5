"""int8 with one float16 scale per group of a row (``int8_group_size``): the group rule, GPTQ's codes in groups,
and a torchvision model written and reloaded with its Linear layers and convolutions in groups."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmopt import checkpoint, registry
from mmopt.core import Model, ModelSpec
from mmopt.errors import UnsupportedError
from mmopt.modules.quantized import Int8Channels, Int8Groups, int8_channels_on, int8_group_for, int8_rows_of
from mmopt.passes import quantize
from mmopt.passes.base import Context
from mmopt.quant import gptq


@pytest.mark.parametrize("width, group_size, expected", [
    (64, 16, 16), (24, 16, 12), (27, 16, 9), (9, 16, None), (16, 16, None), (17, 8, None), (960, 8, 8),
    (64, None, None),
])
def test_a_row_gets_the_largest_divisor_down_to_half_the_group_size(width, group_size, expected):
    assert int8_group_for(width, group_size) == expected


def _skewed_inputs(n: int, width: int) -> torch.Tensor:
    """Inputs whose channels differ in size by 100x: what makes one scale per row coarse for the small ones."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, width, generator=gen) * torch.logspace(-1, 1, width)


def test_gptq_in_groups_stores_float16_group_scales_and_lowers_the_output_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight[:, :8] *= 20            # a few large weights per row set the row's scale
    x = _skewed_inputs(512, 64)
    hessian = x.T @ x / len(x)
    rows, groups = gptq.gptq_int8(linear.weight, hessian), gptq.gptq_int8(linear.weight, hessian, group_size=8)
    assert groups.scale.shape == (24, 8) and groups.scale.dtype == torch.float16 and groups.group_size == 8
    assert int(groups.codes.abs().max()) <= 127
    assert groups.rel_error < 0.25 * rows.rel_error
    # what the pass stores is exactly the codes times their group's scale
    stored = int8_rows_of(linear.weight, groups).dequantize()
    expected = (groups.codes.float().reshape(24, 8, 8) * groups.scale.float().unsqueeze(-1)).reshape(24, 64)
    assert torch.equal(stored, expected)


def test_a_convolution_takes_gptq_group_codes_and_keeps_short_filters_per_channel():
    torch.manual_seed(0)
    dense, depthwise = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(4, 3, 12, 12)
    stat = gptq.collect({"c": dense}, lambda batch: dense(batch[0]), [(x,)])
    codes = gptq.gptq_int8(dense.weight, stat.of("c"), group_size=int8_group_for(27, 16))
    int8_channels_on(dense, codes, group_size=16)
    int8_channels_on(depthwise, group_size=16)
    assert isinstance(dense.parametrizations.weight[0], Int8Groups)
    assert isinstance(depthwise.parametrizations.weight[0], Int8Channels)        # 9 values: one scale
    expected = (codes.codes.float().reshape(8, 3, 9) * codes.scale.float().unsqueeze(-1)).reshape(8, 3, 3, 3)
    assert torch.equal(dense.weight, expected)


def _mobilenet() -> Model:
    torch.manual_seed(0)
    return registry.adapter_for("torchvision").load(ModelSpec(source="torchvision", name="mobilenet_v2",
                                                              num_classes=10))


def test_a_torchvision_model_in_int8_groups_is_written_and_reloaded_exactly(tmp_path):
    model, adapter = _mobilenet(), registry.adapter_for("torchvision")
    sizes = {}
    for label, options in (("rows", {"method": "int8"}), ("groups", {"method": "int8", "int8_group_size": 9})):
        quantized = copy.deepcopy(model)
        result = quantize.Quantize(quantize.QuantizeConfig(**options)).apply(quantized, Context(adapter=adapter))
        passes = [{"name": "quantize", "config": quantize.QuantizeConfig(**options).model_dump(mode="json"),
                   "record": result.record}]
        folder = tmp_path / label
        folder.mkdir()
        checkpoint.write_checkpoint(quantized, adapter, folder, {"source": "torchvision"}, passes)
        sizes[label] = (folder / "visual.safetensors").stat().st_size
        reloaded = checkpoint.load_model(folder)
        x = torch.randn(2, 3, 64, 64)
        with torch.inference_mode():
            assert torch.equal(quantized.module(x), reloaded.module(x))
    # 9: the first conv's 27 filter values in groups of 9, the 1280 classifier inputs in groups of 8
    first = reloaded.module.features[0][0].parametrizations.weight[0]
    assert isinstance(first, Int8Groups) and first.group_size == 9 and first.scale.dtype == torch.float16
    classifier = reloaded.module.classifier[1].weight
    assert type(classifier).__name__ == "Int8Tensor" and classifier.block_size == [1, 8]
    assert any("a scale per 8 inputs" in change.after for change in result.changed)
    assert any("a scale per 9 filter values" in change.after for change in result.changed)
    # 1280 x 10 classifier, 1x1 layers and the first conv: a float16 scale per 8 values more than per row
    assert sizes["rows"] * 1.1 < sizes["groups"] < sizes["rows"] * 1.5


def test_a_stock_hugging_face_folder_refuses_int8_groups(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(tmp_path / "bert")
    adapter = registry.adapter_for("hf")
    bert = adapter.load(ModelSpec(source="hf", path=str(tmp_path / "bert")))
    with pytest.raises(UnsupportedError, match="int8_group_size needs mmopt's own format"):
        quantize.Quantize(quantize.QuantizeConfig(int8_group_size=16)).apply(bert, Context(adapter=adapter))
