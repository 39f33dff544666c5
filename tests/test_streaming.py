"""Models larger than memory: cast, strip and int8 quantize stream from a safetensors weights file to the output,
tensor by tensor (quantize: unit by unit), without loading the model."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmopt
from mmopt import api
from mmopt.errors import UserError
from mmopt.weights import write_streamed
from tests.conftest import TINY_CLIP_CONFIG

OPEN_CLIP = """
model: {{source: open_clip, name: {name}, weights: {weights}}}
profile: {{batch_size: 2}}
passes:
  - strip: {{keep: [visual]}}
  - cast: {{dtype: float16}}
gates: {{max_size_ratio: 0.6}}
output: {output}
"""


@pytest.fixture
def tiny_clip_weights(tiny_clip_name, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_name)
    path = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_streamed_output_is_byte_for_byte_the_loaded_runs(tiny_clip_name, tiny_clip_weights, recipe_file):
    streamed = api.optimize(recipe_file(OPEN_CLIP.format(name=tiny_clip_name, weights=tiny_clip_weights,
                                                         output="streamed"), "a.yaml"), stream=True)
    loaded = api.optimize(recipe_file(OPEN_CLIP.format(name=tiny_clip_name, weights=tiny_clip_weights,
                                                       output="loaded"), "b.yaml"), stream=False)
    root = tiny_clip_weights.parent
    assert _sha(root / "streamed" / "visual.safetensors") == _sha(root / "loaded" / "visual.safetensors")
    assert streamed["streamed"] and "streamed" not in loaded
    for side in ("before", "after"):
        for key in ("params", "weight_bytes", "checkpoint_bytes", "peak_activation_bytes"):
            assert streamed["parts"]["visual"][side][key] == loaded["parts"]["visual"][side][key], (side, key)
    assert streamed["parts"]["visual"]["fidelity"] is None and "not measured" in streamed["notes"][0]
    assert streamed["passed"]      # a size gate can be judged without the model in memory
    module = mmopt.load(root / "streamed")
    assert module.visual.conv1.weight.dtype == torch.float16 and module.transformer is None


def test_a_fidelity_gate_fails_when_fidelity_was_not_measured(tiny_clip_name, tiny_clip_weights, recipe_file):
    text = OPEN_CLIP.format(name=tiny_clip_name, weights=tiny_clip_weights, output="out").replace(
        "max_size_ratio: 0.6", "min_cosine: 0.99")
    report = api.optimize(recipe_file(text), stream=True)
    assert not report["passed"] and report["gates"][0]["value"] is None


def test_torchvision_features_stream_and_reload(tmp_path, recipe_file):
    import torchvision
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=5).state_dict(), str(weights))
    path = recipe_file(f"""
model: {{source: torchvision, name: resnet18, weights: {weights}}}
profile: {{batch_size: 2, image_size: 32}}
passes: [strip: {{features: true}}, cast: {{dtype: bfloat16}}]
output: out
""")
    report = api.optimize(path, stream=True)
    assert report["parts"]["visual"]["after"]["weight_bytes"] < report["parts"]["visual"]["before"]["weight_bytes"] / 2
    module = mmopt.load(path.parent / "out")
    assert isinstance(module.fc, torch.nn.Identity) and module.conv1.weight.dtype == torch.bfloat16


QUANTIZED = """
model: {{source: open_clip, name: {name}, weights: {weights}}}
profile: {{batch_size: 2}}
passes: {passes}
output: {output}
"""


@pytest.mark.parametrize("passes", [
    "[quantize: {method: int8}]",
    "[cast: {dtype: float16}, quantize: {method: int8, embeddings: int4, group_size: 16}]",
    "[quantize: {method: int8, parts: [text], exclude: ['*.mlp.*']}, strip: {keep: [text]}]",
])
def test_streamed_int8_quantize_is_byte_for_byte_the_loaded_runs(tiny_clip_full_vocab, tmp_path, recipe_file,
                                                                 passes):
    """Swapped attentions, the patch convolution, bare projections and tables, embeddings (int8 and 4-bit) and
    Linear layers are each rebuilt from the source unit by unit: the same bytes as quantizing the loaded model."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(tiny_clip_full_vocab).state_dict().items()},
              str(weights))
    outputs = {}
    for name, stream in (("streamed", True), ("loaded", False)):
        report = api.optimize(recipe_file(QUANTIZED.format(name=tiny_clip_full_vocab, weights=weights,
                                                           passes=passes, output=name), f"{name}.yaml"),
                              stream=stream)
        outputs[name] = (tmp_path / name, report)
    (streamed, s_report), (loaded, l_report) = outputs["streamed"], outputs["loaded"]
    assert s_report["streamed"]
    files = sorted(p.name for p in loaded.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in streamed.glob("*.safetensors"))
    for name in files:
        assert _sha(streamed / name) == _sha(loaded / name), name
    module = mmopt.load(streamed)       # and it loads, hashes verified
    assert module is not None


