"""Structured pruning: remove conv channels, FFN units, attention heads or hidden width, so the model gets smaller.

Channels, FFN units and width go through Torch-Pruning (its dependency graph follows residual couplings);
attention heads are sliced here through the adapters, because Torch-Pruning keeps head counts and
transformers 5 removed ``prune_heads``. Uniform results are written as a smaller stock config (the adapter's
``write_pruned_config``); what a stock config cannot say (per-layer heads, torchvision channel counts) is
recorded and re-applied by ``restore`` on the rebuilt model. Nothing is ever pickled.
"""
from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from pydantic import Field, model_validator

from mmopt.core import Model, PruneLayout, Shapes, is_text_part
from mmopt.distill import Training, describe_run, use_tokens
from mmopt.distill.data import REFIT_GENERAL
from mmopt.errors import DataError, UnsupportedError
from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult, Skip, excluded, target_parts
from mmopt.passes.prune_means import RemovedMeans

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.adapters.base import Adapter

EVAL_SEQ_LEN = 128
# Module attributes that follow a module's tensor shapes; recorded for every module that pruning changed.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "normalized_shape", "embed_dim", "kdim", "vdim", "head_dim", "num_heads", "embedding_dim")


class Recover(Training):
    """``prune.recover``: the shared training options (``mmopt/distill/options.py``), 300 steps, after a
    least-squares refit of the pruned FFNs' output layers (``target: mlp``)."""

    steps: int = Field(300, gt=0, description="optimizer steps of distillation from the original (at most)")
    refit: bool = Field(True, description="target mlp: first re-solve each pruned FFN's output Linear by least "
                                          "squares on the original's outputs (fit samples and their variations)")
    refit_general: int = Field(REFIT_GENERAL, ge=0, description="target mlp, text: general English sentences the "
                                                                "refit also fits (more: closer to the original "
                                                                "outside the calibration domain, a slower refit)")


class PruneConfig(PassConfig):
    target: Literal["channels", "mlp", "heads", "width"] = Field(
        description="channels (conv nets) | mlp (transformer FFN hidden units) | heads | width (hidden size)")
    amount: float = Field(gt=0, lt=1, description="fraction removed, the same in every layer")
    parts: list[str] | None = Field(None, description="parts to prune (default: all)")
    importance: Literal["auto", "magnitude", "activation", "reconstruction"] = Field(
        "auto", description="magnitude: L2 of weights | activation: activation norms on calibration data | "
                            "reconstruction (target mlp with recover): the FFN units the others, re-solved by least "
                            "squares, best make up for are removed (OBS, mmopt/distill/unit_choice.py) | auto: "
                            "reconstruction where it applies, else magnitude")
    exclude: list[str] = Field([], description="module-name globs left untouched")
    fold_means: bool = Field(True, description="target channels: add what the removed channels sent on average "
                                               "(measured on the calibration images) to the bias of the layers "
                                               "reading them, or to their BatchNorm's running mean")
    recover: Recover | None = Field(None, description="distill the pruned part from the original afterwards")

    @model_validator(mode="after")
    def _reconstruction_needs_the_refit(self) -> "PruneConfig":
        if self.importance == "reconstruction" and not self.refits:
            raise ValueError("importance reconstruction goes with target mlp and recover (with its refit): the "
                             "kept units are chosen for the least-squares refit that follows")
        return self

    @property
    def refits(self) -> bool:
        """Whether the pruned FFNs' output layers are re-solved before recovery."""
        return self.target == "mlp" and self.recover is not None and self.recover.refit

    @property
    def chosen_importance(self) -> str:
        """``auto`` as a decision: reconstruction where the FFN refit follows, magnitude elsewhere."""
        if self.importance != "auto":
            return self.importance
        return "reconstruction" if self.refits else "magnitude"


