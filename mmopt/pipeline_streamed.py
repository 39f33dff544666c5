"""``optimize`` for a model larger than memory: cast, strip and int8 quantize, tensor by tensor, from its
safetensors weights file to the output, without ever loading the model.

The model is built on the meta device (dtypes and shapes, no memory), the passes run on it as usual (a cast
changes dtypes, a strip drops modules), and each output file is written one tensor at a time, read from the
source and converted to the dtype the passes chose (``weights.stream_part``); what quantize rewrote is made unit by
unit from the source (``passes.quantize_streamed``). Sizes and the activation estimate
come from the meta model as they would from a loaded one. Fidelity needs forwards with real weights, which this
path exists to avoid: it is not measured, the report says so, and a fidelity gate fails rather than pass unseen.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mmopt import checkpoint, registry
from mmopt.core import Shapes
from mmopt.errors import UserError
from mmopt.memory import counting
from mmopt.passes.base import Context
from mmopt.paths import resolve_spec
from mmopt.pipeline import Run, build_report, judge, measure_parts, original_files, source_record
from mmopt.progress import NO_PROGRESS, Progress
from mmopt.weights import check_fit, is_safetensors_file, weight_shapes

if TYPE_CHECKING:
    from mmopt.core import Model, ModelSpec
    from mmopt.recipe import Recipe

STREAMING_PASSES = ("cast", "strip", "quantize")     # passes that change tensors one by one, or drop them
AUTO_SHARE_OF_MEMORY = 0.5               # without --stream, stream when the weights exceed this share of free memory
NOT_MEASURED = ("not measured: the model was streamed tensor by tensor (--stream, or too large for memory); "
                "comparing outputs needs it in memory")


def why_not(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot be streamed, or None when it can."""
    others = [p.name for p in recipe.passes if p.name not in STREAMING_PASSES]
    if others:
        return f"{', '.join(others)} need{'s' if len(others) == 1 else ''} the model in memory; streaming does " \
               f"{' and '.join(STREAMING_PASSES)}"
    for step in [p for p in recipe.passes if p.name == "quantize"]:
        if step.config.method != "int8":
            return f"quantize method {step.config.method} needs the model in memory; streaming quantizes with " \
                   "method int8"
        for option, wanted in (("bias_correction", step.config.bias_correction),
                               ("algorithm gptq", step.config.algorithm == "gptq")):
            if wanted:
                return f"quantize's {option} runs the model on calibration data; streaming does not load it"
    spec = resolve_spec(recipe.model, recipe.base_dir)
    if spec.source == "hf":
        return "it takes open_clip, torchvision and timm models with a safetensors weights file, not Hugging Face folders"
    if not spec.weights or not Path(spec.weights).is_file() or not is_safetensors_file(Path(spec.weights)):
        return "it reads the model's weights from a safetensors file (model.weights)"
    return None


def wanted(recipe: Recipe, stream: bool | None) -> bool:
    """Whether to stream: ``stream`` True (asked: an error when the recipe cannot be), False, or None (when the
    recipe can be and its weights would take more than half the memory available now)."""
    reason = why_not(recipe)
    if stream:
        if reason:
            raise UserError(f"--stream: {reason}")
        return True
    if stream is False or reason:
        return False
    weights = Path(resolve_spec(recipe.model, recipe.base_dir).weights)
    available = _available_memory()
    return available is not None and weights.stat().st_size > AUTO_SHARE_OF_MEMORY * available


def run(recipe: Recipe, force: bool = False, progress: Progress = NO_PROGRESS, recipe_path: str | None = None) -> dict:
    """Carry out a cast / strip ``recipe`` by streaming; return the report (written into the output too)."""
    started = time.perf_counter()
    checkpoint.check_output(recipe.output_path, force)
    spec = resolve_spec(recipe.model, recipe.base_dir)
    adapter = registry.adapter_for(spec.source)
    shapes = Shapes(batch_size=recipe.profile.batch_size, image_size=recipe.profile.image_size,
                    seq_len=recipe.profile.seq_len)
    state = Run(recipe, adapter, "cpu", shapes, progress, teacher=None, model=None, latency="off")
    with state.stage("load"), progress.task("building the model on the meta device", total=None):
        state.model = _empty_model(recipe, spec)
    with state.stage("measure original"):
        before = measure_parts(state, state.model, "measuring original (estimated)")
        original = original_files(state.model)
    model = state.model
    ctx = Context(adapter=adapter, device="cpu", seed=recipe.seed, progress=progress, base_dir=recipe.base_dir)
    applied, rows = [], []
    with state.stage("passes"):
        for step in recipe.passes:
            unquantized = copy.deepcopy(model.module) if step.name == "quantize" else None   # meta: no memory
            result = step.apply(model, ctx)
            if unquantized is not None:
                from mmopt.passes.quantize_streamed import UnitValues

                model.info["_stream_made"] = UnitValues(unquantized, result.record, step.config,
                                                        model.info["_stream_from"])
            ctx.history.append(step)
            config = step.config.model_dump(mode="json")
            applied.append({"name": step.name, "config": config, "record": result.record})
            rows.append({"name": step.name, "config": config, **result.to_json(),
                         "weight_bytes_after": {p: counting.part_weight_bytes(model, p) for p in model.parts}})
    with checkpoint.atomic_folder(recipe.output_path, force) as tmp:
        with state.stage("write"), progress.task("streaming weights to the output", total=None):
            manifest = checkpoint.write_checkpoint(model, adapter, tmp, source_record(recipe), applied)
        with state.stage("measure optimized"):
            after = measure_parts(state, model, "measuring optimized (estimated)")
        fidelity = {part: None for part in manifest["parts"]}
        report = build_report(state, recipe_path, manifest, before, original, after, fidelity, rows,
                              random_weights=False)
        report["streamed"] = True
        report["notes"] = [f"Fidelity {NOT_MEASURED}."]
        judge(recipe, report)
        report["seconds"] = round(time.perf_counter() - started, 2)
        report["stages"] = dict(state.stages)
        from mmopt import report as report_io

        report_io.write(report, tmp)
    return report


def _empty_model(recipe: Recipe, spec: ModelSpec) -> Model:
    """The recipe's model on the meta device with only its parts, checked against the weights file's tensors."""
    adapter = registry.adapter_for(spec.source)
    weights = Path(spec.weights)
    shapes = {k: tuple(v.shape) for k, v in weight_shapes(weights).items()}
    model = adapter.load_empty(spec, shapes)
    check_fit(shapes, {k: tuple(v.shape) for k, v in model.module.state_dict().items() if v is not None},
              f"weights {weights.name}")
    model.info["_stream_from"] = weights
    for part in recipe.parts or []:
        model.check_part(part)
    for part in [p for p in list(model.parts) if recipe.parts and p not in recipe.parts]:
        adapter.drop_part(model, part)
    return model


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
