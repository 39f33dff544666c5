"""optimize's time and memory scale with the work: the original is not held twice when no pass needs it, a
float16 model is compared in float32 on a CPU, and CPU latency at a large batch is only measured when asked."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mmopt
from mmopt import pipeline
from mmopt.core import Model, Shapes

CAST = """
model: {{source: hf, path: {path}}}
profile: {{batch_size: 4, seq_len: 16}}
passes:
  - cast: {{dtype: float16}}
output: out
"""


@pytest.fixture
def deep_copies(monkeypatch):
    """The Models the pipeline itself deep-copies during a run (measuring copies what it traces, elsewhere)."""
    copied: list[Model] = []
    real = copy.deepcopy

    def spy(obj, *args, **kwargs):
        if isinstance(obj, Model):
            copied.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(pipeline, "copy", SimpleNamespace(deepcopy=spy))
    return copied


@pytest.fixture
def loads(monkeypatch):
    """How many times the pipeline loads the model from its source."""
    count = []
    real = pipeline._load

    def spy(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_load", spy)
    return count


def test_a_cast_holds_no_copy_of_the_original_and_loads_it_once(tiny_bert_dir, recipe_file, deep_copies, loads):
    report = mmopt.optimize(recipe_file(CAST.format(path=tiny_bert_dir)))
    # the original's outputs are taken before the passes change it: neither copied nor reloaded
    assert deep_copies == [] and len(loads) == 1
    text = report["parts"]["text"]
    assert text["fidelity"]["mean_cosine"] > 0.999
    assert text["before"]["checkpoint_bytes"] > 1.9 * text["after"]["checkpoint_bytes"]
    assert list(report["stages"]).index("reference outputs") < list(report["stages"]).index("passes")


def test_a_random_weights_original_is_rebuilt_identically_when_a_pass_changes_what_it_is_compared_as(
        recipe_file, deep_copies, loads):
    report = mmopt.optimize(recipe_file("""
model: {source: torchvision, name: resnet18}
profile: {batch_size: 1, image_size: 32}
calibration: {num_samples: 4, batch_size: 2}
passes:
  - strip: {features: true}
  - cast: {dtype: bfloat16}
output: out
"""))
    # features, not logits: the original is reloaded after the write, with the seed again, and stripped alike
    assert report["random_weights"] and deep_copies == [] and len(loads) == 2
    assert list(report["stages"]).index("reference outputs") > list(report["stages"]).index("write")
    assert report["parts"]["visual"]["fidelity"]["mean_cosine"] > 0.98


def test_distillation_keeps_the_original_in_memory(tiny_bert_dir, recipe_file, deep_copies):
    mmopt.optimize(recipe_file(f"""
model: {{source: hf, path: {tiny_bert_dir}}}
profile: {{batch_size: 2, seq_len: 16}}
calibration: {{num_samples: 10, batch_size: 5}}
passes:
  - substitute: {{part: text, layer_drop: {{keep: [0]}}, distill: {{steps: 2}}}}