class Prune(Pass):
    name = "prune"
    Config = PruneConfig

    @property
    def learns_from_calibration(self) -> bool:
        """Recovery distils on calibration data; activation and reconstruction importance rank on it."""
        return self.config.recover is not None or self.config.chosen_importance in ("activation", "reconstruction")

    @property
    def needs_teacher(self) -> bool:
        """Recovery distils from the original."""
        return self.config.recover is not None

    def check(self, model: Model, ctx: Context) -> None:
        """What the layout refuses (a target the part lacks, heads that do not divide, no data to learn from),
        before anything is measured; skipped after an earlier structural pass, whose changes it cannot see."""
        parts = target_parts(model, self.config.parts)
        if not any(step.name in ("prune", "substitute") for step in ctx.history):
            for part in parts:
                _checked_layout(model, part, self.config, ctx)

    def apply(self, model: Model, ctx: Context) -> PassResult:
        cfg = self.config
        parts = target_parts(model, cfg.parts)
        layouts = {part: _checked_layout(model, part, cfg, ctx) for part in parts}
        teacher = ctx.teacher
        if teacher is None and cfg.recover is not None:      # called outside the pipeline: the model as it is now
            teacher = copy.deepcopy(model)
        before = _shapes(model.module)
        result = PassResult()
        heads: dict[str, int] = {}
        for part in parts:
            kept: dict[str, list[int]] = {}
            folded = None
            # built before pruning: the refit's texts also rank the FFN units (importance reconstruction)
            data = _training_data(teacher, part, cfg.recover, ctx) if cfg.recover is not None else None
            refit_batches = data.refit_batches(general=cfg.recover.refit_general) if cfg.refits else None
            if cfg.target == "heads":
                kept = _prune_heads(model, part, layouts[part], cfg, ctx)
                heads.update({name: len(keep) for name, keep in kept.items()})
            else:
                folded = _prune_with_torch_pruning(model, part, layouts[part], cfg, ctx, refit_batches)
            reason = ctx.adapter.write_pruned_config(model, part, cfg.target)
            layers = _changed_layers(before, _shapes(model.module), model, part)
            if not layers:
                result.skipped.append(Skip(part, f"nothing to prune: every {cfg.target} group is excluded or too small"))
            for name, (b, a) in layers.items():
                result.changed.append(Change(name, str(b), str(a)))
            pruned = {"target": cfg.target, "amount": cfg.amount, "importance": cfg.chosen_importance,
                      "layers": {name: [b, a] for name, (b, a) in layers.items()}, "stock_config": reason is None}
            if kept:
                pruned["kept_heads"] = kept
            if folded is not None:
                pruned["means_folded"] = folded
            if reason is not None:
                pruned["note"] = reason
                result.skipped.append(Skip(part, f"not a stock config: {reason}"))
            result.metrics[part] = {"pruned": pruned}
            if cfg.recover is not None:
                ffn = layouts[part].ffn if cfg.refits else []
                result.metrics[part].update(_recover(model, teacher, part, cfg.recover, ctx, data, ffn, refit_batches))
        after = _shapes(model.module)
        changed = {name: list(shape) for name, shape in after.items() if before.get(name) != shape}
        result.record = {"heads": heads, "shapes": changed, "attrs": _attrs(model.module, changed)}
        return result

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        """Re-apply head counts and tensor shapes on a freshly built model (its weights are loaded afterwards)."""
        import torch

        names = {name for name, _ in model.module.named_modules()}
        for name, count in record.get("heads", {}).items():
            if name in names:
                adapter.slice_heads(model, name, list(range(count)))
        for name, shape in record.get("shapes", {}).items():
            owner, _, attr = name.rpartition(".")
            if owner not in names:
                continue            # a part that this load leaves out
            module = model.module.get_submodule(owner)
            old = getattr(module, attr)
            if old is None or list(old.shape) == list(shape):
                continue
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(attr, new)
        for owner, attrs in record.get("attrs", {}).items():
            if owner in names:
                module = model.module.get_submodule(owner)
                for key, value in attrs.items():
                    setattr(module, key, tuple(value) if isinstance(value, list) else value)

    def brief(self, metrics: dict) -> str:
        pruned = metrics["pruned"]
        words = [f"{pruned['target']} -{pruned['amount']:.0%} ({pruned['importance']}) in {len(pruned['layers'])} "
                 f"layers" + ("" if pruned["stock_config"] else ", not a stock config")]
        if pruned.get("means_folded", {}).get("layers"):
            words.append(f"removed channels' means folded into {pruned['means_folded']['layers']} layers")
        recovery = metrics.get("recovery")
        if recovery:
            words.append(f"recovered {describe_run(recovery)}")
            words.append(f"cos before recovery {metrics['fidelity_before_recovery']['mean_cosine']:.4f}")
            if "fidelity_after_refit" in metrics:
                words.append(f"after the FFN refit {metrics['fidelity_after_refit']['mean_cosine']:.4f}")
        return "; ".join(words)


