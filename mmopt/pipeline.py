"""``optimize``: recipe -> load -> measure -> passes -> checkpoint -> reload -> measure -> fidelity -> report -> gates.

Each arrow is one function below; ``Run`` carries what they share.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmopt import checkpoint, gates, registry
from mmopt.calibration import Calibration, describe_inputs, fit_and_holdout, inputs_for
from mmopt.core import Model, Shapes, is_image_part
from mmopt.errors import UserError
from mmopt.memory import counting, tracing
from mmopt.passes.base import Context
from mmopt.paths import resolve_spec
from mmopt.progress import NO_PROGRESS, Progress
from mmopt.recipe import Recipe

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter

REPORT_VERSION = 2
READABLE_REPORT_VERSIONS = (1, 2)     # `optimize --check` reads both: gates use no pass metrics


@dataclass
class Run:
    """What one optimize run carries from step to step."""

    recipe: Recipe
    adapter: Adapter
    device: str
    shapes: Shapes
    progress: Progress
    teacher: Model          # the model as loaded (its kept parts): the reference for fidelity and distillation
    model: Model            # the model the passes change


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
    torch.manual_seed(recipe.seed)
    state = _start(recipe, progress)
    model, adapter, device = state.model, state.adapter, state.device
    fit_calib, eval_calib, held_out = _split_calibration(recipe, calib, list(model.parts))
    _check_passes(state, fit_calib)
    before = _measure(state, state.teacher, "measuring original")
    # The original's files as it is now, whole: a pass may later make the reference comparable (a classifier
    # dropped from it too), but "before" is what the user started from.
    for part in before:
        before[part]["checkpoint_bytes"] = checkpoint.serialized_bytes(counting.part_state(state.teacher, part))
    before_shared = shared_bytes(state.teacher)
    applied, pass_rows = _apply_passes(state, fit_calib)
    with checkpoint.atomic_folder(recipe.output_path, force) as tmp:
        with progress.task("writing checkpoint", total=None):
            manifest = checkpoint.write_checkpoint(model, adapter, tmp, source_record(recipe), applied,
                                                   recipe={"sha256": recipe.fingerprint(),
                                                           "identity": recipe.identity()})
        # Everything "after" is measured on the model reloaded from what was written, not on the one in memory.
        reloaded = checkpoint.load_model(tmp, device=device)
        after = _measure(state, reloaded, "measuring optimized")
        fidelity = _fidelity(state, reloaded, eval_calib, held_out)
        report = _report(state, recipe_path, manifest, before, before_shared, after, fidelity, pass_rows)
        _judge(recipe, report)
        report["seconds"] = round(time.perf_counter() - started, 2)
        from mmopt import report as report_io

        report_io.write(report, tmp)
        from mmopt import model_card

        model_card.write(report, manifest, tmp)
    return report


def plan(recipe: Recipe, progress: Progress = NO_PROGRESS, recipe_path: str | None = None) -> dict:
    """What ``run`` would do, without doing it: the model loaded, its memory before any pass (sizes and peak
    activation at the profile shapes; no latency run), the passes in order, the output. Writes nothing."""
    calib = Calibration.from_recipe(recipe)
    state = _start(recipe, progress, teacher=False)
    _check_passes(state, calib)
    before = _measure(state, state.model, "measuring original", latency=False)
    target = recipe.output_path
    return {
        "recipe": recipe_path, "model": source_record(recipe), "random_weights": bool(state.model.random_weights),
        "device": state.device, "shapes": _shapes_json(state.shapes),
        "memory_method": tracing.overall_method({m["memory_method"] for m in before.values()}),
        "parts": {part: {**_public(before[part]),
                         "calibration": describe_inputs(state.model, state.adapter, part, calib)[0]}
                  for part in state.model.parts},
        "passes": [{"name": p.name, "config": p.config.model_dump(mode="json"),
                    "learns_from_calibration": p.learns_from_calibration} for p in recipe.passes],
        "output": str(target), "output_exists": target.exists(),
        "gates": recipe.gates.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
    }


def _start(recipe: Recipe, progress: Progress, teacher: bool = True) -> Run:
    """The run's state: the recipe's model loaded with only its parts, on the recipe's device, and (with
    ``teacher``) a copy of it as loaded, the reference for fidelity and distillation."""
    device = pick_device(recipe.device)
    adapter = registry.adapter_for(recipe.model.source)
    with progress.task("loading model", total=None):
        model = _load(recipe, adapter)
    model.module.to(device)
    shapes = Shapes(batch_size=recipe.profile.batch_size, image_size=recipe.profile.image_size,
                    seq_len=recipe.profile.seq_len)
    return Run(recipe, adapter, device, shapes, progress, teacher=copy.deepcopy(model) if teacher else model,
               model=model)


def _shapes_json(shapes: Shapes) -> dict:
    return {"batch_size": shapes.batch_size, "image_size": shapes.image_size, "seq_len": shapes.seq_len}


def check(recipe: Recipe) -> dict:
    """Evaluate the recipe's gates on its existing output (hashes verified), recomputing nothing."""
    import json

    out = recipe.output_path
    manifest = checkpoint.read_manifest(out)
    _check_same_recipe(recipe, manifest, out)
    for entry in manifest["files"].values():
        checkpoint.verify_file(out, entry)
    report_file = out / "report.json"
    if not report_file.is_file():
        raise UserError(f"no report.json in {out}: run `mmopt optimize` first")
    try:
        report = json.loads(report_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{report_file}: malformed JSON ({exc.msg})") from None
    if report.get("report_version") not in READABLE_REPORT_VERSIONS:
        raise UserError(f"{report_file}: report version {report.get('report_version')!r}, expected one of "
                        f"{', '.join(map(str, READABLE_REPORT_VERSIONS))}")
    _judge(recipe, report)
    return report


def _check_same_recipe(recipe: Recipe, manifest: dict, out) -> None:
    """Refuse to judge an output another recipe made (gates on stale weights would pass a changed recipe)."""
    made_by = manifest.get("recipe") or {}
    if made_by.get("sha256") == recipe.fingerprint():
        return
    if not made_by:
        raise UserError(f"{out} records no recipe (written by an older mmopt): run `mmopt optimize --force` "
                        "to remake it")
    change = _first_difference(made_by.get("identity"), recipe.identity())
    raise UserError(f"{out} was made by a different recipe ({change or 'recipe changed'}): run "
                    "`mmopt optimize --force` to remake it")


def _first_difference(old, new, path: str = "") -> str | None:
    """``passes[0].cast.dtype: float16 -> bfloat16`` for the first value that differs, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{path or 'recipe'}: {_short(old)} -> {_short(new)}"


def _short(value) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the steps ---------------------------------------------------------------------------------------------------

def _load(recipe: Recipe, adapter: Adapter) -> Model:
    """The recipe's model with only the recipe's parts."""
    model = adapter.load(resolve_spec(recipe.model, recipe.base_dir))
    for part in recipe.parts or []:
        model.check_part(part)
    for part in [p for p in list(model.parts) if recipe.parts and p not in recipe.parts]:
        adapter.drop_part(model, part)
    return model


def _measure(state: Run, model: Model, what: str, latency: bool = True) -> dict[str, dict]:
    """Sizes, peak activation and (with ``latency``) latency of each part of ``model`` at the recipe's shapes."""
    out = {}
    with state.progress.task(what, total=len(model.parts)) as task:
        for part in model.parts:
            out[part] = {**counting.part_sizes(model, part),
                         **tracing.part_runtime(model, state.adapter, part, state.shapes, latency=latency)}
            task.advance()
    return out


def _split_calibration(recipe: Recipe, calib: Calibration, parts: list[str]) -> tuple:
    """(calibration for the passes, calibration for fidelity, held_out) where held_out is True when passes
    fit to calibration data and fidelity is measured on samples they never saw, False when they fit to it but
    there were too few samples to hold any out, and None when no pass fits to calibration data."""
    if not any(p.learns_from_calibration for p in recipe.passes):
        return calib, calib, None
    split = fit_and_holdout(calib, parts)
    return (split[0], split[1], True) if split else (calib, calib, False)


def _context(state: Run, calib: Calibration) -> Context:
    recipe = state.recipe
    return Context(adapter=state.adapter, teacher=state.teacher, calibration=calib, device=state.device,
                   seed=recipe.seed, progress=state.progress, base_dir=recipe.base_dir)


def _check_passes(state: Run, calib: Calibration) -> None:
    """Every pass's ``check`` on the model as loaded, before anything is measured: a recipe that cannot work
    fails in seconds, and before any progress line is printed."""
    ctx = _context(state, calib)
    for step in state.recipe.passes:
        step.check(state.model, ctx)
        ctx.history.append(step)


def _apply_passes(state: Run, calib: Calibration) -> tuple[list[dict], list[dict]]:
    """Apply the recipe's passes in order; return (manifest entries, report rows)."""
    model = state.model
    ctx = _context(state, calib)
    applied, rows = [], []
    for step in state.recipe.passes:
        with state.progress.task(f"pass {step.name}", total=None):
            result = step.apply(model, ctx)
        step.align_reference(state.teacher, result.record, state.adapter)
        ctx.history.append(step)
        config = step.config.model_dump(mode="json")
        applied.append({"name": step.name, "config": config, "record": result.record})
        rows.append({"name": step.name, "config": config, **result.to_json(),
                     "weight_bytes_after": {p: counting.part_weight_bytes(model, p) for p in model.parts}})
    return applied, rows


def _fidelity(state: Run, reloaded: Model, calib: Calibration, held_out: bool | None) -> dict[str, dict | None]:
    """Outputs of the reloaded model against the original's, per part (None for a part the recipe removed)."""
    from mmopt.fidelity import embeddings, fidelity

    teacher, adapter, seed, seq_len = state.teacher, state.adapter, state.recipe.seed, state.shapes.seq_len
    out: dict[str, dict | None] = {}
    with state.progress.task("fidelity", total=len(teacher.parts)) as task:
        for part in teacher.parts:
            if part not in reloaded.parts:
                out[part] = None
                task.advance()
                continue
            description, synthetic = describe_inputs(teacher, adapter, part, calib)
            if held_out is not None:
                description += (", held out from what the passes fitted to" if held_out
                                else ", the same samples the passes fitted to: too few to hold any out")
            # the same inputs, preprocessed for each model at its own image size
            image_size = reloaded.preprocess.get("image_size") if is_image_part(part) else None
            ref = embeddings(teacher, adapter, part, inputs_for(teacher, adapter, part, calib, seq_len, seed))
            new = embeddings(reloaded, adapter, part,
                             inputs_for(reloaded, adapter, part, calib, seq_len, seed, image_size))
            out[part] = {**fidelity(ref, new), "inputs": description, "synthetic": synthetic, "held_out": held_out}
            task.advance()
    return out


def _report(state: Run, recipe_path: str | None, manifest: dict, before: dict, before_shared: int, after: dict,
            fidelity: dict, pass_rows: list[dict]) -> dict:
    teacher, files = state.teacher, manifest["files"]
    parts = {}
    for part in teacher.parts:
        before_row = {**_public(before[part]), "checkpoint_bytes": before[part]["checkpoint_bytes"]}
        if fidelity[part] is None:
            after_row = {"params": 0, "weight_bytes": 0, "checkpoint_bytes": 0, "removed": True}
        else:
            after_row = {**_public(after[part]), "checkpoint_bytes": files[part]["bytes"] if part in files else None}
        parts[part] = {"before": before_row, "after": after_row, "fidelity": fidelity[part]}
    methods = {m["memory_method"] for m in list(before.values()) + list(after.values())}
    return {
        "report_version": REPORT_VERSION,
        "recipe": recipe_path,
        "output": str(state.recipe.output_path),
        "model": manifest["source"],
        "random_weights": bool(state.model.random_weights),
        "memory_method": tracing.overall_method(methods),
        "device": state.device,
        "shapes": _shapes_json(state.shapes),
        "parts": parts,
        "totals": {
            "before": {"weight_bytes": sum(p["before"]["weight_bytes"] for p in parts.values()),
                       "checkpoint_bytes": sum(p["before"]["checkpoint_bytes"] for p in parts.values())
                       + before_shared},
            "after": {"weight_bytes": sum(p["after"]["weight_bytes"] for p in parts.values()),
                      "checkpoint_bytes": sum(f["bytes"] for f in files.values())},
        },
        "passes": pass_rows,
    }


def _judge(recipe: Recipe, report: dict) -> None:
    """Evaluate the recipe's gates on ``report`` and record the verdict in it."""
    report["gates"] = gates.evaluate(recipe.gates, report)
    report["passed"] = all(row["passed"] for row in report["gates"])


def shared_bytes(model: Model) -> int:
    """Bytes of tensors that belong to no part (CLIP's logit scale), saved in shared.safetensors."""
    tensors = {k: v for k, v in model.module.state_dict().items() if v is not None and model.part_of(k) is None}
    return checkpoint.serialized_bytes(tensors) if tensors else 0


def _public(measures: dict) -> dict:
    keep = ("params", "weight_bytes", "peak_activation_bytes", "latency_ms", "memory_method", "memory_how",
            "input_bytes", "batch_size", "note")
    return {k: measures[k] for k in keep if k in measures}
