"""mmopt profile: byte-exact traces, training estimates, budget search, offload, frames, what-if, CLI errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from mmopt import api
from mmopt.core import Model, ModelSpec, Shapes
from mmopt.memory import counting, tracing, training
from mmopt.memory.estimator import Estimator, search_batch
from mmopt.memory.profile import ProfileRequest
from mmopt.registry import adapter_for


# --- tiny models -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_resnet() -> Model:
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return Model(module=ResNet(BasicBlock, [1, 1, 1, 1]).eval(), source="torchvision",
                 arch={"name": "resnet18", "kwargs": {}}, parts=["visual"], preprocess={"image_size": 32},
                 info={"part_prefixes": {"visual": [""]}})


def tiny_clip() -> Model:
    import open_clip

    from mmopt.adapters.open_clip import CLIP_TEXT

    torch.manual_seed(0)
    module = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(width=32, layers=2, patch_size=8, image_size=32,
                                                                head_width=16),
                                  text_cfg=dict(width=32, layers=2, heads=2, vocab_size=64, context_length=16))
    return Model(module=module.eval(), source="open_clip", arch={"name": "ViT-B-32", "config": {}},
                 parts=["visual", "text"], preprocess={"image_size": 32, "context_length": 16},
                 info={"part_prefixes": {"visual": ["visual."], "text": list(CLIP_TEXT)}})


def estimator(model: Model, part: str = "visual", **options) -> Estimator:
    return Estimator(model, adapter_for(model.source), part, ProfileRequest(model="tiny", **options))


# --- byte-exact ------------------------------------------------------------------------------------------

def test_linear_weight_bytes_by_hand():
    lin = nn.Linear(3, 4)
    assert counting.module_weight_bytes(lin) == 64                      # (12 + 4) * 4
    assert counting.quantized_weight_bytes(lin, "int8") == 12 + 4 * 4 + 16   # int8 weight, a scale per row, bias
    # nf4: 12 half-bytes, one 8-bit absmax for the 64-block, one float32 for the 256-group; bias kept
    assert counting.quantized_weight_bytes(lin, "nf4") == 6 + 1 + 4 + 16
    assert counting.quantized_weight_bytes(lin, "nf4", keep_dtype="float16") == 6 + 1 + 4 + 8
    assert counting.cast_weight_bytes(list(lin.parameters()), torch.float16) == 32


def test_inference_trace_of_a_known_sequence():
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    trace = tracing.trace_forward(lambda m, t: m(t), seq, (x,), modules=[n for n, _ in seq.named_children()])
    # Linear out (2x4 fp32 = 32 B) and ReLU out (32 B) are alive together; the last Linear's 16 B come after.
    assert trace.peak_bytes == 64
    assert trace.module_peaks == {"0": 32, "1": 32, "2": 16}
    assert tracing.trace_forward(lambda m, t: m[0](t), seq, (x,)).peak_bytes == 32
    assert seq[0].weight.device.type == "cpu" and not isinstance(seq[0].weight, torch._subclasses.FakeTensor)


def test_offload_trace_by_hand():
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    trace = tracing.trace_forward(lambda m, t: m(t), seq, (torch.randn(1, 4),), blocks=["0", "1"])
    # During block 1: its weights (80 B) + block 0's output (16 B) + its own output (16 B).
    assert trace.offload_peak_bytes == 112
    assert trace.offload_block_bytes == 80 and trace.resident_bytes == 0


# --- training --------------------------------------------------------------------------------------------

def test_adamw_exceeds_sgd_by_the_optimizer_state():
    lin = nn.Linear(3, 4)
    x = torch.randn(1000, 3)

    def step(m, t):
        m(t).mean().backward()

    adamw = training.trace_train(step, lin, (x,), training.make_optimizer("adamw"))
    sgd = training.trace_train(step, lin, (x,), training.make_optimizer("sgd"))
    extra = training.optimizer_state_bytes(lin, "adamw") - training.optimizer_state_bytes(lin, "sgd")
    assert extra == 64 + 2 * 4                       # a second moment per weight + a float32 step per tensor
    assert adamw.peak_total_bytes - sgd.peak_total_bytes == extra
    assert adamw.breakdown["weights"] == 64 and adamw.breakdown["inputs"] == 12000
    assert lin.weight.grad is None and not isinstance(lin.weight, torch._subclasses.FakeTensor)


def test_training_estimate_is_consistent_on_bert(bert_folder):
    adapter = adapter_for("hf")
    model = adapter.load(ModelSpec(source="hf", path=str(bert_folder)))
    shapes = Shapes(batch_size=8, seq_len=64)
    est = estimator(model, "text", train=True)
    base = est.training(shapes)
    sgd = est.training(shapes, optimizer="sgd")
    bf16 = est.training(shapes, amp="bf16")
    ckpt = est.training(shapes, grad_ckpt=True)
    weights = counting.part_weight_bytes(model, "text")
    assert base["breakdown"]["weights"] == weights
    assert base["peak_total_bytes"] > weights + training.optimizer_state_bytes(model.module, "adamw")
    assert sgd["peak_total_bytes"] < base["peak_total_bytes"]
    assert bf16["amp"] == "bf16" and bf16["peak_total_bytes"] != base["peak_total_bytes"]
    assert ckpt["grad_ckpt"] and ckpt["breakdown"]["activations"] < base["breakdown"]["activations"]
    assert ckpt["peak_total_bytes"] < base["peak_total_bytes"]
    assert not model.module.training and all(p.grad is None for p in model.module.parameters())


def test_grad_checkpointing_lowers_activations_on_open_clip_and_torchvision():
    # shapes where activations, not the optimizer step, make the peak
    for model, shapes in ((tiny_clip(), Shapes(batch_size=4)), (tiny_resnet(), Shapes(batch_size=16, image_size=160))):
        est = estimator(model, "visual", train=True, optimizer="sgd")
        plain = est.training(shapes)
        ckpt = est.training(shapes, grad_ckpt=True)
        assert ckpt["grad_ckpt"]
        assert ckpt["peak_total_bytes"] < plain["peak_total_bytes"], model.source


def test_training_counts_only_the_part(bert_folder):
    model = tiny_clip()
    est = estimator(model, "visual", train=True)
    out = est.training(Shapes(batch_size=2))
    assert out["breakdown"]["weights"] == counting.part_weight_bytes(model, "visual")


# --- budget ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("guess", [1, 5, 128, 129, 400])
def test_search_batch_finds_the_edge(guess):
    def cost(b):
        return 100 + 7 * b

    assert search_batch(cost, 1000, guess=guess) == (128, 129)


def test_budget_returns_largest_fitting_batch():
    model = tiny_resnet()
    est = estimator(model)
    shapes = Shapes(batch_size=1)
    budget = est.total(dataclasses.replace(shapes, batch_size=37)) + 1
    fit = est.fit_budget(shapes, budget)
    assert est.total(dataclasses.replace(shapes, batch_size=fit["batch_size"])) <= budget
    assert est.total(dataclasses.replace(shapes, batch_size=fit["batch_size"] + 1)) > budget
    assert fit["batch_size"] >= 37 and fit["next_batch_bytes"] > budget


def test_budget_below_weights_names_the_smallest_footprint():
    from mmopt.errors import UnsupportedError

    est = estimator(tiny_resnet())
    with pytest.raises(UnsupportedError, match="below the weights alone.*smallest footprint.*nf4"):
        est.fit_budget(Shapes(), 1000)


# --- offload, frames, what-if ----------------------------------------------------------------------------

def test_offload_lowers_the_gpu_peak():
    model = tiny_resnet()
    est = estimator(model, offload="cpu")
    out = est.describe(Shapes(batch_size=2), None)
    off = out["offload"]
    assert off["largest_block"] == "layer4.0" and off["blocks"] == 7   # conv1, bn1, 4 stage blocks, fc
    assert off["largest_block_bytes"] <= off["gpu_peak_bytes"] < off["without_offload_bytes"]
    assert "moves to the GPU" in off["model"] or "move to the GPU" in off["model"]


def test_frames_in_windows_need_less_than_all_at_once():
    est = estimator(tiny_resnet(), frames=16, window=4)
    fr = est.frames(Shapes(), 16, 4)
    assert fr["windows"] == 4 and fr["embedding_bytes_per_frame"] == 1000 * 4
    assert fr["windowed_bytes"] < fr["all_at_once_bytes"]


def test_what_if_table(bert_folder):
    model = tiny_resnet()
    est = estimator(model, what_if=True)
    out = est.describe(Shapes(batch_size=8, image_size=64), None)
    rows = out["what_if"]
    names = [r["technique"] for r in rows]
    assert names[0] == "as profiled"
    for wanted in ("float16 weights", "bfloat16 weights", "int8 weights", "nf4 weights", "batch 4",
                   "gradient checkpointing", "AMP bf16", "CPU offload", "streaming frames (window 2)",
                   "resolution 32px"):
        assert wanted in names, wanted
    savings = [r["saving_bytes"] for r in rows[1:] if r["saving_bytes"] is not None]
    assert savings == sorted(savings, reverse=True)
    fp16 = next(r for r in rows if r["technique"] == "float16 weights")
    assert fp16["how"].startswith("cast pass") and fp16["saving_bytes"] > 0
    nf4 = next(r for r in rows if r["technique"] == "nf4 weights")
    int8 = next(r for r in rows if r["technique"] == "int8 weights")
    assert nf4["peak_total_bytes"] < int8["peak_total_bytes"] and "weights only" in nf4["note"]
    assert rows[-1]["peak_total_bytes"] is None   # rows that do not apply come last


def test_what_if_in_training(bert_folder):
    out = api.profile(str(bert_folder), batch_size=4, seq_len=8, train=True, what_if=True)
    names = [r["technique"] for r in out["parts"]["text"]["what_if"]]
    for wanted in ("AMP bf16", "AMP fp16", "SGD instead of AdamW", "gradient checkpointing", "batch 2"):
        assert wanted in names


# --- API and CLI -----------------------------------------------------------------------------------------

def test_profile_api_train_json(bert_folder):
    out = api.profile(str(bert_folder), batch_size=2, seq_len=16, train=True, grad_ckpt=True)
    part = out["parts"]["text"]
    assert out["mode"] == "train" and out["peak_total_bytes"] == part["train"]["peak_total_bytes"]
    assert part["train"]["breakdown"]["optimizer_states"] >= 2 * part["weights_bytes"]
    assert part["tree"][0]["weights_bytes"] >= part["tree"][-1]["weights_bytes"]
    json.dumps(out)


def test_profile_reports_the_figures_optimize_measures(bert_folder):
    out = api.profile(str(bert_folder), batch_size=2, seq_len=16)
    part = out["parts"]["text"]
    assert out["model"] == str(bert_folder) and out["random_weights"] is False and out["dtype"] == "float32"
    assert out["method"] == part["method"] == tracing.ESTIMATED
    assert out["shapes"] == {"batch_size": 2, "image_size": None, "seq_len": 16}
    # 22,368 float32 parameters: embeddings 4,224, two layers of 8,544 each, the pooler 1,056
    assert part["params"] == 22_368 and part["weights_bytes"] == out["weights_bytes"] == 4 * 22_368
    assert part["input_bytes"] == 2 * (2 * 16 * 8)              # token ids and attention mask, int64
    assert [row["module"] for row in part["modules"]] == ["encoder", "embeddings", "pooler"]
    # the peak optimize puts in its report for this part at these shapes: one tracer for both commands
    adapter = adapter_for("hf")
    model = adapter.load(ModelSpec(source="hf", path=str(bert_folder)))
    runtime = tracing.part_runtime(model, adapter, "text", Shapes(batch_size=2, seq_len=16), latency="off")
    assert part["peak_activation_bytes"] == runtime["peak_activation_bytes"] == out["peak_activation_bytes"] > 0
    assert runtime["memory_how"] == "fake-tensor trace" and runtime["input_bytes"] == part["input_bytes"]
    assert out["peak_total_bytes"] == part["weights_bytes"] + part["input_bytes"] + part["peak_activation_bytes"]


def run_cli(args, capsys):
    import sys

    from mmopt import cli

    old = sys.argv
    sys.argv = ["mmopt", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "adam", "--train"], "error: --optimizer: expected adamw or sgd, got 'adam'\n"),
    (["--frames", "2", "--window", "4"], "error: --frames (2) is smaller than --window (4): "
                                         "a window cannot hold more frames than the video has\n"),
    (["--grad-ckpt"], "error: --grad-ckpt applies to training: add --train\n"),
    (["--budget", "lots"], "error: --budget: expected a size such as 200MiB (units B, KiB, MiB, GiB), "
                           "got 'lots'\n"),
    (["--offload", "disk"], "error: --offload: expected cpu, got 'disk'\n"),
])
def test_cli_bad_options_exit_2(bert_folder, capsys, args, message):
    code, out, err = run_cli(["profile", str(bert_folder), *args], capsys)
    assert code == 2 and out == "" and err == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cli_measure_without_cuda(bert_folder, capsys):
    code, out, err = run_cli(["profile", str(bert_folder), "--measure"], capsys)
    assert code == 2 and err.startswith("error: --measure needs CUDA, and no CUDA device is available here\n")


def test_cli_budget_below_weights(bert_folder, capsys):
    code, out, err = run_cli(["profile", str(bert_folder), "--budget", "1KiB"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "below the weights alone" in err and "smallest footprint reachable" in err and "nf4" in err


def test_cli_frames_on_text_part(bert_folder, capsys):
    code, _, err = run_cli(["profile", str(bert_folder), "--part", "text", "--frames", "8", "--window", "2"],
                           capsys)
    assert code == 2 and err == "error: --frames needs an image part; 'text' takes text\n"


def test_cli_budget_json(bert_folder, capsys):
    code, out, _ = run_cli(["profile", str(bert_folder), "--seq-len", "16", "--budget", "4MiB", "--json"], capsys)
    data = json.loads(out)
    budget = data["parts"]["text"]["budget"]
    assert code == 0 and budget["peak_total_bytes"] <= 4 * 2**20 < budget["next_batch_bytes"]


def test_cli_table_output(bert_folder, capsys):
    code, out, _ = run_cli(["profile", str(bert_folder), "--seq-len", "16", "--train", "--offload", "cpu"], capsys)
    assert code == 2   # offload is modelled for inference only
    code, out, _ = run_cli(["profile", str(bert_folder), "--seq-len", "16", "--train"], capsys)
    assert code == 0
    assert "training step peak" in out and "encoder" in out and "optimizer states" in out


def test_validate_estimator_estimate_only_quick(capsys, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "validate_estimator.py"
    spec = importlib.util.spec_from_file_location("validate_estimator", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "validate_estimator", script)   # dataclasses look their module up
    spec.loader.exec_module(script)
    assert script.main(["--estimate-only", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "3 cases estimated, 0 could not be built here" in out
    assert "resnet18/visual train b1" in out and "MiB" in out


def test_what_if_after_checkpointing_a_torchvision_model():
    model = tiny_resnet()
    est = estimator(model, train=True, grad_ckpt=True, what_if=True)
    out = est.describe(Shapes(batch_size=2, image_size=64), None)
    rows = {r["technique"]: r for r in out["what_if"]}
    assert out["train"]["grad_ckpt"].startswith("torch.utils.checkpoint over 4 blocks")
    assert rows["bfloat16 weights"]["peak_total_bytes"] < rows["as profiled"]["peak_total_bytes"]
    assert "gradient checkpointing" not in rows     # already on


def test_cuda_rounding():
    assert counting.cuda_rounded(1) == 512 and counting.cuda_rounded(512) == 512 and counting.cuda_rounded(513) == 1024