# --- checks --------------------------------------------------------------------------------------------------

def _checked_layout(model: Model, part: str, cfg: PruneConfig, ctx: Context) -> PruneLayout:
    """The adapter's layout for ``part``, after refusing what cannot be done (before anything changes)."""
    layout = ctx.adapter.prune_layout(model, part)
    if cfg.target not in layout.targets:
        has = ", ".join(layout.targets) or "nothing mmopt can prune"
        raise UnsupportedError(f"prune: part {part!r} of this model has no {cfg.target} to prune; it supports: {has}")
    if cfg.target == "heads":
        for name, count in layout.attention.items():
            if excluded(name, cfg.exclude):
                continue
            removed = cfg.amount * count
            if abs(removed - round(removed)) > 1e-6 or round(removed) >= count:
                raise UnsupportedError(
                    f"prune: amount {cfg.amount} of {count} heads in {name} is {removed:g} heads, not a whole number "
                    "below the head count", hint=f"use a multiple of 1/{count}, e.g. {round(count / 4) / count:g}")
    if cfg.recover is not None and cfg.recover.match == "tokens" and not ctx.adapter.can_run_hidden(model, part):
        raise UnsupportedError(f"prune: recover.match tokens is not supported for part {part!r} of this model",
                               hint="use match: output")
    if cfg.recover is not None or cfg.chosen_importance == "activation":
        why = "recover" if cfg.recover is not None else "importance: activation"
        _require_data(model, ctx, part, why)
    return layout


def _require_data(model: Model, ctx: Context, part: str, why: str) -> None:
    """Learning from synthetic inputs would fit noise: real calibration data (or the bundled texts) is required."""
    from mmopt.calibration import describe_inputs

    description, synthetic = describe_inputs(model, ctx.adapter, part, ctx.calibration)
    if synthetic:
        what = "texts: a file, one text per line" if is_text_part(part) else "images: a folder of images"
        raise DataError(f"prune: {why} on part {part!r} needs calibration data, got {description}",
                        hint=f"add calibration: {{{what}}} to the recipe")


# --- channels, FFN units, width: Torch-Pruning -----------------------------------------------------------------

