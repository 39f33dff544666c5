"""Store weights in 8 or 4 bits with bitsandbytes, covering every matrix multiply and the embedding tables.

bitsandbytes quantizes ``nn.Linear`` only, so first every matrix multiply is made one (``mmopt/modules``):
fused attention becomes four Linear projections, a ViT patch convolution a Linear over patches, a bare CLIP
projection matrix a Linear; which modules those are is the adapter's word (``QuantLayout``). Then each Linear
becomes ``Linear8bitLt`` (int8, one scale per output row) or ``Linear4bit`` (nf4/fp4, one absmax per
``blocksize`` weights), and embedding tables become per-row int8. Convolutions other than patch embeddings,
norms and biases stay in their dtype; the report lists them. The only module of mmopt that imports bitsandbytes.

The adapter's ``save`` learns what was done from ``model.quantization`` (a Hugging Face folder writes it as
transformers' ``quantization_config``). Reloading (``mmopt.load``): ``restore`` replays the swaps on a freshly
built model and puts empty bitsandbytes modules in place (an int8 one is moved to its device first, because
``Linear8bitLt`` only accepts a quantized state once it is quantized itself); ``load_state`` rebuilds each 4-bit
weight with ``Params4bit.from_prequantized`` from the saved packed data and quantization state.
"""
from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from mmopt.core import Model, QuantLayout, Quantization
from mmopt.errors import UnsupportedError, UserError, first_line
from mmopt.memory.counting import quantized_fraction
from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult, Skip, describe, excluded, target_parts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.adapters.base import Adapter

# What bitsandbytes' blockwise 4-bit kernels accept (bitsandbytes/_ops.py, the same on CPU and CUDA).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class QuantizeConfig(PassConfig):
    method: Literal["int8", "nf4", "fp4"] = Field(
        "int8", description="int8: bitsandbytes LLM.int8 storage (per-row scales); nf4 | fp4: bitsandbytes 4-bit")
    parts: list[str] | None = Field(None, description="parts to quantize (default: all)")
    embeddings: Literal["int8", "keep"] = Field(
        "int8", description="int8: token/position embedding tables as per-row int8; keep: leave them as they are")
    exclude: list[str] = Field(default_factory=list,
                               description="module-name globs kept in higher precision; each must match something")
    blocksize: int = Field(64, description=f"4-bit block size, one of {', '.join(map(str, BLOCKSIZES))}")
    int8_threshold: float = Field(
        6.0, ge=0, description="int8: LLM.int8 outlier threshold, transformers' default (activation columns with a "
                               "value above it run in float16); 0 = all int8")

    @field_validator("blocksize")
    @classmethod
    def _blocksize(cls, value: int) -> int:
        if value not in BLOCKSIZES:
            raise ValueError(f"bitsandbytes accepts blocksize {', '.join(map(str, BLOCKSIZES))}, got {value}")
        return value


