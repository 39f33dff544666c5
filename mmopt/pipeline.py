"""``optimize``: recipe -> load -> measure -> passes -> checkpoint -> reload -> measure -> fidelity -> report -> gates.

Each arrow is one function below; ``Run`` carries what they share.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator

from mmopt import checkpoint, gates, host_memory, registry
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
FIDELITY_BUDGET_S = 60        # seconds of forwards (original + optimized) per image part when the inputs are ours
MIN_FIDELITY_SAMPLES = 16
SLOW_PART_BATCH = 8
READABLE_REPORT_VERSIONS = (1, 2)     # `optimize --check` reads both: gates use no pass metrics


@dataclass
class Run:
    """What one optimize run carries from step to step."""

    recipe: Recipe
    adapter: Adapter
    device: str
    shapes: Shapes
    progress: Progress
    # The model as loaded (its kept parts), held beside the changed one only when a pass needs it (distillation);
    # otherwise the reference for fidelity is reloaded from the source once the changed model is written and freed.
    teacher: Model | None
    model: Model | None     # the model the passes change; None once written
    latency: str = "full"   # tracing.LATENCY_MODES
    stages: dict[str, float] = field(default_factory=dict)    # seconds per stage, for the report

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - started, 3)


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


def run(recipe: Recipe, force: bool = False, progress: Progress = NO_PROGRESS, recipe_path: str | None = None,
        latency: bool = False) -> dict | None:
    """Carry out ``recipe``; return the report (also written as report.json / report.md in the output).

    ``latency``: time the forward at the recipe's shapes even on a CPU (on CUDA it always is; on a CPU the
    default is a batch-1 run scaled to the batch, labelled as an estimate).

    Launched as several processes (``accelerate launch``, ``torchrun``, ``--processes``): the passes that learn
    share their steps (``mmopt.distill.parallel``); only the main process measures, writes and returns the report,
    the others return None (at once when no pass learns).
    """
    from mmopt.distill import parallel

    if not parallel.is_main():
        if not any(step.learns_from_calibration for step in recipe.passes):
            return None
        progress = NO_PROGRESS
    with parallel.group(recipe.device):
        return _run(recipe, force, progress, recipe_path, latency)


def _run(recipe: Recipe, force: bool, progress: Progress, recipe_path: str | None, latency: bool) -> dict | None:
    import torch

    from mmopt.distill import parallel

    main = parallel.is_main()
    started = time.perf_counter()
    if main:
        checkpoint.check_output(recipe.output_path, force)
    calib = Calibration.from_recipe(recipe)
    torch.manual_seed(recipe.seed)
    host_memory.fix_mmap_threshold()
    stages: dict[str, float] = {}
    state = _start(recipe, progress, stages=stages)
    state.latency = "full" if latency or state.device != "cpu" else "quick"
    fit_calib, eval_calib, held_out = _split_calibration(recipe, calib, list(state.model.parts))
    _check_passes(state, fit_calib)
    reference = None
    if main:                    # the other processes only share the passes' training
        with state.stage("measure original"):
            before = measure_parts(state, state.model, "measuring original")
            original = original_files(state.model)
        host_memory.release()   # what the traces left (fake tensors in reference cycles), before the passes grow
        eval_calibs = fidelity_inputs(recipe, eval_calib, before)
        if state.teacher is None and not any(step.aligns_reference for step in recipe.passes):
            # The original is in memory now and nothing will change what it is compared as: its outputs now spare
            # reloading it after the write (a second copy of the weights at the run's peak, for big models).
            kept = list(state.model.parts)
            for step in recipe.passes:
                kept = step.parts_after(kept)
            with state.stage("reference outputs"):
                reference = _outputs_of(state, state.model, kept, eval_calibs, held_out)
    with state.stage("passes"):
        applied, pass_rows = _apply_passes(state, fit_calib)
    parallel.barrier()          # every process got through its passes: only now is the output written
    if not main:
        return None
    random_weights = bool(state.model.random_weights)
    with checkpoint.atomic_folder(recipe.output_path, force) as tmp:
        with state.stage("write"), progress.task("writing checkpoint", total=None):
            manifest = checkpoint.write_checkpoint(state.model, state.adapter, tmp, source_record(recipe), applied,
                                                   recipe={"sha256": recipe.fingerprint(),
                                                           "identity": recipe.identity()})
        state.model = None          # written: free it before the original and the output are loaded
        host_memory.release()
        reference = {part: ref for part, ref in (reference or {}).items() if part in manifest["parts"]}
        missing = [part for part in manifest["parts"] if part not in reference]
        if missing:
            with state.stage("reference outputs"):
                reference.update(_reference_outputs(state, applied, missing, eval_calibs, held_out))
        # Everything "after" is measured on the model reloaded from what was written, not on the one in memory.
        with state.stage("reload"):
            reloaded = checkpoint.load_model(tmp, device=state.device)
        with state.stage("measure optimized"):
            after = measure_parts(state, reloaded, "measuring optimized")
        with state.stage("fidelity"):
            fidelity = _fidelity(state, reloaded, reference, eval_calibs)
        report = build_report(state, recipe_path, manifest, before, original, after, fidelity, pass_rows,
                         random_weights)
        judge(recipe, report)
        report["seconds"] = round(time.perf_counter() - started, 2)
        report["stages"] = dict(state.stages)
        from mmopt import report as report_io

        report_io.write(report, tmp)
        from mmopt import model_card

        model_card.write(report, manifest, tmp)
    return report


def plan(recipe: Recipe, progress: Progress = NO_PROGRESS, recipe_path: str | None = None) -> dict:
    """What ``run`` would do, without doing it: the model loaded, its memory before any pass (sizes and peak
    activation at the profile shapes; no latency run), the passes in order, the output. Writes nothing."""
    calib = Calibration.from_recipe(recipe)
    state = _start(recipe, progress, keep_teacher=False)
    state.latency = "off"
    _check_passes(state, calib)
    before = measure_parts(state, state.model, "measuring original")
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


def _start(recipe: Recipe, progress: Progress, keep_teacher: bool | None = None,
           stages: dict[str, float] | None = None) -> Run:
    """The run's state: the recipe's model loaded with only its parts, on the recipe's device, and a copy of it as
    loaded when a pass needs the original in memory (``keep_teacher`` None: ask the passes)."""
    started = time.perf_counter()
    device = pick_device(recipe.device)
    adapter = registry.adapter_for(recipe.model.source)
    with progress.task("loading model", total=None):
        model = _load(recipe, adapter)
    model.module.to(device)
    shapes = Shapes(batch_size=recipe.profile.batch_size, image_size=recipe.profile.image_size,
                    seq_len=recipe.profile.seq_len)
    if keep_teacher is None:
        keep_teacher = any(step.needs_teacher for step in recipe.passes)
    state = Run(recipe, adapter, device, shapes, progress, teacher=copy.deepcopy(model) if keep_teacher else None,
                model=model, stages=stages if stages is not None else {})
    state.stages["load"] = round(time.perf_counter() - started, 3)
    return state


def _shapes_json(shapes: Shapes) -> dict:
    return {"batch_size": shapes.batch_size, "image_size": shapes.image_size, "seq_len": shapes.seq_len}


def check(recipe: Recipe) -> dict:
    """Evaluate the recipe's gates on its existing output (hashes verified), recomputing nothing."""
    import json

    out = recipe.output_path
    manifest = checkpoint.read_manifest(out)
    _check_same_recipe(recipe, manifest, out)
    checkpoint.verify_folder(out)
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
    judge(recipe, report)
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


