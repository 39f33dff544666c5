"""method int4: GPTQ against round-to-nearest, the 4-bit Linear storage, the size budget, save / load / verify."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmopt import checkpoint, registry
from mmopt.core import ModelSpec
from mmopt.errors import DataError, RecipeError
from mmopt.memory import counting
from mmopt.modules.quantized import Int4Linear
from mmopt.passes import quantize
from mmopt.passes.base import Context
from mmopt.quant import gptq
from mmopt.recipe import parse_recipe


def _correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """Inputs like a layer's real ones: correlated channels of very different scales (what GPTQ exploits)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=gen) / width ** 0.5
    scales = torch.logspace(-1, 1, width)
    return (torch.randn(n, width, generator=gen) @ mixing) * scales


def test_gptq_output_error_is_below_round_to_nearest_at_the_same_group_size():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    x = _correlated_inputs(1024, 128, seed=1)
    h = x.T @ x / len(x)
    reference = x @ linear.weight.detach().T
    errors = {}
    for name, q in (("rtn", gptq.round_to_nearest(linear.weight, 32, h)), ("gptq", gptq.gptq(linear.weight, h, 32))):
        errors[name] = float((x @ q.dequantize().T - reference).pow(2).mean())
        # the error the pass ranks layers by is this output error over the output's energy
        assert q.rel_error == pytest.approx(errors[name] / float(reference.pow(2).mean()), rel=1e-3)
    assert errors["gptq"] < 0.7 * errors["rtn"]


def test_gptq_codes_are_4_bit_groups_whose_scale_survives_float16():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    x = _correlated_inputs(256, 64, seed=2)
    q = gptq.gptq(weight, x.T @ x, 16, act_order=True)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15 and q.codes.shape == (16, 64)
    assert q.scale.shape == q.zero.shape == (16, 4)
    assert torch.equal(q.scale, q.scale.half().float())       # codes were chosen against the stored scale


def test_int4_linear_packs_two_codes_a_byte_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 8)
    codes = torch.randint(0, 16, (8, 64), generator=gen, dtype=torch.uint8)
    scale = torch.rand(8, 2, generator=gen) + 0.1
    zero = torch.randint(0, 16, (8, 2), generator=gen, dtype=torch.uint8)
    layer = Int4Linear.from_codes(linear, codes, scale, zero, 32)
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == (8, 32)
    assert counting.logical_numel(layer.weight) == 8 * 64                 # counted as the weight it stands for
    expected = ((codes.float().reshape(8, 2, 32) - zero.float().unsqueeze(-1))
                * scale.half().float().unsqueeze(-1)).reshape(8, 64)
    torch.testing.assert_close(layer.dequantized(), expected)
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, expected, linear.bias))
    empty = Int4Linear.like(linear, 32)
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty(x), layer(x))


@pytest.mark.parametrize("width, asked, got", [(384, 64, 64), (16, 32, 16), (24, 32, 24), (144, 32, 24),
                                                (1280, 64, 64), (6, 32, None)])
def test_group_size_falls_back_to_a_divisor_of_the_input_width(width, asked, got):
    assert Int4Linear.group_for(nn.Linear(width, 4), asked) == got


def _tiny_bert(folder):
    return registry.adapter_for("hf").load(ModelSpec(source="hf", path=str(folder)))


def _apply(model, **options):
    model = copy.deepcopy(model)
    config = quantize.QuantizeConfig(**options)
    result = quantize.Quantize(config).apply(model, Context(adapter=registry.adapter_for(model.source)))
    return model, config, result


def test_int4_recipe_with_gptq_runs_end_to_end_and_the_output_loads_and_verifies(tiny_bert_dir, tmp_path):
    import mmopt

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: hf, path: {tiny_bert_dir}}}\noutput: out\nprofile: {{batch_size: 2}}\n"
                      "passes:\n  - quantize: {method: int4, algorithm: gptq, group_size: 16}\n")
    report = mmopt.optimize(recipe)
    out = tmp_path / "out"
    metrics = report["passes"][0]["metrics"]["text"]
    assert metrics["algorithm"] == "gptq" and metrics["int4_linear"] == 13 and metrics["int8_linear"] == 0
    assert metrics["calibration"].startswith("bundled sample texts")
    assert report["parts"]["text"]["fidelity"]["mean_cosine"] > 0.99
    assert "text.safetensors" in mmopt.api.verify(out)
    loaded = checkpoint.load_model(out)
    assert sum(isinstance(m, Int4Linear) for m in loaded.module.modules()) == 13    # 2 x 6 + the pooler


