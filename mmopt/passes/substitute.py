"""Replace a heavy encoder part by a lighter one, then distil it toward the original's outputs.

Two ways to get the lighter part:

- ``layer_drop`` keeps some of the part's own transformer layers: ``{keep_every: k}`` layers 0, k, 2k, ...
  (DistilBERT-style initialisation), ``{keep: [0, 4, 5]}`` exactly those, or ``{layers: n}`` the n layers whose
  outputs match the original's best on calibration inputs (``mmopt/layer_choice.py``). The architecture
  config is rewritten (Hugging Face ``num_hidden_layers``, open_clip ``vision_cfg`` / ``text_cfg``
  ``layers``), so the result is a stock architecture with fewer layers.
- ``swap: {source, path | name, weights}`` puts another locally available model's part in its place. When its
  output width differs, or its embedding space does (a least-squares map fits the original's outputs better
  than the identity), a linear projection initialised by least squares on calibration features maps it back
  to the original output width, so indexes built on the original and the other CLIP tower keep working.

- ``student: {source: hf, path}`` replaces a text encoder whole by another with its own tokenizer (all-mpnet-base-v2
  by all-MiniLM-L6-v2): each reads the calibration texts through its own tokenizer, a Linear projection to the
  original's width (least squares on the fit texts, then trained with the student) follows the student's pooled
  output, and the output is the student's own sentence-transformers folder (Transformer, Pooling, Dense,
  Normalize where the original normalises).

``distill`` then trains the new part (with its projection) toward the original part's outputs on calibration
inputs. For text parts the bundled sample texts count as calibration data when no texts are given (they are
real sentences, if few); image parts need calibration images: distilling on noise teaches nothing.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Iterator, Literal

from pydantic import Field, model_validator

from mmopt.core import Model, ModelSpec, is_image_part, is_text_part
from mmopt.distill import Training, describe_run
from mmopt.errors import DataError, ModelSpecError, UnsupportedError, UserError, first_line
from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.calibration import Calibration

DISTILL_SEQ_LEN = 128
LAYER_CHOICE_SAMPLES = 128  # calibration inputs every candidate layer subset is scored on
# A student's projection is fitted on the fit texts and this many augmented ones: least squares on 320 docstrings
# alone reached 0.23 on everyday development sentences, on 320 + 2000 augmented 0.47 (ridge 0.1, the best of
# 1e-3 .. 1; /work/scratch/distill/c_proj.jsonl). 1000 keeps the teacher's labelling near a minute on 2 CPU cores.
PROJECTION_AUGMENTED = 1000
PROJECTION_RIDGE = 0.1


class LayerDrop(PassConfig):
    keep_every: int | None = Field(None, ge=2, description="keep layers 0, k, 2k, ...; must be below the layer count")
    keep: list[int] | None = Field(None, min_length=1, description="keep exactly these layers (ascending indices)")
    layers: int | None = Field(None, ge=1, description="keep this many layers: the subset whose outputs match the "
                                                       "original's best on calibration inputs")

    @model_validator(mode="after")
    def _one_way(self) -> "LayerDrop":
        given = [name for name in ("keep_every", "keep", "layers") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of keep_every, keep or layers")
        if self.keep is not None and (min(self.keep) < 0 or self.keep != sorted(set(self.keep))):
            raise ValueError(f"keep must list distinct non-negative layer indices in ascending order, got {self.keep}")
        return self


class Distill(Training):
    """``substitute.distill``: the shared training options (``mmopt/distill/options.py``), 400 steps."""


class SubstituteConfig(PassConfig):
    part: str | None = Field(None, description="the part to replace (default: the model's only part)")
    layer_drop: LayerDrop | None = Field(None, description="keep some of the part's transformer layers")
    swap: ModelSpec | None = Field(None, description="another local model whose part takes this one's place")
    student: ModelSpec | None = Field(None, description="a text encoder with its own tokenizer that replaces this one "
                                                        "whole, a projection to this one's width after it; the output "
                                                        "is its sentence-transformers folder")
    distill: Distill | None = Field(None, description="train the new part toward the original's outputs")

    @model_validator(mode="after")
    def _one_way(self) -> "SubstituteConfig":
        if sum(way is not None for way in (self.layer_drop, self.swap, self.student)) != 1:
            raise ValueError("give exactly one of layer_drop, swap or student")
        if self.student is not None and self.distill is not None and self.distill.match == "tokens":
            raise ValueError("distill.match: tokens needs the original's token positions and width; a student "
                             "with its own tokenizer matches the output")
        return self


class Substitute(Pass):
    name = "substitute"
    Config = SubstituteConfig
    needs_teacher = True        # distillation, layer choice and the image-text agreement all read the original

    @property
    def learns_from_calibration(self) -> bool:
        """A swap or a student fits its projection, ``layers: n`` chooses layers, distillation trains: all on
        calibration data."""
        cfg = self.config
        return cfg.swap is not None or cfg.student is not None \
            or (cfg.layer_drop is not None and cfg.layer_drop.layers is not None) \
            or (cfg.distill is not None and cfg.distill.steps > 0)

    def check(self, model: Model, ctx: Context) -> None:
        """The part exists, the layers named exist, and a pass that learns from data has real data for the part
        (before the original is measured, which takes minutes on a large model). Layer counts are checked only
        when no earlier substitute changes this part's layers."""
        cfg = self.config
        part = _part(model, cfg)
        teacher = ctx.teacher or model
        earlier = [p for p in ctx.history if isinstance(p, Substitute) and (p.config.part or part) == part]
        if cfg.layer_drop is not None and not earlier:
            _check_layer_counts(cfg.layer_drop, part, ctx.adapter.layer_count(model, part))
        if cfg.layer_drop is not None and cfg.layer_drop.layers is not None:
            _check_data(teacher, ctx.adapter, part, ctx.calibration, "substitute.layer_drop.layers")
        if cfg.distill is not None and cfg.distill.steps > 0:
            _check_data(teacher, ctx.adapter, part, ctx.calibration, "substitute.distill")
        if cfg.student is not None:
            _check_student(model, part, cfg.student, ctx)
            _check_data(teacher, ctx.adapter, part, ctx.calibration, "substitute.student")

    def apply(self, model: Model, ctx: Context) -> PassResult:
        cfg = self.config
        part = _part(model, cfg)
        adapter = ctx.adapter
        _check_float32(model, part)
        if cfg.layer_drop is not None and cfg.layer_drop.layers is not None:
            _check_data(ctx.teacher, adapter, part, ctx.calibration, "substitute.layer_drop.layers")
        if (cfg.distill is not None and cfg.distill.steps > 0) or cfg.student is not None:
            data = _check_data(ctx.teacher, adapter, part, ctx.calibration, "substitute.distill")
        result = PassResult()
        pairs = projection = None        # a student's texts, tokenized for both models; its projection
        if cfg.layer_drop is not None:
            result.record = _layer_drop(model, part, cfg.layer_drop, ctx, result)
            summary: dict = {"layers": result.record["layer_drop"]}
        elif cfg.student is not None:
            result.record, pairs, fit, projection = _adopt_student(model, part, cfg, ctx, result)
            student = result.record["student"]
            summary = {"student": {"model": student["model"], "projection": student["projection"],
                                   "projection_fit": fit}}
        else:
            result.record = _swap(model, part, cfg.swap, ctx, result)
            swap = result.record["swap"]
            summary = {"swap": {"source": swap["source"], "model": cfg.swap.name or cfg.swap.path,
                                "projection": swap["projection"], "projection_fit": result.record.pop("fit")}}
        agreement = _Agreement(ctx)
        if agreement.applies(model):
            summary["image_text_agreement"] = {"kind": agreement.kind, "before": agreement.score(ctx.teacher),
                                               "before_distill": agreement.score(model)}
        if cfg.distill is not None and cfg.distill.steps > 0:
            summary["distill"] = {**_distill(model, part, cfg.distill, ctx, swapped=cfg.layer_drop is None,
                                             pairs=pairs, projection=projection),
                                  "inputs": data}
        if "image_text_agreement" in summary:
            summary["image_text_agreement"]["after"] = agreement.score(model)
        result.metrics[part] = {"substitute": summary}
        return result

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        """Layer drop needs nothing (the rewritten architecture rebuilds it); a swap rebuilds the student part."""
        if "swap" not in record:
            return
        from mmopt.modules.swapped import SwappedPart, build_student

        swap = record["swap"]
        student, student_adapter = build_student(swap)
        projection = tuple(swap["projection"]) if swap["projection"] else None
        adapter.swap_part(model, record["part"], SwappedPart(student, student_adapter, swap["part"], projection))

    def load_state(self, model: Model, record: dict, state: dict) -> dict:
        """A student's projection is written as a sentence-transformers Dense file: its weight names -> the
        module's (as the adapter recorded them)."""
        names = (record.get("student") or {}).get("state_keys") or {}
        return {names.get(key, key): value for key, value in state.items()}

    def brief(self, metrics: dict) -> str:
        summary = metrics["substitute"]
        words = []
        if "layers" in summary:
            layers = summary["layers"]
            words.append(f"layers {layers['before']} -> {layers['after']}, kept {layers['kept']}")
            choice = layers.get("choice")
            if choice:
                words.append(f"chosen at cos {choice['cosine']:.3f}" + (
                    f" (every k-th {choice['every_kth']['kept']}: {choice['every_kth']['cosine']:.3f})"
                    if choice.get("every_kth") else ""))
        if "swap" in summary:
            swap = summary["swap"]
            words.append(f"swapped for {swap['model']}" + (
                f", projection {swap['projection'][0]}->{swap['projection'][1]}" if swap["projection"] else ""))
        if "student" in summary:
            student = summary["student"]
            words.append(f"replaced by {student['model']}" + (
                f", projection {student['projection'][0]}->{student['projection'][1]}" if student["projection"]
                else "") + f" (least squares cos {student['projection_fit']['least_squares_cosine']:.3f})")
        distill = summary.get("distill")
        if distill:
            words.append(f"distilled {describe_run(distill)}")
            refit = distill.get("projection_refit") or {}
            if refit.get("kept"):
                words.append(f"projection re-solved on {refit['samples']} training texts "
                             f"(held-out {refit['held_out_before']:.3f} -> {refit['held_out_after']:.3f})")
        agreement = summary.get("image_text_agreement")
        if agreement and agreement.get("after") is not None:
            words.append(f"image-text agreement {agreement['before']:.2f} -> {agreement['after']:.2f}")
        return "; ".join(words)


