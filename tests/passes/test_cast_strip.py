"""cast and strip, through the whole optimize pipeline on tiny models, and back through mmopt.load."""
from __future__ import annotations

import json

import pytest
import torch

import mmopt


def test_cast_fp16_on_open_clip_visual_only(tiny_clip_name, recipe_file):
    path = recipe_file(f"""
model: {{source: open_clip, name: {tiny_clip_name}}}
profile: {{batch_size: 2}}
calibration: {{num_samples: 8, batch_size: 4}}
passes:
  - strip: {{keep: [visual]}}
  - cast: {{dtype: float16}}
gates: {{min_cosine: 0.99}}
output: out
""")
    report = mmopt.optimize(path)
    out = path.parent / "out"
    assert report["passed"] and report["random_weights"]
    visual = report["parts"]["visual"]
    assert visual["after"]["weight_bytes"] * 2 == pytest.approx(visual["before"]["weight_bytes"], rel=0.01)
    assert visual["fidelity"]["synthetic"] is True and visual["fidelity"]["mean_cosine"] > 0.99
    assert report["parts"]["text"]["after"]["removed"] is True
    assert report["memory_method"] == "estimated"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "mmopt.json", "report.json", "report.md",
                                                     "report.png", "shared.safetensors", "visual.safetensors"]
    module = mmopt.load(out)
    assert module.transformer is None and module.visual.conv1.weight.dtype == torch.float16
    saved = json.loads((out / "report.json").read_text())
    assert saved["parts"]["visual"]["after"]["params"] == visual["after"]["params"]


def test_strip_drops_bert_pooler_and_load_restores_that(tiny_bert_dir, recipe_file):
    path = recipe_file(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
profile: {{batch_size: 2, seq_len: 16}}
passes:
  - strip: {{}}
output: out
""")
    report = mmopt.optimize(path)
    assert report["passes"][0]["changed"][0]["module"] == "pooler"
    assert report["parts"]["text"]["after"]["params"] == report["parts"]["text"]["before"]["params"] - 32 * 32 - 32
    assert report["parts"]["text"]["fidelity"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert report["parts"]["text"]["fidelity"]["inputs"] == "bundled sample texts (64)"
    module = mmopt.load(path.parent / "out")
    assert module.pooler is None


def test_stock_loads_after_strip_heads_report_no_missing_weights(tiny_bert_dir, recipe_file, capfd, caplog):
    """transformers always builds BERT's pooler: the stock file keeps its original weights (cast like the rest), so
    AutoModel and SentenceTransformer load without a missing-weights report; mmopt's own load still drops it."""
    import logging

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path = recipe_file(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
profile: {{batch_size: 2, seq_len: 16}}
passes: [{{cast: {{dtype: bfloat16}}}}, {{strip: {{heads: true}}}}]
output: out
""")
    mmopt.optimize(path)
    out = path.parent / "out"
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        stock = AutoModel.from_pretrained(str(out))
        SentenceTransformer(str(out), device="cpu")
    captured = capfd.readouterr()
    said = (captured.out + captured.err + caplog.text).lower()
    assert not any(word in said for word in ("missing", "newly initialized", "load report", "unexpected")), said
    original = AutoModel.from_pretrained(str(tiny_bert_dir))
    assert torch.equal(stock.pooler.dense.weight, original.pooler.dense.weight.to(torch.bfloat16))
    assert mmopt.load(out).pooler is None


def test_resnet_features_bf16(recipe_file):
    path = recipe_file("""
model: {source: torchvision, name: resnet18}
profile: {batch_size: 2, image_size: 64}
calibration: {num_samples: 4, batch_size: 2}
passes:
  - strip: {features: true}
  - cast: {dtype: bfloat16}
output: out
""")
    report = mmopt.optimize(path)
    assert report["passes"][0]["changed"][0]["module"] == "fc"
    assert report["parts"]["visual"]["fidelity"]["mean_cosine"] > 0.98
    module = mmopt.load(path.parent / "out")
    assert isinstance(module.fc, torch.nn.Identity) and module.conv1.weight.dtype == torch.bfloat16


def test_strip_of_a_missing_part_is_a_user_error(tiny_bert_dir, recipe_file):
    from mmopt.errors import UserError

    path = recipe_file(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
passes:
  - strip: {{keep: [visual]}}
output: out
""")
    with pytest.raises(UserError, match="no part 'visual'"):     # found by validate, before the model loads
        mmopt.optimize(path)
    assert not (path.parent / "out").exists()