class Quantize(Pass):
    name = "quantize"
    Config = QuantizeConfig

    def apply(self, model: Model, ctx: Context) -> PassResult:
        cfg = self.config
        if any(isinstance(earlier, Quantize) for earlier in ctx.history):
            raise UnsupportedError("quantize: the model is already quantized by an earlier quantize pass",
                                   hint="keep one quantize pass in the recipe")
        parts = target_parts(model, cfg.parts)
        _check_kernel(cfg, ctx.device)
        layout = ctx.adapter.quantization_layout(model)
        _check_globs(model, parts, cfg.exclude)
        result = PassResult()
        record: dict = {"parts": parts, "swaps": [], "linear": [], "embeddings": [], "tables": [],
                        "compute_dtype": {}}
        float_linear: list[str] = []
        for part in parts:
            record["compute_dtype"][part] = str(model.part_dtype(part)).removeprefix("torch.")
            if layout.structural:
                _swap_structures(model, part, cfg, layout, record, result)
            _quantize_part(model, part, cfg, layout, record, result, float_linear)
            _note_uncovered(model, part, result)
            result.metrics[part] = {"quantized_fraction": round(quantized_fraction(model, part), 6),
                                    "high_precision": _summary([s for s in result.skipped
                                                                if model.owns(part, s.module)])}
        model.quantization = Quantization(
            method=cfg.method, int8_threshold=cfg.int8_threshold, blocksize=cfg.blocksize, embeddings=cfg.embeddings,
            compute_dtype=record["compute_dtype"][parts[0]] if parts else "float32", float_linear=sorted(float_linear))
        result.record = record
        return result

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        """Replay the swaps and put empty quantized modules in place; ``load_state`` fills them."""
        _restore(model, self.config, record)

    def load_state(self, model: Model, record: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """4-bit weights: rebuild each ``Params4bit`` from its packed data and saved quantization state."""
        if self.config.method == "int8":
            return state
        bnb = _bnb()
        for name in record["linear"]:
            key = f"{name}.weight"
            if key not in state:
                continue
            module = _get(model.module, name)
            stats = {k[len(key) + 1:]: state.pop(k) for k in [k for k in state if k.startswith(key + ".")]}
            module.weight = bnb.nn.Params4bit.from_prequantized(state[key], stats, device="cpu", module=module)
        return state

    def brief(self, metrics: dict) -> str:
        return f"{metrics['quantized_fraction']:.1%} of weights in 8/4 bits; kept: {metrics['high_precision']}"


# --- checks ------------------------------------------------------------------------------------------------

def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:   # also raised when its native library fails to load
        raise UnsupportedError(f"quantize: bitsandbytes cannot be imported ({first_line(exc, 120)})",
                               hint="pip install bitsandbytes") from None
    import warnings

    # Said on every int8 forward with float32 inputs: LLM.int8 quantizes activations from float16 by design.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    return bitsandbytes


def _check_kernel(cfg: QuantizeConfig, device: str) -> None:
    """Run a tiny layer of ``cfg.method`` on ``device``; if that kernel is missing, say which method works."""
    failure = _probe(cfg.method, cfg.blocksize, device)
    if failure is None:
        return
    working = [m for m in ("int8", "nf4", "fp4") if m != cfg.method and _probe(m, 64, device) is None]
    hint = f"method {working[0]} works on {device}" if working else f"no bitsandbytes method works on {device}"
    raise UnsupportedError(f"quantize: the bitsandbytes {cfg.method} kernel is not available on {device} ({failure})",
                           hint=hint)


def _probe(method: str, blocksize: int, device: str) -> str | None:
    import torch

    _bnb()
    try:
        layer = quantized_linear(torch.nn.Linear(64, 64), method, blocksize, 0.0, torch.float32, device)
        layer(torch.zeros(2, 64, device=device))
    except Exception as exc:  # bitsandbytes raises RuntimeError/NotImplementedError/ValueError per backend
        return first_line(exc, 160)
    return None


def _check_globs(model: Model, parts: list[str], globs: list[str]) -> None:
    names = [n for part in parts for n, _ in model.named_modules(part)]
    names += [n for part in parts for n, _ in model.named_tensors(part, buffers=False)]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            where = ", ".join(parts)
            raise UserError(f"quantize.exclude: {glob!r} matches no module or parameter of {where}",
                            hint="module names look like " + ", ".join(names[:3]))


# --- structure ---------------------------------------------------------------------------------------------

def _is_attention(module: nn.Module, layout: QuantLayout) -> bool:
    import torch

    return isinstance(module, torch.nn.MultiheadAttention) or layout.fused_attention(module)


def _swap_structures(model: Model, part: str, cfg: QuantizeConfig, layout: QuantLayout, record: dict,
                     result: PassResult) -> None:
    """Attention, patch convolutions and bare projections become Linear-based modules (recorded for restore)."""
    from mmopt.modules.attention import split_attention_from
    from mmopt.modules.linear import is_patch_conv, matmul_linear_from, patch_linear_from

    for name, module in list(model.named_modules(part)):
        if _under_any(name, layout.keep) or excluded(name, cfg.exclude):
            continue
        kind = None
        if _is_attention(module, layout):
            new, why = split_attention_from(module)
            if new is None:
                result.skipped.append(Skip(name, why))
                continue
            kind = "attention"
        elif is_patch_conv(module):
            new, kind = patch_linear_from(module), "patch"
        if kind:
            _set(model.module, name, new)
            record["swaps"].append({"name": name, "kind": kind})
            result.changed.append(Change(name, type(module).__name__, type(new).__name__))
    for name, kind in layout.bare_weights.items():
        if kind != "projection" or not model.owns(part, name) or excluded(name, cfg.exclude):
            continue
        matrix = _get(model.module, name)
        _set(model.module, name, matmul_linear_from(matrix), replace_param=True)
        record["swaps"].append({"name": name, "kind": "projection"})
        result.changed.append(Change(name, describe(matrix), "MatmulLinear"))


def _restore(model: Model, cfg: QuantizeConfig, record: dict) -> None:
    import torch

    from mmopt.modules.attention import split_attention_from
    from mmopt.modules.embedding import Int8Embedding
    from mmopt.modules.linear import matmul_linear_from, patch_linear_from

    _bnb()
    for swap in record["swaps"]:
        if not _present(model, swap["name"]):
            continue
        old = _get(model.module, swap["name"])
        if swap["kind"] == "attention":
            new, _ = split_attention_from(old)
        elif swap["kind"] == "patch":
            new = patch_linear_from(old)
        else:
            new = matmul_linear_from(old)
        _set(model.module, swap["name"], new, replace_param=swap["kind"] == "projection")
    for name in record["linear"]:
        if _present(model, name):
            part = model.part_of(name)
            dtype = getattr(torch, record["compute_dtype"].get(part, "float32"))
            _set(model.module, name, quantized_linear(_get(model.module, name), cfg.method, cfg.blocksize,
                                                       cfg.int8_threshold, dtype, "cpu"))
    for name in record["embeddings"]:
        if _present(model, name):
            _set(model.module, name, Int8Embedding.from_embedding(_get(model.module, name)))
    for name in record["tables"]:
        if _present(model, name):
            _int8_table(model, name)


# --- quantization --------------------------------------------------------------------------------------------

def _quantize_part(model: Model, part: str, cfg: QuantizeConfig, layout: QuantLayout, record: dict,
                   result: PassResult, float_linear: list[str]) -> None:
    import torch

    from mmopt.modules.embedding import Int8Embedding

    dtype = getattr(torch, record["compute_dtype"][part])
    # attention left fused (excluded, or a variant without a Linear-only form) reads out_proj.weight itself
    fused = {name: "inside a fused attention that reads this weight directly"
             for name, module in model.named_modules(part) if _is_attention(module, layout)}
    for name, module in list(model.named_modules(part)):
        if type(module) not in _LINEAR_TYPES():
            if isinstance(module, torch.nn.Embedding) and cfg.embeddings == "int8":
                glob = excluded(name, cfg.exclude)
                if glob:
                    result.skipped.append(Skip(name, f"excluded by {glob!r}"))
                    continue
                _set(model.module, name, Int8Embedding.from_embedding(module))
                record["embeddings"].append(name)
                result.changed.append(Change(name, describe(module.weight), "int8 rows"))
            continue
        reason = _keep_reason(name, cfg.exclude, {**layout.keep, **fused})
        if reason:
            result.skipped.append(Skip(name, reason))
            float_linear.append(name)
            continue
        before = describe(module.weight)
        _set(model.module, name, quantized_linear(module, cfg.method, cfg.blocksize, cfg.int8_threshold, dtype,
                                                   _device_of(module)))
        record["linear"].append(name)
        result.changed.append(Change(name, before, f"bnb {cfg.method}"))
    if cfg.embeddings == "int8":
        for name, kind in layout.bare_weights.items():
            if kind == "table" and model.owns(part, name):
                glob = excluded(name, cfg.exclude)
                if glob:
                    result.skipped.append(Skip(name, f"excluded by {glob!r}"))
                    continue
                before = describe(_get(model.module, name))
                _int8_table(model, name)
                record["tables"].append(name)
                result.changed.append(Change(name, before, "int8 rows"))


def _LINEAR_TYPES() -> tuple:
    import torch

    return (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)


def _keep_reason(name: str, globs: list[str], keep: dict) -> str | None:
    glob = excluded(name, globs)
    if glob:
        return f"excluded by {glob!r}"
    owner = _under_any(name, keep)
    return keep[owner] if owner else None


def quantized_linear(linear: nn.Linear, method: str, blocksize: int, threshold: float, dtype: torch.dtype,
                     device: str) -> nn.Module:
    """A bitsandbytes copy of ``linear`` quantized on ``device`` (bitsandbytes quantizes when moved there)."""
    import torch

    bnb = _bnb()
    bias = linear.bias is not None
    weight = linear.weight.detach().to("cpu", dtype)
    if method == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=threshold)
        new.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                compress_statistics=False, quant_type=method)
        new.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=blocksize,
                                       compress_statistics=False, quant_type=method, module=new)
        if linear.in_features % blocksize or linear.out_features % 32:
            # bitsandbytes (0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first CPU forward,
            # and that repacking fails unless each row is a whole number of blocks and the rows come in tiles
            # of 32 (functional._convert_weight_packed_for_cpu): such layers keep the portable kernel.
            new.support_avx512bf16_for_cpu = False
    if bias:
        new.bias = torch.nn.Parameter(linear.bias.detach().to("cpu", dtype).clone(), requires_grad=False)
    new = new.to(device)
    # open_clip picks its compute dtype from the first MLP's weight dtype unless this attribute says otherwise
    new.int8_original_dtype = dtype
    return new.eval()