# --- checks ----------------------------------------------------------------------------------------------

def _part(model: Model, cfg: SubstituteConfig) -> str:
    if cfg.part is None:
        if len(model.parts) != 1:
            raise UserError(f"substitute: this model has parts {', '.join(model.parts)}; say which with part:")
        return model.parts[0]
    model.check_part(cfg.part)
    return cfg.part


def _check_float32(model: Model, part: str) -> None:
    import torch

    dtype = model.part_dtype(part)
    if dtype != torch.float32:
        raise UnsupportedError(f"substitute: part {part!r} is {str(dtype).removeprefix('torch.')}; "
                               "substitute and distil in float32", hint="put substitute before cast or quantize")


def _check_data(teacher: Model, adapter: Adapter, part: str, calib: Calibration | None, what: str) -> str:
    """Words for the distillation inputs; a UserError when there is nothing real to learn from."""
    from mmopt.calibration import Calibration, describe_inputs

    calib = calib or Calibration()
    description, synthetic = describe_inputs(teacher, adapter, part, calib)
    if synthetic:
        need = "calibration: {texts: FILE}" if is_text_part(part) else "calibration: {images: DIR}"
        raise DataError(f"{what}: part {part!r} needs calibration data ({need}); it would learn "
                        f"from {description.split(' (')[0]}")
    return description


