"""``profile`` says what it measured: the sequence each text part really runs, no sequence for CNNs, the dtype
the model is stored in, what a whole CLIP model costs per tower and both, and AdamW's state as two copies."""
from __future__ import annotations

import mmopt
from mmopt import api


def test_clip_text_runs_its_context_length_and_the_whole_model_peak_counts_every_weight(tiny_clip_name):
    out = api.profile(f"open_clip:{tiny_clip_name}", batch_size=2, seq_len=128)
    assert out["shapes"]["seq_len"] == 16 and out["inputs"]["text"] == "16 tokens"   # its context_length
    assert out["inputs"]["visual"] == "32 px images"
    running = {p: d["peak_total_bytes"] - d["weights_bytes"] for p, d in out["parts"].items()}
    assert out["peak_part"] == max(running, key=running.get)
    assert out["peak_total_bytes"] == out["weights_bytes"] + max(running.values())
    assert out["peak_total_all_parts_at_once_bytes"] == out["weights_bytes"] + sum(running.values())
    assert out["peak_total_bytes"] > max(d["peak_total_bytes"] for d in out["parts"].values())


def test_cnn_has_no_sequence_and_adamw_keeps_two_copies_of_the_weights():
    out = api.profile("torchvision:resnet18", batch_size=2, image_size=64, train=True, optimizer="adamw",
                      amp="bf16", grad_ckpt=False)
    assert out["shapes"]["seq_len"] is None and out["inputs"] == {"visual": "64 px images"}
    import torchvision

    params = list(torchvision.models.resnet18().parameters())
    weights = sum(p.numel() * 4 for p in params)
    breakdown = out["parts"]["visual"]["train"]["breakdown"]
    assert breakdown["optimizer_states"] == 2 * weights + 4 * len(params)       # exp_avg, exp_avg_sq, step
    assert breakdown["temporaries"] > 0          # foreach AdamW's intermediates: there, but not optimizer state


def test_profile_of_a_float16_output_says_float16(tiny_bert_dir, recipe_file):
    path = recipe_file(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
profile: {{batch_size: 2, seq_len: 16}}
calibration: {{num_samples: 4}}
passes: [{{cast: {{dtype: float16}}}}]
output: out
""")
    mmopt.optimize(path)
    assert api.profile(str(path.parent / "out"), batch_size=1, seq_len=8)["dtype"] == "float16"
    assert api.profile(str(tiny_bert_dir), batch_size=1, seq_len=8)["dtype"] == "float32"
    assert api.profile(str(tiny_bert_dir), batch_size=1, seq_len=8, dtype="bfloat16")["dtype"] == "bfloat16"