def test_auto_is_round_to_nearest_on_synthetic_inputs_and_gptq_refuses_them(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(tmp_path)       # no tokenizer: synthetic token ids
    bert = _tiny_bert(tmp_path)
    _, _, result = _apply(bert, method="int4", group_size=16)
    assert result.metrics["text"]["algorithm"] == "rtn" and "calibration" not in result.metrics["text"]
    with pytest.raises(DataError, match="algorithm gptq on part 'text' needs calibration data, got synthetic"):
        _apply(bert, method="int4", algorithm="gptq", group_size=16)
    biased = quantize.Quantize(quantize.QuantizeConfig(method="int8", bias_correction=True))
    with pytest.raises(DataError, match="bias_correction on part 'text' needs calibration data"):
        biased.check(bert, Context(adapter=registry.adapter_for("hf")))        # before anything is measured


def test_max_size_keeps_the_costliest_layers_int8_within_the_budget(tiny_bert_dir):
    bert = _tiny_bert(tiny_bert_dir)
    before = counting.part_weight_bytes(bert, "text")
    four, _, all4 = _apply(bert, method="int4", group_size=16)
    eight, _, _ = _apply(bert, method="int8")
    low, high = (counting.part_weight_bytes(m, "text") / before for m in (four, eight))
    budget = round((low + high) / 2, 4)
    mixed, _, result = _apply(bert, method="int4", group_size=16, max_size=budget)
    metrics = result.metrics["text"]
    assert 0 < metrics["int8_linear"] < 13 and metrics["max_size_met"]
    assert low < counting.part_weight_bytes(mixed, "text") / before <= budget
    assert metrics["size_ratio"] == round(counting.part_weight_bytes(mixed, "text") / before, 4)
    promoted = [c for c in result.changed if "within max_size" in c.after]
    assert len(promoted) == metrics["int8_linear"]
    assert type(mixed.module.get_submodule(promoted[0].module).weight).__name__ == "Int8Tensor"


def test_budget_choice_takes_most_error_per_byte_and_skips_what_does_not_fit():
    from mmopt.quant.plan import int8_within

    candidates = {"a": (0.010, 100), "b": (0.030, 400), "c": (0.002, 10), "d": (0.5, 1000)}
    # error per byte: c 2e-4, a 1e-4, b 7.5e-5, d 5e-4 -> d does not fit in 520, then c, a, b (b: 110 + 400 = 510)
    assert int8_within(candidates, 520) == ["c", "a", "b"]
    assert int8_within(candidates, 5) == []


def test_int4_on_a_cnn_covers_1x1_convolutions_and_reloads(tmp_path):
    torch.manual_seed(0)
    adapter = registry.adapter_for("torchvision")
    model = adapter.build({"name": "mobilenet_v2", "kwargs": {"width_mult": 0.25, "num_classes": 10}},
                          {"image_size": 32}, {})
    quantized, config, result = _apply(model, method="int4", group_size=32)
    assert result.metrics["visual"]["algorithm"] == "rtn"        # synthetic images: no calibration
    four = [n for n, m in quantized.module.named_modules() if isinstance(m, Int4Linear)]
    assert "classifier.1" in four and any(n.endswith(".linear") for n in four)   # 1x1 convs as PatchLinear
    depthwise = quantized.module.features[1].conv[0][0]
    assert torch.nn.utils.parametrize.is_parametrized(depthwise, "weight")        # int8 per output channel
    passes = [{"name": "quantize", "config": config.model_dump(mode="json"), "record": result.record}]
    checkpoint.write_checkpoint(quantized, adapter, tmp_path, {"source": "torchvision", "name": "mobilenet_v2"},
                                passes)
    reloaded = checkpoint.load_model(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(x), quantized.module(x))


@pytest.mark.parametrize("options, message", [
    ("{method: nf4, algorithm: gptq}", "algorithm goes with method int8 or int4"),
    ("{method: nf4, max_size: 0.2}", "max_size goes with method int4"),
    ("{method: int8, max_size: 0.2}", "max_size goes with method int4"),
    ("{method: int4, algorithm: awq}", "passes[0].quantize.algorithm"),
    ("{method: int4, max_size: 1.5}", "passes[0].quantize.max_size"),
    ("{method: nf4, bias_correction: true}", "bias_correction goes with method int8 or int4"),
])
def test_bad_int4_options_fail_in_the_recipe(options, message):
    text = f"model: {{source: open_clip, name: ViT-B-32}}\noutput: out\npasses:\n  - quantize: {options}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, where="r.yaml")
    assert message in err.value.message and "\n" not in err.value.message


def test_output_shift_is_the_mean_change_of_a_grouped_convolution():
    from mmopt.quant.bias import output_shift

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, groups=4, bias=False)
    quantized = conv.weight.detach() + 0.05 * torch.randn_like(conv.weight)
    mean = torch.randn(8)
    x = mean[None, :, None, None].expand(1, 8, 5, 5)          # every tap sees the channel mean
    change = nn.functional.conv2d(x, quantized, groups=4) - conv(x)
    torch.testing.assert_close(output_shift(conv.weight, quantized, mean, groups=4), change[0, :, 0, 0].detach())
    linear = nn.Linear(6, 3)
    shifted = linear.weight.detach() + 0.1
    torch.testing.assert_close(output_shift(linear.weight, shifted, mean[:6]), 0.1 * mean[:6].sum().expand(3))