# --- layer drop ------------------------------------------------------------------------------------------

def _check_layer_counts(cfg: LayerDrop, part: str, count: int) -> None:
    if cfg.keep_every is not None and cfg.keep_every >= count:
        raise UserError(f"substitute.layer_drop.keep_every: must be below the {count} layers of part {part!r}, "
                        f"got {cfg.keep_every}")
    if cfg.keep is not None and (cfg.keep[-1] >= count or len(cfg.keep) == count):
        raise UserError(f"substitute.layer_drop.keep: part {part!r} has layers 0-{count - 1}; keep fewer of "
                        f"them, got {cfg.keep}")
    if cfg.layers is not None and cfg.layers >= count:
        raise UserError(f"substitute.layer_drop.layers: must be below the {count} layers of part {part!r}, "
                        f"got {cfg.layers}")


def _layer_drop(model: Model, part: str, cfg: LayerDrop, ctx: Context, result: PassResult) -> dict:
    adapter = ctx.adapter
    count = adapter.layer_count(model, part)
    chosen = None
    _check_layer_counts(cfg, part, count)
    if cfg.keep_every is not None:
        keep = list(range(0, count, cfg.keep_every))
    elif cfg.keep is not None:
        keep = list(cfg.keep)
    else:
        from mmopt.layer_choice import choose_layers

        chosen = choose_layers(model, ctx.teacher, adapter, part, cfg.layers,
                               _calibration_inputs(ctx.teacher, adapter, part, ctx, limit=LAYER_CHOICE_SAMPLES),
                               progress=ctx.progress)
        keep = chosen["kept"]
    adapter.keep_layers(model, part, keep)
    result.changed.append(Change(f"{part} layers", f"{count} layers", f"{len(keep)} layers (kept {keep})"))
    record = {"before": count, "after": len(keep), "kept": keep}
    if chosen is not None:
        record["choice"] = {k: v for k, v in chosen.items() if k != "kept"}
    return {"part": part, "layer_drop": record}