@pytest.mark.parametrize("quantize", ["{method: int8}", "{method: int8, int8_group_size: 8}"])
def test_streamed_int8_convolutions_match_the_loaded_run(tmp_path, recipe_file, quantize):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "mobilenet.safetensors"
    save_file(torchvision.models.mobilenet_v2(num_classes=5).state_dict(), str(weights))
    shas = []
    for name, stream in (("streamed", True), ("loaded", False)):
        api.optimize(recipe_file(f"""
model: {{source: torchvision, name: mobilenet_v2, weights: {weights}, num_classes: 5}}
profile: {{batch_size: 1, image_size: 32}}
calibration: {{num_samples: 2, batch_size: 2}}
passes: [quantize: {quantize}]
output: {name}
""", f"{name}.yaml"), stream=stream)
        shas.append(_sha(tmp_path / name / "visual.safetensors"))
    assert shas[0] == shas[1]


@pytest.mark.parametrize("passes, model, expect", [
    ("[quantize: {method: nf4}]", "weights", "streaming quantizes with method int8"),
    ("[quantize: {method: int4}]", "weights", "streaming quantizes with method int8"),
    ("[quantize: {method: int8, bias_correction: true}]", "weights", "bias_correction runs the model"),
    ("[quantize: {method: int8, algorithm: gptq}]", "weights", "algorithm gptq runs the model"),
    ("[cast: {dtype: float16}]", "pth", "reads the model's weights from a safetensors file"),
    ("[cast: {dtype: float16}]", "hf", "not Hugging Face folders"),
])
def test_stream_says_in_one_line_why_a_recipe_cannot_stream(tiny_clip_name, tiny_clip_weights, tiny_bert_dir,
                                                             recipe_file, passes, model, expect):
    if model == "hf":
        spec = f"{{source: hf, path: {tiny_bert_dir}}}"
    else:
        weights = tiny_clip_weights
        if model == "pth":
            weights = tiny_clip_weights.with_suffix(".pth")
            torch.save({"x": torch.zeros(1)}, weights)
        spec = f"{{source: open_clip, name: {tiny_clip_name}, weights: {weights}}}"
    path = recipe_file(f"model: {spec}\npasses: {passes}\noutput: out\n")
    with pytest.raises(UserError, match=expect):
        api.optimize(path, stream=True)
    assert not (path.parent / "out").exists()


def test_weights_of_another_architecture_are_refused_before_anything_is_written(tiny_clip_name, tmp_path,
                                                                                 recipe_file):
    from safetensors.torch import save_file

    weights = tmp_path / "other.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(weights))
    path = recipe_file(OPEN_CLIP.format(name=tiny_clip_name, weights=weights, output="out"))
    with pytest.raises(UserError, match="weights do not fit this architecture"):
        api.optimize(path, stream=True)
    assert not (path.parent / "out").exists()


# The child runs the CLI in-process and reports its own peak resident memory (bytes) on its last stdout line.
CHILD = """
import json, os, resource, sys
if os.environ.get("TINY_CLIP_CONFIG"):
    import open_clip
    open_clip.add_model_config(os.environ["TINY_CLIP_CONFIG"])
from mmopt.cli import main
sys.argv = ["mmopt", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(recipe: Path, open_clip_configs: Path) -> int:
    env = {**os.environ, "TINY_CLIP_CONFIG": str(open_clip_configs)}
    proc = subprocess.run([sys.executable, "-c", CHILD, "optimize", str(recipe), "--stream", "--json"],
                          capture_output=True, text=True, cwd=recipe.parent, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_a_1_7_gb_model_holds_a_fraction_of_it_in_memory(tiny_clip_name, tiny_clip_weights, tmp_path,
                                                                    recipe_file):
    """ViT-L-14 with random weights (1.7 GB of float32) written tensor by tensor, then cast and stripped: the
    process's peak resident memory stays within a quarter of the weights above that of the same run on a tiny
    model (the interpreter, torch and open_clip themselves)."""
    import open_clip

    with torch.device("meta"):
        shapes = open_clip.create_model("ViT-L-14", device="meta").state_dict()
    big = tmp_path / "vit_l_14.safetensors"
    generator = torch.Generator().manual_seed(0)
    write_streamed(big, {k: (v.dtype, tuple(v.shape)) for k, v in shapes.items()},
                   lambda key: torch.randn(shapes[key].shape, generator=generator) * 0.02)
    size = big.stat().st_size
    assert size > 1.6e9

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{tiny_clip_name}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    baseline = _peak_rss(recipe_file(OPEN_CLIP.format(name=tiny_clip_name, weights=tiny_clip_weights,
                                                      output="tiny"), "tiny.yaml"), configs)
    peak = _peak_rss(recipe_file(OPEN_CLIP.format(name="ViT-L-14", weights=big, output="big"), "big.yaml"), configs)
    assert peak - baseline < 0.25 * size, f"peak {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB"
    manifest = json.loads((tmp_path / "big" / "mmopt.json").read_text())
    assert manifest["files"]["visual"]["bytes"] < 0.6 * size * 0.75      # visual is ~3/4 of ViT-L-14, now fp16
    # int8 quantization of both towers, made unit by unit from the source
    peak = _peak_rss(recipe_file(QUANTIZED.format(name="ViT-L-14", weights=big, passes="[quantize: {method: int8}]",
                                                  output="big-int8"), "big-int8.yaml"), configs)
    assert peak - baseline < 0.25 * size, f"int8: peak {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB"
    written = sum(entry["bytes"] for entry in json.loads((tmp_path / "big-int8" / "mmopt.json").read_text())
                  ["files"].values())
    assert written < 0.3 * size