def _int8_table(model: Model, name: str) -> None:
    from mmopt.modules.embedding import int8_rows_on

    owner_name, _, attr = name.rpartition(".")
    owner = _get(model.module, owner_name) if owner_name else model.module
    int8_rows_on(owner, attr)
    # parametrize moves the tensor to <owner>.parametrizations.<attr>.*: keep it in its part's key prefixes
    moved = f"{owner_name + '.' if owner_name else ''}parametrizations.{attr}."
    for part in model.parts:
        prefixes = model.part_prefixes(part)
        if name in prefixes and moved not in prefixes:
            prefixes.append(moved)


def _note_uncovered(model: Model, part: str, result: PassResult) -> None:
    """Convolutions, and any other float matrix no swap turned into a Linear, are listed as not covered."""
    import torch

    convs = [name for name, m in model.named_modules(part) if isinstance(m, torch.nn.modules.conv._ConvNd)]
    for name in convs:
        result.skipped.append(Skip(name, "convolution: bitsandbytes has no quantized convolution (not covered)"))
    noted = {s.module for s in result.skipped}
    for name, tensor in model.named_tensors(part, buffers=False):
        owner = name.rpartition(".")[0]
        if tensor.dim() < 2 or not tensor.is_floating_point() or owner in noted or name in noted:
            continue
        result.skipped.append(Skip(name, f"{describe(tensor)} left as it is: not a Linear or an embedding table"))