# --- swap ------------------------------------------------------------------------------------------------

def _load_student(spec: ModelSpec, ctx: Context, what_for: str = "substitute.swap") -> tuple[Model, Adapter]:
    from mmopt import registry
    from mmopt.paths import resolve_spec

    what = spec.name or spec.path
    try:
        student_adapter = registry.adapter_for(spec.source)
        student = student_adapter.load(resolve_spec(spec, ctx.base_dir))
    except UserError as exc:
        raise ModelSpecError(f"{what_for}: cannot load {spec.source} model {what!r}: {exc.message}",
                             hint=exc.hint) from None
    return student, student_adapter


def _swap(model: Model, part: str, spec: ModelSpec, ctx: Context, result: PassResult) -> dict:
    import torch

    from mmopt.fidelity import fidelity
    from mmopt.modules.swapped import SwappedPart, student_record

    student, student_adapter = _load_student(spec, ctx)
    if part in student.parts:
        student_part = part
    elif len(student.parts) == 1 and is_image_part(part) and is_image_part(student.parts[0]):
        student_part = student.parts[0]
    else:
        raise UnsupportedError(f"substitute.swap: {spec.name or spec.path} has no {part!r} part "
                               f"(it has {', '.join(student.parts)})")
    if is_text_part(part) and not ctx.adapter.shares_text_inputs(model, student):
        raise UnsupportedError("substitute.swap: a text part can only be swapped for a Hugging Face model with the "
                               "same tokenizer (the inputs stay the original's token ids)")
    for other in [p for p in list(student.parts) if p != student_part]:
        student_adapter.drop_part(student, other)
    student_adapter.drop_unused_heads(student, features=True)
    student.module.to(ctx.device).float().eval()

    # Calibration features of both sides fit the projection; the student must accept the original's inputs.
    # Inputs stream batch by batch; only the embeddings are kept.
    targets, features = [], []
    with torch.inference_mode():
        for inputs in _calibration_inputs(ctx.teacher, ctx.adapter, part, ctx):
            targets.append(ctx.adapter.run(ctx.teacher, part, inputs).float().cpu())
            try:
                features.append(student_adapter.run(student, student_part, inputs).float().cpu())
            except (RuntimeError, ValueError, IndexError) as exc:
                raise UnsupportedError(f"substitute.swap: {spec.name or spec.path} cannot take this model's {part} "
                                       f"inputs ({first_line(exc, 120)})") from None
    target, feats = torch.cat(targets), torch.cat(features)
    d_in, d_out = feats.shape[1], target.shape[1]
    swapped = SwappedPart(student, student_adapter, student_part, (d_in, d_out))
    fitted = swapped.fit_projection(feats, target)
    fit = fidelity(target, fitted)["mean_cosine"]
    identity = fidelity(target, feats)["mean_cosine"] if d_in == d_out else None
    use_projection = d_in != d_out or identity is None or fit > identity
    if not use_projection:
        swapped = SwappedPart(student, student_adapter, student_part, None)
    swapped.to(ctx.device)
    before = sum(t.numel() for _, t in model.named_tensors(part, buffers=False))
    ctx.adapter.swap_part(model, part, swapped)
    after = sum(t.numel() for _, t in model.named_tensors(part, buffers=False))
    result.changed.append(Change(part, f"{model.source} part ({before:,} params)",
                                 f"{student.source} {spec.name or spec.path} ({after:,} params"
                                 + (f", projection {d_in}->{d_out})" if use_projection else ")")))
    record = {"part": part, "swap": {**student_record(student, student_part),
                                     "projection": [d_in, d_out] if use_projection else None}}
    record["fit"] = {"least_squares_cosine": fit, "identity_cosine": identity, "samples": int(target.shape[0])}
    return record