def _prune_with_torch_pruning(model: Model, part: str, layout: PruneLayout, cfg: PruneConfig, ctx: Context,
                              refit_batches: Callable[[], Iterable[tuple]] | None = None) -> dict | None:
    """Torch-Pruning with the chosen importance; ``refit_batches``: the refit's data, which reconstruction ranks
    the FFN units on. Target channels: the removed channels' means folded into their readers (``prune_means.py``);
    returns what the report shows of that."""
    import torch
    import torch_pruning as tp
    from torch import nn

    root = model.module
    modules = dict(model.named_modules(part))
    fc1 = {name for name, _ in layout.ffn}
    ignored = [root.get_submodule(n) for n in layout.ignore if n in modules]
    ignored += [m for n, m in modules.items() if excluded(n, cfg.exclude)]
    if cfg.target == "mlp":      # only the FFN hidden groups may change: every other layer's outputs stay
        ignored += [m for n, m in modules.items() if n not in fc1 and isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    elif cfg.target == "width":  # the residual stream only: FFN hidden groups stay
        ignored += [root.get_submodule(n) for n in fc1]
    num_heads = {root.get_submodule(n): h for n, h in layout.attention.items()
                 if isinstance(root.get_submodule(n), nn.MultiheadAttention)}
    example = _example(model, part, ctx)

    def forward(_module: nn.Module, inputs: tuple) -> torch.Tensor:
        return ctx.adapter.run(model, part, inputs)

    params = dict(root.named_parameters())
    unwrapped = [(params[n], d) for n, d in layout.unwrapped.items()]
    chosen = cfg.chosen_importance
    if chosen == "reconstruction":
        importance = _Scored(model, _unit_scores(model, part, layout, cfg, ctx, refit_batches))
    elif chosen == "activation":
        importance = tp.importance.ActivationImportance()
    else:
        importance = tp.importance.MagnitudeImportance(p=2)
    with warnings.catch_warnings():     # Torch-Pruning warns about every bare parameter outside the part
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(root, example, importance=importance, pruning_ratio=cfg.amount,
                                      ignored_layers=ignored, forward_fn=forward, num_heads=num_heads,
                                      unwrapped_parameters=unwrapped,
                                      round_to=layout.width_round if cfg.target == "width" else None)
    removed = _removed_means(model, part, cfg, ctx, modules, forward)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if chosen == "activation":
            with importance.compute_importance(root):
                forward(root, _one_batch(model, part, ctx))
        if not isinstance(removed, RemovedMeans):
            pruner.step()
            return removed
        for group in pruner.step(interactive=True):
            removed.observe(group)
            group.prune()
        return removed.fold()


def _removed_means(model: Model, part: str, cfg: PruneConfig, ctx: Context, modules: dict[str, nn.Module],
                   forward: Callable) -> RemovedMeans | dict | None:
    """A ``RemovedMeans`` to follow the pruning with, or why there is none (None: not asked for)."""
    from mmopt.calibration import Calibration, describe_inputs, inputs_for
    from mmopt.passes.prune_means import input_means

    if cfg.target != "channels" or not cfg.fold_means:
        return None
    description, synthetic = describe_inputs(model, ctx.adapter, part, ctx.calibration)
    if synthetic:
        return {"layers": 0, "note": f"not folded: means need calibration images, got {description}"}
    batches = inputs_for(model, ctx.adapter, part, ctx.calibration or Calibration(), EVAL_SEQ_LEN, ctx.seed)
    return RemovedMeans(model.module, input_means(modules, lambda b: forward(model.module, b), batches), description)


def _unit_scores(model: Model, part: str, layout: PruneLayout, cfg: PruneConfig, ctx: Context,
                 refit_batches: Callable[[], Iterable[tuple]]) -> dict[str, torch.Tensor]:
    """fc1 name -> a score per FFN unit (``mmopt/distill/unit_choice.py``), for the blocks not excluded."""
    from mmopt.distill.unit_choice import unit_scores
    from mmopt.progress import NO_PROGRESS

    blocks = [(fc1, fc2) for fc1, fc2 in layout.ffn if not excluded(fc1, cfg.exclude)]
    with (ctx.progress or NO_PROGRESS).task(f"ranking the FFN units of {part}", total=None):
        return unit_scores(model, blocks, refit_batches(), lambda m, inputs: ctx.adapter.run(m, part, inputs),
                           cfg.amount)


class _Scored:
    """A Torch-Pruning importance read from precomputed scores (fc1 name -> one per unit): an FFN group's root is
    its fc1's outputs."""

    def __init__(self, model: Model, scores: dict[str, torch.Tensor]) -> None:
        self.scores = {model.module.get_submodule(name): score for name, score in scores.items()}

    def __call__(self, group: Any) -> torch.Tensor | None:
        dep, idxs = group[0]
        score = self.scores.get(dep.target.module)
        return None if score is None else score[list(idxs)]


def _example(model: Model, part: str, ctx: Context) -> tuple:
    return ctx.adapter.example_inputs(model, part, Shapes(batch_size=2, seq_len=16, seed=ctx.seed))


def _one_batch(model: Model, part: str, ctx: Context) -> tuple:
    """All calibration samples as one batch (Torch-Pruning's activation hooks keep the last forward only)."""
    import dataclasses

    from mmopt.calibration import Calibration, inputs_for

    calib = ctx.calibration or Calibration()
    calib = dataclasses.replace(calib, batch_size=calib.num_samples)
    inputs = next(inputs_for(model, ctx.adapter, part, calib, EVAL_SEQ_LEN, ctx.seed))
    return tuple(t.to(ctx.device) if hasattr(t, "to") else t for t in inputs)


# --- heads: sliced here ------------------------------------------------------------------------------------------

def _prune_heads(model: Model, part: str, layout: PruneLayout, cfg: PruneConfig, ctx: Context) -> dict[str, list[int]]:
    """Keep the most important heads of every attention layer; return layer -> kept head indices."""
    scores = _activation_head_scores(model, part, layout, ctx) if cfg.importance == "activation" else {}
    kept = {}
    for name, count in layout.attention.items():
        if excluded(name, cfg.exclude):
            continue
        score = scores.get(name)
        if score is None:
            score = _magnitude_head_scores(ctx.adapter.attention_weights(model, name))
        keep_n = count - round(cfg.amount * count)
        keep = sorted(score.topk(keep_n).indices.tolist())
        ctx.adapter.slice_heads(model, name, keep)
        kept[name] = keep
    return kept


def _magnitude_head_scores(w: dict) -> torch.Tensor:
    """Squared L2 norm of each head's q/k/v rows (and biases) and out-projection columns."""
    import torch

    heads, hd = w["heads"], w["head_dim"]
    total = torch.zeros(heads)
    for key in "qkv":
        weight, bias = w[key]
        total += weight.detach().float().reshape(heads, hd, -1).pow(2).sum(dim=(1, 2)).cpu()
        if bias is not None:
            total += bias.detach().float().reshape(heads, hd).pow(2).sum(dim=1).cpu()
    total += w["o"].detach().float().reshape(w["o"].shape[0], heads, hd).pow(2).sum(dim=(0, 2)).cpu()
    return total


def _activation_head_scores(model: Model, part: str, layout: PruneLayout, ctx: Context) -> dict[str, torch.Tensor]:
    """Mean norm of each head's value path through the out-projection, on calibration inputs.

    It leaves out the attention pattern (values are mixed across tokens by weights summing to one), which keeps
    the estimate one matmul per head and family-agnostic.
    """
    import torch

    captured: dict[str, list] = {}
    hooks = []
    for name in layout.attention:
        def grab(_module, args, kwargs, name=name):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
            captured.setdefault(name, []).append(x.detach().float().reshape(-1, x.shape[-1]))
        hooks.append(model.module.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            ctx.adapter.run(model, part, _one_batch(model, part, ctx))
    finally:
        for hook in hooks:
            hook.remove()
    scores = {}
    with torch.no_grad():
        for name, xs in captured.items():
            w = ctx.adapter.attention_weights(model, name)
            x = torch.cat(xs)
            weight, bias = w["v"]
            v = x @ weight.float().T + (bias.float() if bias is not None else 0)
            heads, hd = w["heads"], w["head_dim"]
            o = w["o"].float().reshape(-1, heads, hd)
            scores[name] = torch.stack([(v[:, h * hd:(h + 1) * hd] @ o[:, h].T).norm(dim=-1).mean()
                                        for h in range(heads)]).cpu()
    return scores


# --- recovery --------------------------------------------------------------------------------------------------

def _training_data(teacher: Model, part: str, recover: Recover, ctx: Context) -> Any:
    """The recovery's data (``mmopt/distill/data.py``): fit and held-out splits, augmentation, refit texts."""
    from mmopt.calibration import Calibration
    from mmopt.distill.data import for_part

    return for_part(teacher, ctx.adapter, part, ctx.calibration or Calibration(), EVAL_SEQ_LEN, ctx.seed, recover,
                    ctx.device)


def _recover(model: Model, teacher: Model, part: str, recover: Recover, ctx: Context, data: Any,
             ffn: list[tuple[str, str]], refit_batches: Callable[[], Iterable[tuple]] | None) -> dict:
    """Refit the pruned FFNs ``ffn`` (fc1, fc2 names; none: no refit) on ``refit_batches``, then distil ``part``
    from the teacher on ``data``; return fidelity before recovery (and after the refit) and the run
    (``mmopt.distill``)."""
    from mmopt.calibration import Calibration, inputs_for
    from mmopt.distill import distill
    from mmopt.fidelity import embeddings, fidelity

    calib = ctx.calibration or Calibration()
    ref = embeddings(teacher, ctx.adapter, part, inputs_for(teacher, ctx.adapter, part, calib, EVAL_SEQ_LEN, ctx.seed))

    def measured() -> dict:
        new = embeddings(model, ctx.adapter, part, inputs_for(model, ctx.adapter, part, calib, EVAL_SEQ_LEN, ctx.seed))
        return fidelity(ref, new)

    out = {"fidelity_before_recovery": measured()}
    tokens = use_tokens(recover.match, ctx.adapter, model, part)
    if ffn:
        out["refit"] = _refit(model, teacher, part, data, ffn, refit_batches, ctx)
        out["fidelity_after_refit"] = measured()
    out["recovery"] = distill(model, teacher, ctx.adapter, part, data, recover, seed=ctx.seed,
                              progress=ctx.progress, tokens=tokens)
    model.module.eval()
    return out


def _refit(model: Model, teacher: Model, part: str, data, ffn: list[tuple[str, str]],
           batches: Callable[[], Iterable[tuple]], ctx: Context) -> dict:
    """Least-squares refit of the pruned FFNs' output layers (``mmopt/distill/refit.py``), kept only if the
    held-out split (never fitted on) agrees: a fit on few tokens can overfit them."""
    from mmopt.distill.refit import refit_ffn
    from mmopt.progress import NO_PROGRESS

    run = lambda m, inputs: ctx.adapter.run(m, part, inputs)  # noqa: E731
    saved = {fc2: copy.deepcopy(model.module.get_submodule(fc2).state_dict()) for _, fc2 in ffn}
    before = _held_out_cosine(model, teacher, part, data, ctx)
    with (ctx.progress or NO_PROGRESS).task(f"refitting the pruned FFNs of {part}", total=len(ffn)) as task:
        stats = refit_ffn(model, teacher, ffn, batches, run, on_block=task.advance)
    after = _held_out_cosine(model, teacher, part, data, ctx)
    stats.update(held_out_before=round(before, 5), held_out_after=round(after, 5), kept=after > before)
    if not stats["kept"]:
        for fc2, state in saved.items():
            model.module.get_submodule(fc2).load_state_dict(state)
    return stats


def _held_out_cosine(model: Model, teacher: Model, part: str, data, ctx: Context) -> float:
    """Mean cosine of ``part``'s outputs to the teacher's on the distillation data's held-out split."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        cos = [F.cosine_similarity(ctx.adapter.run(model, part, b).float(), ctx.adapter.run(teacher, part, b).float(),
                                   dim=-1) for b in data.held_batches()]
    return float(torch.cat(cos).mean())


# --- shapes ------------------------------------------------------------------------------------------------------

def _shapes(module: nn.Module) -> dict[str, tuple]:
    out = {}
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        if tensor is not None:
            out[name] = tuple(tensor.shape)
    return out


def _changed_layers(before: dict, after: dict, model: Model, part: str) -> dict[str, tuple[int, int]]:
    """Modules of ``part`` whose weight lost output rows: name -> (rows before, rows after)."""
    out = {}
    for name, shape in after.items():
        owner, _, attr = name.rpartition(".")
        if attr not in ("weight", "in_proj_weight") or not model.owns(part, name) or before.get(name) == shape:
            continue
        if before[name][0] != shape[0]:
            out[owner] = (before[name][0], shape[0])
    return out


def _attrs(module: nn.Module, changed: dict) -> dict[str, dict]:
    """Size attributes of every module owning a changed tensor (JSON-able), for ``restore``."""
    out = {}
    for owner in sorted({name.rpartition(".")[0] for name in changed}):
        sub = module.get_submodule(owner)
        attrs = {}
        for key in SHAPE_ATTRS:
            value = getattr(sub, key, None)
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int) or (isinstance(value, tuple) and all(isinstance(v, int) for v in value)):
                attrs[key] = list(value) if isinstance(value, tuple) else value
        if attrs:
            out[owner] = attrs
    return out