def _summary(skipped: list[Skip]) -> str:
    """One line for the report (the full list is in the pass's ``skipped``): norms and biases always stay."""
    counts: dict[str, int] = {}
    for skip in skipped:
        key = skip.reason.split(":")[0].split(" by ")[0]
        counts[key] = counts.get(key, 0) + 1
    listed = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    return f"norms, biases{'; ' + listed if listed else ''}"


# --- module tree helpers -------------------------------------------------------------------------------------

def _get(root: nn.Module, name: str) -> Any:
    """The submodule or tensor attribute ``name`` of ``root``."""
    return root.get_submodule(name) if name and _is_module_path(root, name) else _attr(root, name)


def _is_module_path(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
        return True
    except AttributeError:
        return False


def _attr(root: nn.Module, name: str) -> Any:
    obj: Any = root
    for piece in name.split("."):
        obj = getattr(obj, piece)
    return obj


def _set(root: nn.Module, name: str, value: Any, replace_param: bool = False) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if replace_param and attr in owner._parameters:
        del owner._parameters[attr]
    setattr(owner, attr, value)


def _present(model: Model, name: str) -> bool:
    try:
        _get(model.module, name)
    except AttributeError:
        return False
    return model.part_of(name) is not None


def _under_any(name: str, owners: dict) -> str | None:
    return next((o for o in owners if name == o or name.startswith(o + ".")), None)


def _device_of(module: nn.Module) -> str:
    return str(next(module.parameters()).device)
