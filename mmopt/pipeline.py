"""``optimize``: recipe -> load -> measure -> passes -> checkpoint -> reload -> measure -> report -> gates."""
from __future__ import annotations

import copy
import time
from typing import Any

from mmopt import checkpoint, gates, registry
from mmopt.calibration import Calibration, describe_inputs, fit_and_holdout, inputs_for
from mmopt.core import Shapes, is_image_part
from mmopt.errors import UserError
from mmopt.fidelity import embeddings, fidelity
from mmopt.memory import counting, tracing
from mmopt.passes.base import Context
from mmopt.paths import resolve_spec
from mmopt.progress import NO_PROGRESS, Progress
from mmopt.recipe import Recipe

REPORT_VERSION = 1


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for, but CUDA is not available here", hint="use device: auto or cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def source_record(recipe: Recipe) -> dict:
    """The model spec as the manifest records it: paths resolved against the recipe's folder."""
    return resolve_spec(recipe.model, recipe.base_dir).model_dump(exclude_none=True)


def run(recipe: Recipe, force: bool = False, progress: Progress = NO_PROGRESS, recipe_path: str | None = None) -> dict:
    """Carry out ``recipe``; return the report (also written as report.json / report.md in the output)."""
    import torch

    started = time.perf_counter()
    checkpoint.check_output(recipe.output_path, force)
    calib = Calibration.from_recipe(recipe)
    device = pick_device(recipe.device)
    torch.manual_seed(recipe.seed)
    adapter = registry.adapter_for(recipe.model.source)
    with progress.task("loading model", total=None):
        model = adapter.load(resolve_spec(recipe.model, recipe.base_dir))
    for part in recipe.parts or []:
        model.check_part(part)
    for part in [p for p in list(model.parts) if recipe.parts and p not in recipe.parts]:
        adapter.drop_part(model, part)
    model.module.to(device)
    teacher = copy.deepcopy(model)
    shapes = Shapes(batch_size=recipe.profile.batch_size, image_size=recipe.profile.image_size,
                    seq_len=recipe.profile.seq_len)
    before = _measure(teacher, adapter, shapes, progress, "measuring original")

    fit_calib, eval_calib, held_out = _split_calibration(recipe, calib, list(model.parts))
    ctx = Context(adapter=adapter, teacher=teacher, calibration=fit_calib, device=device, seed=recipe.seed,
                  progress=progress, base_dir=recipe.base_dir)
    applied, pass_rows = [], []
    for step in recipe.passes:
        with progress.task(f"pass {step.name}", total=None):
            result = step.apply(model, ctx)
        step.align_reference(teacher, result.record, adapter)
        ctx.history.append(step)
        applied.append({"name": step.name, "config": step.config.model_dump(mode="json"), "record": result.record})
        pass_rows.append({"name": step.name, "config": step.config.model_dump(mode="json"), **result.to_json(),
                          "weight_bytes_after": {p: counting.part_weight_bytes(model, p) for p in model.parts}})

    with checkpoint.atomic_folder(recipe.output_path, force) as tmp:
        with progress.task("writing checkpoint", total=None):
            manifest = checkpoint.write_checkpoint(model, adapter, tmp, source_record(recipe), applied)
        # Everything "after" is measured on the model reloaded from what was written, not on the one in memory.
        reloaded = checkpoint.load_model(tmp, device=device)
        after = _measure(reloaded, adapter, shapes, progress, "measuring optimized")
        report = _report(recipe, recipe_path, model, teacher, reloaded, adapter, eval_calib, held_out, shapes,
                         before, after, manifest, pass_rows, device, progress)
        _judge(recipe, report)
        report["seconds"] = round(time.perf_counter() - started, 2)
        from mmopt import report as report_io

        report_io.write(report, tmp)
    return report