# --- student with its own tokenizer ----------------------------------------------------------------------

def _check_student(model: Model, part: str, spec: ModelSpec, ctx: Context) -> None:
    """From small files only: the model is one text part, the student a model of the same source with that part."""
    from mmopt import registry
    from mmopt.paths import resolve_spec

    what = spec.name or spec.path
    if not is_text_part(part) or list(model.parts) != [part]:
        raise UnsupportedError(f"substitute.student replaces a text encoder whole; this model has parts "
                               f"{', '.join(model.parts)}", hint="keep only the text part with parts: [text]")
    if spec.source != model.source:
        raise UnsupportedError(f"substitute.student: the student must be a {model.source} model like the original, "
                               f"got source {spec.source}")
    try:
        parts = registry.adapter_for(spec.source).parts_without_weights(resolve_spec(spec, ctx.base_dir))
    except UserError as exc:
        raise ModelSpecError(f"substitute.student: {exc.message}", hint=exc.hint) from None
    if parts is not None and part not in parts:
        raise ModelSpecError(f"substitute.student: {what} is not a text encoder (it has parts {', '.join(parts)})")


def _adopt_student(model: Model, part: str, cfg: SubstituteConfig, ctx: Context, result: PassResult) -> tuple:
    """Load the student, fit its projection by least squares, make ``model`` the student; return (record, the
    texts as a ``TextData`` of (student inputs, original's inputs), the fit's figures, the projection or None)."""
    import torch

    from mmopt.calibration import Calibration, text_source
    from mmopt.distill.data import TextData, augmenting
    from mmopt.distill.precision import computing_in, resolve
    from mmopt.fidelity import fidelity
    from mmopt.modules.swapped import least_squares

    spec, adapter, teacher = cfg.student, ctx.adapter, ctx.teacher
    what = spec.name or spec.path
    student, student_adapter = _load_student(spec, ctx, "substitute.student")
    if part not in student.parts:
        raise ModelSpecError(f"substitute.student: {what} is not a text encoder (it has parts "
                             f"{', '.join(student.parts)})")
    try:
        student_adapter.tokenize(student, ["probe"], 8)
    except UnsupportedError:
        raise ModelSpecError(f"substitute.student: {what} has no tokenizer; the student reads the calibration "
                             "texts through its own") from None
    student.module.to(ctx.device).float().eval()

    def tokenize(texts: list[str]) -> tuple:
        # each model reads the text through its own tokenizer: (student inputs, original's inputs)
        return (student_adapter.tokenize(student, texts, DISTILL_SEQ_LEN),
                adapter.tokenize(teacher, texts, DISTILL_SEQ_LEN))

    options = cfg.distill or Distill(steps=0)
    texts = list(text_source(ctx.calibration or Calibration()))
    data = TextData(texts, tokenize, options.batch_size, augmenting(options, len(texts)),
                    lambda: adapter.vocabulary(teacher), ctx.seed, options.general_text)
    # By length: a batch pads to its longest text, and augmented texts range from five-word crops to mixes of two
    # sentences; unsorted, all-mpnet-base-v2 and MiniLM took twice as long to label them (217 s against 107 s).
    fit_texts = sorted(list(data.fit) + (data.augmenter.batch(PROJECTION_AUGMENTED) if data.augmenter else []),
                       key=len)
    feats, targets = [], []
    starts = range(0, len(fit_texts), 64)
    device_type = torch.device(ctx.device).type
    precision = resolve(options.teacher_labels, device_type)     # the teacher labels as it does in training
    with torch.inference_mode(), ctx.progress.task(f"fitting the projection of {what}", total=len(starts)) as task:
        for i in starts:
            mine, theirs = tokenize(fit_texts[i:i + 64])
            feats.append(student_adapter.run(student, part, mine).float().cpu())
            with computing_in(precision, device_type):
                targets.append(adapter.run(teacher, part, theirs).float().cpu())
            task.advance()
    feat, target = torch.cat(feats), torch.cat(targets)
    d_in, d_out = feat.shape[1], target.shape[1]
    weight, bias = least_squares(feat, target, ridge=PROJECTION_RIDGE)
    fitted = fidelity(target, feat @ weight.T + bias)["mean_cosine"]
    identity = fidelity(target, feat)["mean_cosine"] if d_in == d_out else None
    projection = None
    if d_in != d_out or fitted > identity:
        projection = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            projection.weight.copy_(weight)
            projection.bias.copy_(bias)
        projection.to(ctx.device)
    before = sum(t.numel() for _, t in model.named_tensors(part, buffers=False))
    source = model.source
    loaded = adapter.adopt_student(model, part, student, projection)
    after = sum(t.numel() for _, t in model.named_tensors(part, buffers=False))
    result.changed.append(Change(part, f"{source} text encoder ({before:,} params)",
                                 f"{what} ({after:,} params" + (f", projection {d_in}->{d_out})" if projection
                                                                else ")")))
    record = {"part": part, "student": {"model": what, "projection": [d_in, d_out] if projection else None,
                                        **loaded}}
    fit = {"least_squares_cosine": fitted, "identity_cosine": identity, "samples": int(target.shape[0]),
           "ridge": PROJECTION_RIDGE, "teacher_labels": precision}
    return record, data, fit, projection