def _tiny_cnn_with_images(folder):
    """A random-weights MobileNetV2 (width 0.25) and a calibration of 4 random images."""
    from mmopt.calibration import Calibration
    from tests.conftest import noise_images

    noise_images(folder / "images", 4)
    torch.manual_seed(0)
    model = registry.adapter_for("torchvision").build(
        {"name": "mobilenet_v2", "kwargs": {"width_mult": 0.25, "num_classes": 10}}, {"image_size": 32}, {})
    return model, Calibration(images_dir=folder / "images", batch_size=4, cache=False, num_workers=0)


def _quantize_write_reload(model, calibration, folder, **options):
    """``model`` quantized with ``options`` on ``calibration``, written to ``folder / "out"`` and loaded back:
    (quantized, reloaded, result)."""
    adapter = registry.adapter_for(model.source)
    config = quantize.QuantizeConfig(**options)
    quantized = copy.deepcopy(model)
    result = quantize.Quantize(config).apply(quantized, Context(adapter=adapter, calibration=calibration))
    passes = [{"name": "quantize", "config": config.model_dump(mode="json"), "record": result.record}]
    (folder / "out").mkdir()
    checkpoint.write_checkpoint(quantized, adapter, folder / "out", {"source": "torchvision",
                                                                     "name": "mobilenet_v2"}, passes)
    return quantized, checkpoint.load_model(folder / "out"), result


def test_bias_correction_adds_biases_to_a_cnn_and_they_reload(tmp_path):
    model, calibration = _tiny_cnn_with_images(tmp_path)
    quantized, reloaded, result = _quantize_write_reload(model, calibration, tmp_path, method="int8",
                                                         bias_correction=True)
    assert result.metrics["visual"]["bias_corrected"] == 53                   # 52 convolutions + the classifier
    assert len(result.record["bias_added"]) == 52 and quantized.module.features[1].conv[0][0].bias is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(x), quantized.module(x))
        assert not torch.equal(quantized.module(x), _apply(model, method="int8")[0].module(x))


def test_int8_gptq_codes_every_layer_of_a_cnn_in_the_same_storage_and_reload(tmp_path):
    model, calibration = _tiny_cnn_with_images(tmp_path)
    quantized, reloaded, result = _quantize_write_reload(model, calibration, tmp_path, method="int8",
                                                         algorithm="gptq")
    metrics = result.metrics["visual"]
    assert metrics["algorithm"] == "gptq" and metrics["calibration"] == "calibration images (4)"
    assert "int8 codes by GPTQ" in quantize.Quantize(quantize.QuantizeConfig(method="int8")).brief(metrics)
    # every convolution (first, depthwise; 1x1 as PatchLinear) and the classifier: 52 + 1 layers, none rounded
    coded = [c for c in result.changed if "int8" in c.after]
    assert len(coded) == 53 and all("gptq" in c.after for c in coded)
    rtn = _apply(model, method="int8")[0]
    codes = {name: m.module.get_submodule("features.1.conv.0.0").parametrizations.weight      # a depthwise conv
             for name, m in (("gptq", quantized), ("rtn", rtn))}
    torch.testing.assert_close(codes["gptq"][0].scale, codes["rtn"][0].scale)      # the storage is unchanged
    assert codes["gptq"].original0.dtype == torch.int8
    assert not torch.equal(codes["gptq"].original0, codes["rtn"].original0)         # the codes are not
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(x), quantized.module(x))


def test_part_output_errors_rank_by_what_reaches_the_output_and_leave_the_model_as_it_was(tiny_bert_dir):
    from mmopt.quant.plan import part_output_errors, plan_codes

    bert = _tiny_bert(tiny_bert_dir)
    ctx = Context(adapter=registry.adapter_for("hf"))
    linears = {name: m for name, m in bert.named_modules("text") if isinstance(m, nn.Linear)}
    codes = plan_codes(bert, "text", linears, {}, True, 16, ctx)
    batch = ctx.adapter.tokenize(bert, ["a sentence", "another one"], 16)
    with torch.no_grad():
        before = ctx.adapter.run(bert, "text", batch)
        errors = part_output_errors(bert, "text", codes, list(linears), ctx)
        torch.testing.assert_close(ctx.adapter.run(bert, "text", batch), before, rtol=0, atol=0)
    pooler = [name for name in errors if "pooler" in name]
    assert pooler and all(errors[name] == 0 for name in pooler)          # mean pooling never reads the pooler
    assert all(errors[name] > 0 for name in errors if name not in pooler)
    _, _, result = _apply(bert, method="int4", group_size=16, max_size=0.5)
    assert any("4-bit part output error" in c.after for c in result.changed)