def measure_parts(state: Run, model: Model, what: str) -> dict[str, dict]:
    """Sizes, peak activation and latency (as ``state.latency`` says) of each part of ``model`` at the recipe's
    shapes."""
    out = {}
    with state.progress.task(what, total=len(model.parts)) as task:
        for part in model.parts:
            out[part] = {**counting.part_sizes(model, part),
                         **tracing.part_runtime(model, state.adapter, part, state.shapes, latency=state.latency)}
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
        if state.teacher is not None:     # otherwise the original is aligned when it is reloaded for fidelity
            step.align_reference(state.teacher, result.record, state.adapter)
        ctx.history.append(step)
        config = step.config.model_dump(mode="json")
        applied.append({"name": step.name, "config": config, "record": result.record})
        rows.append({"name": step.name, "config": config, **result.to_json(),
                     "weight_bytes_after": {p: counting.part_weight_bytes(model, p) for p in model.parts}})
    return applied, rows


def fidelity_inputs(recipe: Recipe, calib: Calibration, before: dict[str, dict]) -> dict[str, Calibration]:
    """The calibration fidelity runs on, per part. Where the inputs are synthetic images and the recipe left their
    number at its default, it is cut so that the original's and the optimized model's forwards take about
    FIDELITY_BUDGET_S (from the latency just measured): 128 images through ViT-L-14 twice took minutes on a CPU."""
    out = {}
    chosen = recipe.calibration is not None and "num_samples" in recipe.calibration.model_fields_set
    for part, measures in before.items():
        out[part] = calib
        if chosen or not is_image_part(part) or calib.image_files() or not measures.get("latency_ms"):
            continue
        seconds_each = measures["latency_ms"] / 1000 / measures["batch_size"]
        affordable = max(MIN_FIDELITY_SAMPLES, int(FIDELITY_BUDGET_S / (2 * seconds_each)))
        if affordable < calib.num_samples:
            # a part this slow is a large one: smaller batches also keep its activations small
            out[part] = replace(calib, num_samples=affordable, capped_from=calib.num_samples,
                                batch_size=min(calib.batch_size, SLOW_PART_BATCH))
    return out


