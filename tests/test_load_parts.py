"""Loading one part of an output (the README's deployment case: a service that embeds images loads the image
tower only): for every pass and every family, ``load(out, parts=[p])`` gives the same outputs for ``p`` as the
whole load. Passes are applied directly (no measuring), so the matrix stays quick."""
from __future__ import annotations

import pytest
import torch

from mmopt import checkpoint, registry
from mmopt.core import ModelSpec, Shapes
from mmopt.passes.base import Context

# family -> (source, spec key) ; the spec value comes from a fixture or is a torchvision name
FAMILIES = {
    "hf-bert": ("hf", "tiny_bert_dir"),
    "hf-clip": ("hf", "tiny_hf_clip_dir"),
    "open_clip": ("open_clip", "tiny_clip_full_vocab"),
    "torchvision": ("torchvision", "resnet18"),
}

# pass -> options per family; a family left out does not support the pass (prune: Hugging Face CLIP; substitute,
# a transformer layer drop: torchvision CNNs; resolution: text-only BERT)
PASSES = {
    "cast": {f: {"cast": {"dtype": "float16"}} for f in FAMILIES},
    "cast-one-part": {"hf-clip": {"cast": {"dtype": "bfloat16", "parts": ["visual"]}},
                      "open_clip": {"cast": {"dtype": "bfloat16", "parts": ["text"]}}},
    "strip": {"hf-bert": {"strip": {"heads": True}}, "hf-clip": {"strip": {"keep": ["visual"]}},
              "open_clip": {"strip": {"keep": ["text"]}}, "torchvision": {"strip": {"features": True}}},
    "quantize-int8": {f: {"quantize": {"method": "int8"}} for f in FAMILIES},
    "quantize-nf4-one-part": {"hf-bert": {"quantize": {"method": "nf4", "blocksize": 32}},
                              "hf-clip": {"quantize": {"method": "nf4", "blocksize": 32, "parts": ["text"]}},
                              "open_clip": {"quantize": {"method": "nf4", "blocksize": 32, "parts": ["text"]}},
                              "torchvision": {"quantize": {"method": "nf4", "blocksize": 32}}},
    "prune": {"hf-bert": {"prune": {"target": "mlp", "amount": 0.5}},
              "open_clip": {"prune": {"target": "mlp", "amount": 0.5}},
              "torchvision": {"prune": {"target": "channels", "amount": 0.25}}},
    "substitute": {"hf-bert": {"substitute": {"layer_drop": {"keep": [0]}}},
                   "hf-clip": {"substitute": {"part": "text", "layer_drop": {"keep": [1]}}},
                   "open_clip": {"substitute": {"part": "visual", "layer_drop": {"keep": [0]}}}},
    "resolution": {"hf-clip": {"resolution": {"image_size": 16}}, "open_clip": {"resolution": {"image_size": 16}},
                   "torchvision": {"resolution": {"image_size": 64}}},
}
# The recipe: one part int8, the other float16, then load the float16 one alone.
CHAINS = {
    "quantize-text-then-cast-visual": {
        f: [{"quantize": {"method": "int8", "parts": ["text"]}}, {"cast": {"dtype": "float16", "parts": ["visual"]}}]
        for f in ("hf-clip", "open_clip")},
    "quantize-text-then-keep-visual": {
        f: [{"quantize": {"method": "int8", "parts": ["text"]}}, {"strip": {"keep": ["visual"]}}]
        for f in ("hf-clip", "open_clip")},
}


CASES = [(name, family, [options]) for name, per in PASSES.items() for family, options in per.items()] + \
        [(name, family, chain) for name, per in CHAINS.items() for family, chain in per.items()]


def spec_for(family: str, request) -> ModelSpec:
    source, key = FAMILIES[family]
    if source == "torchvision":
        return ModelSpec(source=source, name=key)
    value = request.getfixturevalue(key)
    return ModelSpec(source=source, path=str(value)) if source == "hf" else ModelSpec(source=source, name=value)


def write_output(spec: ModelSpec, steps: list[dict], out) -> None:
    """Apply ``steps`` (one-key mappings, as in a recipe) to the model ``spec`` names and write the checkpoint."""
    import copy

    adapter = registry.adapter_for(spec.source)
    model = adapter.load(spec)
    ctx = Context(adapter=adapter, teacher=copy.deepcopy(model))
    applied = []
    for item in steps:
        (name, options), = item.items()
        step = registry.make_pass(name, options)
        result = step.apply(model, ctx)
        step.align_reference(ctx.teacher, result.record, adapter)
        ctx.history.append(step)
        applied.append({"name": name, "config": step.config.model_dump(mode="json"), "record": result.record})
    with checkpoint.atomic_folder(out, force=False) as tmp:
        checkpoint.write_checkpoint(model, adapter, tmp, spec.model_dump(exclude_none=True), applied)


def outputs(model, part: str) -> torch.Tensor:
    adapter = registry.adapter_for(model.source)
    inputs = adapter.example_inputs(model, part, Shapes(batch_size=2, seq_len=8, seed=1))
    with torch.inference_mode():
        return adapter.run(model, part, inputs).float()


@pytest.mark.parametrize("name, family, steps", CASES, ids=[f"{n}-{f}" for n, f, _ in CASES])
def test_one_part_loads_like_the_whole(name, family, steps, request, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "out"
    write_output(spec_for(family, request), steps, out)
    whole = checkpoint.load_model(out)
    assert whole.parts, "the output has parts"
    for part in whole.parts:
        alone = checkpoint.load_model(out, parts=[part])
        assert alone.parts == [part]
        expected, got = outputs(whole, part), outputs(alone, part)
        assert torch.isfinite(expected).all()
        assert torch.equal(expected, got), f"{part}: loaded alone differs from the whole load"
