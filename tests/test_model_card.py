"""The output folder as a Hugging Face user meets it: a model card saying what mmopt did (over the original's,
whose metadata and text are kept), and no absolute path of the machine that made it."""
from __future__ import annotations

import json
import shutil

import mmopt

ORIGINAL = "---\nlicense: apache-2.0\ntags:\n- sentence-transformers\n---\n# tiny-bert\n\nThe original card text.\n"


def test_output_has_a_card_saying_what_mmopt_did_and_no_absolute_source_path(tiny_bert_dir, tmp_path):
    source = tmp_path / "my-encoder"
    shutil.copytree(tiny_bert_dir, source)
    (source / "README.md").write_text(ORIGINAL)
    (tmp_path / "r.yaml").write_text("""
model: {source: hf, path: my-encoder}
profile: {batch_size: 2, seq_len: 16}
calibration: {num_samples: 8}
passes: [{cast: {dtype: bfloat16}}, {strip: {heads: true}}]
output: out
""")
    mmopt.optimize(tmp_path / "r.yaml")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\ntags:\n- mmopt\n- sentence-transformers\n---\n")
    for words in ("# Optimized by mmopt", '`cast` {dtype: "bfloat16"}', "`strip`", "## Sizes", "| text |",
                  "## Fidelity", "## The original model card", "The original card text."):
        assert words in card, words
    assert card.index("## Sizes") < card.index("## The original model card")
    manifest = json.loads((tmp_path / "out" / "mmopt.json").read_text())
    assert manifest["architecture"]["config"]["_name_or_path"] == "my-encoder"
    config = (tmp_path / "out" / "config.json").read_text()
    assert str(tmp_path) not in config and str(tmp_path) not in json.dumps(manifest["architecture"])