def _reference_outputs(state: Run, applied: list[dict], kept: list[str], calibs: dict[str, Calibration],
                       held_out: bool | None) -> dict[str, dict]:
    """The original's outputs on the fidelity inputs, for each part the output kept, with how they were obtained.

    The original is the copy held for the passes, or else reloaded from its source now (with the seed again, so a
    random-weights model is rebuilt identically) and aligned as the passes aligned it; it is freed on return."""
    import torch

    recipe, adapter = state.recipe, state.adapter
    teacher, state.teacher = state.teacher, None
    if teacher is None:
        with state.progress.task("reloading original", total=None):
            torch.manual_seed(recipe.seed)
            teacher = _load(recipe, adapter)
            teacher.module.to(state.device)
            for step, entry in zip(recipe.passes, applied):
                step.align_reference(teacher, entry["record"], adapter)
    out = _outputs_of(state, teacher, kept, calibs, held_out)
    del teacher
    host_memory.release()
    return out


def _outputs_of(state: Run, teacher: Model, kept: list[str], calibs: dict[str, Calibration],
                held_out: bool | None) -> dict[str, dict]:
    """The original ``teacher``'s outputs on the fidelity inputs of each part in ``kept``."""
    from mmopt.fidelity import compute_in_float32_on_cpu, embeddings

    recipe, adapter = state.recipe, state.adapter
    out = {}
    with state.progress.task("original outputs", total=len(kept)) as task:
        for part in [p for p in teacher.parts if p in kept]:
            calib = calibs[part]
            description, synthetic = describe_inputs(teacher, adapter, part, calib)
            if calib.capped_from:
                description += (f", {calib.num_samples} of {calib.capped_from} to keep the forwards near "
                                f"{FIDELITY_BUDGET_S} s (calibration.num_samples sets it)")
            if held_out is not None:
                description += (", held out from what the passes fitted to" if held_out
                                else ", the same samples the passes fitted to: too few to hold any out")
            compute = compute_in_float32_on_cpu(teacher, part)
            batches = inputs_for(teacher, adapter, part, calib, state.shapes.seq_len, recipe.seed)
            out[part] = {"outputs": embeddings(teacher, adapter, part, batches), "inputs": description,
                         "synthetic": synthetic, "held_out": held_out, "original_compute": compute}
            task.advance()
    return out


