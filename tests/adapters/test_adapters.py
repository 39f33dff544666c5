"""Each adapter: parts cover the weights, example inputs run to (batch, dim) embeddings, errors are one line."""
from __future__ import annotations

import pytest

from mmopt import registry
from mmopt.core import ModelSpec, Shapes
from mmopt.errors import ModelSpecError, UserError


def load(source, **kw):
    adapter = registry.adapter_for(source)
    return adapter, adapter.load(ModelSpec(source=source, **kw))


def assert_parts_cover_state(model, allowed_shared=()):
    for key in model.module.state_dict():
        part = model.part_of(key)
        assert part is not None or key in allowed_shared, key


def test_open_clip_parts_and_embeddings(tiny_clip_name):
    adapter, model = load("open_clip", name=tiny_clip_name)
    assert model.parts == ["visual", "text"] and model.random_weights
    assert_parts_cover_state(model, allowed_shared=("logit_scale",))
    img = adapter.example_inputs(model, "visual", Shapes(batch_size=3))
    assert tuple(img[0].shape) == (3, 3, 32, 32)
    assert tuple(adapter.run(model, "visual", img).shape) == (3, 32)
    txt = adapter.example_inputs(model, "text", Shapes(batch_size=2))
    assert tuple(txt[0].shape) == (2, 16)                 # open_clip text always runs at its context length
    assert tuple(adapter.run(model, "text", txt).shape) == (2, 32)


def test_hf_bert_keeps_sentence_transformers_pooling(tiny_bert_dir):
    adapter, model = load("hf", path=str(tiny_bert_dir))
    assert model.parts == ["text"] and not model.random_weights
    assert model.info["pooling"] == "mean" and model.info["normalize"] is True
    ids = adapter.tokenize(model, ["hello there", "a longer sentence with more words"], 32)
    emb = adapter.run(model, "text", ids)
    assert tuple(emb.shape) == (2, 32)


def test_hf_clip_has_two_towers(tiny_hf_clip_dir):
    adapter, model = load("hf", path=str(tiny_hf_clip_dir))
    assert model.parts == ["visual", "text"]
    assert_parts_cover_state(model, allowed_shared=("logit_scale",))
    out = adapter.run(model, "visual", adapter.example_inputs(model, "visual", Shapes(batch_size=2)))
    assert tuple(out.shape) == (2, 16)
    out = adapter.run(model, "text", adapter.example_inputs(model, "text", Shapes(batch_size=2, seq_len=8)))
    assert tuple(out.shape) == (2, 16)


def test_torchvision_features_after_head_removal():
    adapter, model = load("torchvision", name="resnet18")
    assert adapter.drop_unused_heads(model, features=True) == ["fc"]
    out = adapter.run(model, "visual", adapter.example_inputs(model, "visual", Shapes(batch_size=2, image_size=64)))
    assert tuple(out.shape) == (2, 512)


@pytest.mark.parametrize("source, kw, expected", [
    ("hf", {"path": "sentence-transformers/all-MiniLM-L6-v2"}, "looks like a hub id"),
    ("hf", {"path": "/nonexistent/folder"}, "path does not exist"),
    ("open_clip", {"name": "ViT-B-33"}, "unknown open_clip architecture 'ViT-B-33'"),
    ("torchvision", {"name": "resnet51"}, "unknown torchvision classification model 'resnet51'"),
])
def test_bad_model_specs_are_one_line(source, kw, expected):
    with pytest.raises(ModelSpecError) as info:
        load(source, **kw)
    assert expected in info.value.message and "\n" not in info.value.message


def test_weights_that_do_not_fit_are_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelSpecError, match="weights do not fit"):
        load("torchvision", name="resnet18", weights=str(tmp_path / "w.safetensors"))
    (tmp_path / "notes.pt").write_text("not weights at all")
    with pytest.raises(ModelSpecError, match="not a safetensors or weights-only torch checkpoint"):
        load("torchvision", name="resnet18", weights=str(tmp_path / "notes.pt"))


def test_weights_only_torch_checkpoint_loads(tmp_path):
    import torch
    import torchvision

    net = torchvision.models.resnet18()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "r18.pth")
    _, model = load("torchvision", name="resnet18", weights=str(tmp_path / "r18.pth"))
    assert not model.random_weights
    assert torch.equal(model.module.conv1.weight, net.conv1.weight)


def test_each_adapter_reads_its_own_command_line_spec():
    assert registry.adapter_for("open_clip").parse_spec("ViT-B-32", "w.pt") == \
        ModelSpec(source="open_clip", name="ViT-B-32", weights="w.pt")
    assert registry.adapter_for("torchvision").parse_spec("resnet50", None) == \
        ModelSpec(source="torchvision", name="resnet50")
    assert registry.adapter_for("hf").parse_spec("./minilm", None) == ModelSpec(source="hf", path="./minilm")
    with pytest.raises(UserError, match="--weights is for open_clip and torchvision models"):
        registry.adapter_for("hf").parse_spec("./minilm", "w.pt")


def test_quantization_layouts_carry_the_family_knowledge(tiny_clip_name, tiny_bert_dir):
    from open_clip.transformer import Attention
    from torch import nn

    from mmopt.modules.attention import HeadSlicedAttention

    adapter, clip = load("open_clip", name=tiny_clip_name)
    layout = adapter.quantization_layout(clip)
    assert layout.structural and layout.bare_weights == {
        "visual.proj": "projection", "text_projection": "projection",
        "visual.positional_embedding": "table", "positional_embedding": "table"}
    # the filter names open_clip's own fused attention; torch's MultiheadAttention needs no filter
    assert layout.fused_attention(Attention(32, 4))
    assert not layout.fused_attention(nn.MultiheadAttention(32, 4))
    assert not layout.fused_attention(HeadSlicedAttention(32, 2, 16, batch_first=True))
    hf_adapter, bert = load("hf", path=str(tiny_bert_dir))
    hf_layout = hf_adapter.quantization_layout(bert)
    assert not hf_layout.structural and not hf_layout.fused_attention(Attention(32, 4))
    # only Hugging Face text encoders take each other's token ids
    assert hf_adapter.shares_text_inputs(bert, bert) and not adapter.shares_text_inputs(clip, clip)