def check(recipe: Recipe) -> dict:
    """Evaluate the recipe's gates on its existing output (hashes verified), recomputing nothing."""
    import json

    out = recipe.output_path
    manifest = checkpoint.read_manifest(out)
    for entry in manifest["files"].values():
        checkpoint.verify_file(out, entry)
    report_file = out / "report.json"
    if not report_file.is_file():
        raise UserError(f"no report.json in {out}: run `mmopt optimize` first")
    try:
        report = json.loads(report_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{report_file}: malformed JSON ({exc.msg})") from None
    if report.get("report_version") != REPORT_VERSION:
        raise UserError(f"{report_file}: report version {report.get('report_version')!r}, expected {REPORT_VERSION}")
    _judge(recipe, report)
    return report


def _judge(recipe: Recipe, report: dict) -> None:
    """Evaluate the recipe's gates on ``report`` and record the verdict in it."""
    report["gates"] = gates.evaluate(recipe.gates, report)
    report["passed"] = all(row["passed"] for row in report["gates"])


def _measure(model: Any, adapter: Any, shapes: Shapes, progress: Progress, what: str) -> dict:
    out = {}
    with progress.task(what, total=len(model.parts)) as task:
        for part in model.parts:
            out[part] = {**counting.part_sizes(model, part), **tracing.part_runtime(model, adapter, part, shapes)}
            task.advance()
    return out


def _split_calibration(recipe: Recipe, calib: Calibration, parts: list[str]) -> tuple:
    """(calibration for the passes, calibration for fidelity, held_out) where held_out is True when passes
    fit to calibration data and fidelity is measured on samples they never saw, False when they fit to it but
    there were too few samples to hold any out, and None when no pass fits to calibration data."""
    if not any(step.learns_from_calibration for step in recipe.passes):
        return calib, calib, None
    split = fit_and_holdout(calib, parts)
    return (split[0], split[1], True) if split else (calib, calib, False)


def _report(recipe, recipe_path, model, teacher, reloaded, adapter, calib, held_out, shapes, before, after,
            manifest, pass_rows, device, progress) -> dict:
    parts = {}
    files = manifest["files"]
    with progress.task("fidelity", total=len(teacher.parts)) as task:
        for part in teacher.parts:
            if part not in reloaded.parts:
                before_ckpt = checkpoint.serialized_bytes(_state(teacher, part))
                parts[part] = {"before": {**_public(before[part]), "checkpoint_bytes": before_ckpt},
                               "after": {"params": 0, "weight_bytes": 0, "checkpoint_bytes": 0, "removed": True},
                               "fidelity": None}
                task.advance()
                continue
            description, synthetic = describe_inputs(teacher, adapter, part, calib)
            if held_out is not None:
                description += (", held out from what the passes fitted to" if held_out
                                else ", the same samples the passes fitted to: too few to hold any out")
            ref = embeddings(teacher, adapter, part, inputs_for(teacher, adapter, part, calib, shapes.seq_len, recipe.seed))
            image_size = reloaded.preprocess.get("image_size") if is_image_part(part) else None
            new = embeddings(reloaded, adapter, part,
                             inputs_for(reloaded, adapter, part, calib, shapes.seq_len, recipe.seed, image_size))
            before_ckpt = checkpoint.serialized_bytes(_state(teacher, part))
            parts[part] = {
                "before": {**_public(before[part]), "checkpoint_bytes": before_ckpt},
                "after": {**_public(after[part]), "checkpoint_bytes": files[part]["bytes"] if part in files else None},
                "fidelity": {**fidelity(ref, new), "inputs": description, "synthetic": synthetic,
                             "held_out": held_out},
            }
            for row in pass_rows:
                for key, value in row["metrics"].get(part, {}).items():
                    parts[part][key] = value
            task.advance()
    shared_before = shared_bytes(teacher)
    methods = {m["memory_method"] for m in list(before.values()) + list(after.values())}
    return {
        "report_version": REPORT_VERSION,
        "recipe": recipe_path,
        "output": str(recipe.output_path),
        "model": manifest["source"],
        "random_weights": bool(model.random_weights),
        "memory_method": tracing.overall_method(methods),
        "device": device,
        "shapes": {"batch_size": shapes.batch_size, "image_size": shapes.image_size, "seq_len": shapes.seq_len},
        "parts": parts,
        "totals": {
            "before": {"weight_bytes": sum(p["before"]["weight_bytes"] for p in parts.values()),
                       "checkpoint_bytes": sum(p["before"]["checkpoint_bytes"] for p in parts.values())
                       + shared_before},
            "after": {"weight_bytes": sum(p["after"]["weight_bytes"] for p in parts.values()),
                      "checkpoint_bytes": sum(f["bytes"] for f in files.values())},
        },
        "passes": pass_rows,
    }


def shared_bytes(model: Any) -> int:
    """Bytes of tensors that belong to no part (CLIP's logit scale), saved in shared.safetensors."""
    tensors = {k: v for k, v in model.module.state_dict().items() if v is not None and model.part_of(k) is None}
    return checkpoint.serialized_bytes(tensors) if tensors else 0


def _public(measures: dict) -> dict:
    keep = ("params", "weight_bytes", "peak_activation_bytes", "latency_ms", "memory_method", "memory_how",
            "input_bytes", "batch_size", "note")
    return {k: measures[k] for k in keep if k in measures}


def _state(model: Any, part: str) -> dict:
    return counting.part_state(model, part)