def _calibration_inputs(teacher: Model, adapter: Adapter, part: str, ctx: Context, batch_size: int | None = None,
                        limit: int | None = None) -> Iterator[tuple]:
    from mmopt.calibration import Calibration, inputs_for

    calib = ctx.calibration or Calibration()
    if batch_size is not None:
        calib = replace(calib, batch_size=batch_size)
    if limit is not None:
        calib = replace(calib, num_samples=min(calib.num_samples, limit))
    return inputs_for(teacher, adapter, part, calib, DISTILL_SEQ_LEN, ctx.seed)


# --- distillation ----------------------------------------------------------------------------------------

def _distill(model: Model, part: str, cfg: Distill, ctx: Context, swapped: bool = False, pairs=None,
             projection=None) -> dict:
    from mmopt.calibration import Calibration
    from mmopt.distill import distill, use_tokens
    from mmopt.distill.data import for_part
    from mmopt.distill.refit import ProjectionRefit

    # Token-level matching: MiniLM 6 -> 3 (layers 0, 4, 5) reached 0.924 held-out against 0.915 matching the
    # pooled output (docs/substitution.md). It needs the teacher's hidden width, so auto never picks it after a swap.
    tokens = cfg.match == "tokens" or (not swapped and use_tokens(cfg.match, ctx.adapter, model, part))
    if pairs is not None:       # a student with its own tokenizer: batches hold (its inputs, the original's)
        refit = ProjectionRefit(projection, PROJECTION_RIDGE) if projection is not None else None
        stats = distill(model, ctx.teacher, ctx.adapter, part, pairs, cfg, seed=ctx.seed, progress=ctx.progress,
                        split=lambda batch: batch, refit=refit)
    else:
        data = for_part(ctx.teacher, ctx.adapter, part, ctx.calibration or Calibration(), DISTILL_SEQ_LEN,
                        ctx.seed, cfg, ctx.device)
        stats = distill(model, ctx.teacher, ctx.adapter, part, data, cfg, seed=ctx.seed, progress=ctx.progress,
                        tokens=tokens)
    model.module.eval()
    return stats


# --- CLIP image-text agreement ---------------------------------------------------------------------------

class _Agreement:
    """Top-1 image -> text matching on calibration pairs: the captions when given, else the original model's
    own top-1 text for each image (teacher-scored pairs; the original scores 1.0 by definition)."""

    def __init__(self, ctx: Context):
        from mmopt.calibration import Calibration

        self.ctx = ctx
        self.calib = ctx.calibration or Calibration()
        self.captions = self.calib.captions_file is not None
        self.kind = "caption top-1 accuracy" if self.captions else "agreement with the original's top-1 text"
        self.labels = None

    def applies(self, model: Model) -> bool:
        return {"visual", "text"} <= set(model.parts) and {"visual", "text"} <= set(self.ctx.teacher.parts)

    def score(self, model: Model) -> float:
        import torch

        from mmopt.calibration import inputs_for
        from mmopt.fidelity import embeddings

        calib = replace(self.calib, texts_file=None) if self.captions else self.calib
        adapter, seed = self.ctx.adapter, self.ctx.seed
        images = embeddings(model, adapter, "visual", inputs_for(model, adapter, "visual", calib, seed=seed))
        texts = embeddings(model, adapter, "text", inputs_for(model, adapter, "text", calib, seed=seed))
        sims = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
        top = sims.argmax(dim=-1)
        if self.labels is None:
            self.labels = torch.arange(len(top)) if self.captions else top
        return round(float((top == self.labels).float().mean()), 4)