output: out
"""))
    assert len(deep_copies) == 1


def test_float16_fidelity_on_a_cpu_computes_in_float32_and_says_so(tiny_bert_dir, recipe_file):
    report = mmopt.optimize(recipe_file(CAST.format(path=tiny_bert_dir)))
    assert "float16 weights computed in float32" in report["parts"]["text"]["fidelity"]["compute"]
    assert "float16 weights computed in float32" in (Path(report["output"]) / "report.md").read_text()


def test_compute_in_float32_leaves_float32_and_quantized_parts_alone(tiny_bert_dir):
    from mmopt.adapters.hf import HFAdapter
    from mmopt.core import ModelSpec
    from mmopt.fidelity import compute_in_float32_on_cpu

    adapter = HFAdapter()
    model = adapter.load(ModelSpec(source="hf", path=str(tiny_bert_dir)))
    assert compute_in_float32_on_cpu(model, "text") is None
    model.module.half()
    assert compute_in_float32_on_cpu(model, "text").startswith("float16 weights")
    assert {t.dtype for _, t in model.named_tensors("text") if t.is_floating_point()} == {torch.float32}

    model.module.half()
    weight = model.module.encoder.layer[0].output.dense.weight
    model.module.encoder.layer[0].output.dense.weight = _Marked(weight.data)   # a special tensor type
    assert compute_in_float32_on_cpu(model, "text") is None
    assert weight.dtype == torch.float16


class _Marked(torch.nn.Parameter):
    """A Parameter subclass, as quantized weights are: its kernel fixes the compute dtype."""


def test_cpu_latency_is_a_scaled_batch_one_run_unless_measuring_is_asked(tiny_bert_dir):
    from mmopt.adapters.hf import HFAdapter
    from mmopt.core import ModelSpec
    from mmopt.memory import tracing

    adapter = HFAdapter()
    model = adapter.load(ModelSpec(source="hf", path=str(tiny_bert_dir)))
    shapes = Shapes(batch_size=8, seq_len=16)
    quick = tracing.part_runtime(model, adapter, "text", shapes, latency="quick")
    full = tracing.part_runtime(model, adapter, "text", shapes, latency="full")
    off = tracing.part_runtime(model, adapter, "text", shapes, latency="off")
    assert quick["latency_how"] == "estimated: batch 1 measured, times 8" and quick["latency_ms"] > 0
    assert full["latency_how"] == "measured at batch 8"
    assert "latency_ms" not in off
    with pytest.raises(ValueError):
        tracing.part_runtime(model, adapter, "text", shapes, latency="sometimes")


def test_report_gives_stage_times_and_says_how_latency_was_had(tiny_bert_dir, recipe_file):
    path = recipe_file(CAST.format(path=tiny_bert_dir))
    report = mmopt.optimize(path)
    assert {"load", "measure original", "passes", "write", "reference outputs", "reload", "measure optimized",
            "fidelity"} <= set(report["stages"])
    assert report["parts"]["text"]["after"]["latency_how"].startswith("estimated")
    from mmopt import api

    measured = api.optimize(path, force=True, latency=True)
    assert measured["parts"]["text"]["after"]["latency_how"] == "measured at batch 4"


VISUAL = """
model: {{source: open_clip, name: {name}}}
parts: [visual]
profile: {{batch_size: 2}}
{calibration}passes:
  - cast: {{dtype: bfloat16}}
output: out
"""


def test_synthetic_fidelity_images_are_cut_to_a_time_budget_unless_the_recipe_sets_their_number(
        tiny_clip_name, recipe_file, monkeypatch):
    monkeypatch.setattr(pipeline, "FIDELITY_BUDGET_S", 1e-9)      # every model is too slow for it
    report = mmopt.optimize(recipe_file(VISUAL.format(name=tiny_clip_name, calibration="")))
    fid = report["parts"]["visual"]["fidelity"]
    assert fid["samples"] == pipeline.MIN_FIDELITY_SAMPLES and "16 of 128" in fid["inputs"]

    chosen = VISUAL.format(name=tiny_clip_name, calibration="calibration: {num_samples: 40, batch_size: 8}\n")
    report = mmopt.optimize(recipe_file(chosen, "chosen.yaml"), force=True)
    assert report["parts"]["visual"]["fidelity"]["samples"] == 40


def test_building_for_a_weights_file_skips_initialisation_and_keeps_computed_buffers(tiny_clip_name):
    import open_clip

    from mmopt.weights import uninitialised

    with uninitialised():
        model = open_clip.create_model(tiny_clip_name)
    reference = open_clip.create_model(tiny_clip_name)
    assert torch.equal(model.attn_mask, reference.attn_mask)        # computed at build: kept
    assert torch.nn.init.normal_ is not None and torch.nn.init.normal_(torch.zeros(3)).abs().sum() > 0  # restored
    with uninitialised(skip=False):
        assert torch.nn.init.normal_(torch.zeros(3)).abs().sum() > 0