def _fidelity(state: Run, reloaded: Model, reference: dict[str, dict],
              calibs: dict[str, Calibration]) -> dict[str, dict]:
    """Outputs of the reloaded model against the original's, per part it kept."""
    from mmopt.fidelity import compute_in_float32_on_cpu, embeddings, fidelity

    adapter, seed, seq_len = state.adapter, state.recipe.seed, state.shapes.seq_len
    out: dict[str, dict] = {}
    with state.progress.task("fidelity", total=len(reference)) as task:
        for part, ref in reference.items():
            compute = compute_in_float32_on_cpu(reloaded, part)
            # the same inputs, preprocessed for each model at its own image size
            image_size = reloaded.preprocess.get("image_size") if is_image_part(part) else None
            new = embeddings(reloaded, adapter, part,
                             inputs_for(reloaded, adapter, part, calibs[part], seq_len, seed, image_size))
            logits = reloaded.info.get("outputs") == "logits"       # a classifier's scores, as the adapter says
            row = {**fidelity(ref["outputs"], new, logits), **{k: v for k, v in ref.items() if k != "outputs"}}
            row.pop("original_compute")
            if compute or ref["original_compute"]:
                row["compute"] = compute or ref["original_compute"]
            out[part] = row
            task.advance()
    return out


def original_files(model: Model) -> dict:
    """Serialized bytes of each part of the original and of its shared tensors: the "before" checkpoint, taken
    before any pass so that it is the original whole (a classifier a pass drops included)."""
    return {"parts": {part: checkpoint.serialized_bytes(counting.part_state(model, part)) for part in model.parts},
            "shared": shared_bytes(model)}


def build_report(state: Run, recipe_path: str | None, manifest: dict, before: dict, original: dict, after: dict,
                 fidelity: dict, pass_rows: list[dict], random_weights: bool) -> dict:
    """The report of a run: per part before / after / fidelity (None where it was not measured), totals, passes."""
    files = manifest["files"]
    parts = {}
    for part in before:
        before_row = {**_public(before[part]), "checkpoint_bytes": original["parts"][part]}
        if part not in manifest["parts"]:
            after_row = {"params": 0, "weight_bytes": 0, "checkpoint_bytes": 0, "removed": True}
        else:
            after_row = {**_public(after[part]), "checkpoint_bytes": files[part]["bytes"] if part in files else None}
        parts[part] = {"before": before_row, "after": after_row, "fidelity": fidelity.get(part)}
    methods = {m["memory_method"] for m in list(before.values()) + list(after.values())}
    return {
        "report_version": REPORT_VERSION,
        "recipe": recipe_path,
        "output": str(state.recipe.output_path),
        "model": manifest["source"],
        "random_weights": random_weights,
        "memory_method": tracing.overall_method(methods),
        "device": state.device,
        "shapes": _shapes_json(state.shapes),
        "parts": parts,
        "totals": {
            "before": {"weight_bytes": sum(p["before"]["weight_bytes"] for p in parts.values()),
                       "checkpoint_bytes": sum(p["before"]["checkpoint_bytes"] for p in parts.values())
                       + original["shared"]},
            "after": {"weight_bytes": sum(p["after"]["weight_bytes"] for p in parts.values()),
                      "checkpoint_bytes": sum(f["bytes"] for f in files.values())},
        },
        "passes": pass_rows,
    }


def judge(recipe: Recipe, report: dict) -> None:
    """Evaluate the recipe's gates on ``report`` and record the verdict in it."""
    report["gates"] = gates.evaluate(recipe.gates, report)
    report["passed"] = all(row["passed"] for row in report["gates"])


def shared_bytes(model: Model) -> int:
    """Bytes of tensors that belong to no part (CLIP's logit scale), saved in shared.safetensors."""
    tensors = {k: v for k, v in model.module.state_dict().items() if v is not None and model.part_of(k) is None}
    return checkpoint.serialized_bytes(tensors) if tensors else 0


def _public(measures: dict) -> dict:
    keep = ("params", "weight_bytes", "peak_activation_bytes", "latency_ms", "latency_how", "memory_method",
            "memory_how",
            "input_bytes", "batch_size", "note")
    return {k: measures[k] for k in keep if k in measures}
