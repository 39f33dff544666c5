"""End-to-end truth on the real all-MiniLM-L6-v2: the fp16 demo recipe, checked by sentence-transformers."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import mmopt

SENTENCES = ["The weather is lovely today.", "He drove to the stadium.", "A cat sleeps on the sofa.",
             "Quarterly revenue grew by eight percent.", "How do I renew my passport?"]


@pytest.mark.slow
def test_fp16_demo_recipe_loads_in_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from tests.conftest import minilm_folder

    recipe = tmp_path / "minilm-fp16.yaml"
    shutil.copy2(Path(__file__).parents[1] / "configs" / "minilm-fp16.yaml", recipe)
    report = mmopt.optimize(recipe)
    out = tmp_path / "out" / "minilm-fp16"
    assert report["passed"] and not report["random_weights"]
    text = report["parts"]["text"]
    assert text["fidelity"]["mean_cosine"] >= 0.999
    assert text["after"]["checkpoint_bytes"] < 0.51 * text["before"]["checkpoint_bytes"]

    original = SentenceTransformer(str(minilm_folder()), device="cpu")
    optimized = SentenceTransformer(str(out), device="cpu")
    a = original.encode(SENTENCES, convert_to_tensor=True).float()
    b = optimized.encode(SENTENCES, convert_to_tensor=True).float()
    assert torch.nn.functional.cosine_similarity(a, b).mean() >= 0.999

    module = mmopt.load(out)
    assert next(module.parameters()).dtype == torch.float16 and module.pooler is None
