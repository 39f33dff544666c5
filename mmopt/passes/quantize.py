"""Store weights in 8 or 4 bits, covering every matrix multiply and the embedding tables.

``method: int8`` (the default) stores every ``nn.Linear`` and ``nn.Embedding`` weight as torchao's
``Int8Tensor`` (int8 + one float32 scale per row, weight-only: dequantize-then-matmul, no activation quantization,
so no activation-memory penalty) inside the stock module, every other convolution as int8 per output channel (1x1
convolutions are matrix multiplies), and bare tables (open_clip's positional embedding) as int8 rows. A Hugging
Face folder written this way is the one weight set of the output and loads in transformers / sentence-transformers
through ``TorchAoConfig``. ``embeddings: int4`` puts embedding tables in 4-bit groups instead (a mixed scheme:
matmuls int8, tables 4-bit; mmopt's own format, not stock-loadable).

``method: llm_int8 | nf4 | fp4`` are bitsandbytes (LLM.int8 with outlier decomposition; 4-bit blocks): first
every matrix multiply is made an ``nn.Linear`` (``mmopt/modules``: fused attention becomes four projections, a ViT
patch convolution a Linear over patches, a bare CLIP projection matrix a Linear; which modules those are is the
adapter's word, ``QuantLayout``), then each becomes ``Linear8bitLt`` / ``Linear4bit``. transformers' bitsandbytes
format has no int8 tables, so on a stock Hugging Face folder the tables stay float (``QuantLayout.stock_tables``).
The only module of mmopt that imports bitsandbytes.

Reloading (``mmopt.load``): ``restore`` replays the swaps on a freshly built model and puts empty quantized
modules in place; ``load_state`` rebuilds torchao tensors from their saved inner tensors and each 4-bit
bitsandbytes weight with ``Params4bit.from_prequantized``.
"""
from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from mmopt.core import Model, QuantLayout, Quantization
from mmopt.errors import IntegrityError, UnsupportedError, UserError, first_line
from mmopt.memory.counting import is_low_bit, quantized_fraction
from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult, Skip, describe, excluded, target_parts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.adapters.base import Adapter
    from mmopt.quant.plan import Codes

# What bitsandbytes' blockwise 4-bit kernels accept (bitsandbytes/_ops.py, the same on CPU and CUDA).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


BNB_METHODS = ("llm_int8", "nf4", "fp4")
TORCHAO_METHODS = ("int8", "int4")     # int8 weights as torchao Int8Tensors (int4: next to mmopt's 4-bit groups)


class QuantizeConfig(PassConfig):
    method: Literal["int8", "int4", "llm_int8", "nf4", "fp4"] = Field(
        "int8", description="int8: torchao weight-only int8 rows (stock-loadable, no activation penalty); "
                            "int4: Linear layers in 4-bit groups (GPTQ or round-to-nearest), the rest as int8; "
                            "llm_int8: bitsandbytes LLM.int8 (outlier decomposition); nf4 | fp4: bitsandbytes 4-bit")
    algorithm: Literal["auto", "gptq", "rtn"] = Field(
        "auto", description="int8 | int4: gptq (codes chosen with error feedback through the calibration inputs' "
                            "Hessian, act-order; convolutions too) | rtn (round to nearest, no data) | auto: int4: "
                            "gptq when the part's calibration inputs are real (texts, bundled sample texts, images), "
                            "rtn when they would be synthetic; int8: rtn")
    max_size: float | None = Field(
        None, gt=0, le=1, description="int4: ceiling on each quantized part's weight bytes as a share of its bytes "
                                      "before the pass; the Linear layers whose 4 bits cost the most output error "
                                      "per byte saved stay int8 while the part fits")
    parts: list[str] | None = Field(None, description="parts to quantize (default: all)")
    embeddings: Literal["int8", "int4", "keep"] = Field(
        "int8", description="int8: embedding tables as per-row int8; int4 (method int8 only): tables in 4-bit "
                            "groups of group_size (mixed scheme, mmopt's own format); keep: leave them as they are")
    bias_correction: bool = Field(
        False, description="int8 | int4: subtract each quantized layer's mean output shift on the calibration inputs "
                           "from its bias (one is added where there is none, except in stock Hugging Face folders)")
    group_size: int = Field(64, ge=2, description="values per 4-bit group: of a Linear weight's inputs (method "
                                                   "int4) and of an embedding row (embeddings int4); a layer or "
                                                   "table whose width is not a multiple stays int8")
    int8_group_size: int | None = Field(
        None, ge=2, description="int8 | int4: the int8 layers' scales, one float16 scale per this many consecutive "
                                "inputs of each output channel (a Linear's inputs, a convolution's filter values; the "
                                "largest divisor of the width down to half this size) instead of one per output "
                                "channel: less rounding error for 2 bytes per group. mmopt's own format only (a stock "
                                "Hugging Face folder keeps the per-row scales its TorchAoConfig describes)")
    exclude: list[str] = Field(default_factory=list,
                               description="module-name globs kept in higher precision; each must match something")
    blocksize: int = Field(64, description=f"4-bit block size, one of {', '.join(map(str, BLOCKSIZES))}")
    int8_threshold: float = Field(
        6.0, ge=0, description="llm_int8: LLM.int8 outlier threshold, transformers' default (activation columns with a "
                               "value above it run in float16); 0 = all int8")

    @field_validator("blocksize")
    @classmethod
    def _blocksize(cls, value: int) -> int:
        if value not in BLOCKSIZES:
            raise ValueError(f"bitsandbytes accepts blocksize {', '.join(map(str, BLOCKSIZES))}, got {value}")
        return value

    @model_validator(mode="after")
    def _int4_tables(self) -> "QuantizeConfig":
        if self.embeddings == "int4" and self.method not in TORCHAO_METHODS:
            raise ValueError(f"embeddings int4 goes with method int8 or int4, got {self.method}")
        # by value, not by the fields set: a manifest's config lists every field with its default
        if self.max_size is not None and self.method != "int4":
            raise ValueError(f"max_size goes with method int4, got method {self.method}")
        if self.algorithm != "auto" and self.method not in TORCHAO_METHODS:
            raise ValueError(f"algorithm goes with method int8 or int4, got method {self.method}")
        if self.bias_correction and self.method not in TORCHAO_METHODS:
            raise ValueError(f"bias_correction goes with method int8 or int4, got method {self.method}")
        if self.int8_group_size is not None and self.method not in TORCHAO_METHODS:
            raise ValueError(f"int8_group_size goes with method int8 or int4, got method {self.method}")
        return self


class Quantize(Pass):
    name = "quantize"
    Config = QuantizeConfig

    @property
    def learns_from_calibration(self) -> bool:
        """GPTQ fits each layer's rounding to the calibration inputs; bias correction each bias to their means."""
        cfg = self.config
        return cfg.algorithm == "gptq" or (cfg.method == "int4" and cfg.algorithm == "auto") or cfg.bias_correction

    def check(self, model: Model, ctx: Context) -> None:
        """GPTQ and bias correction need real calibration inputs: refused before anything is measured."""
        from mmopt.quant.plan import require_real_inputs

        super().check(model, ctx)
        cfg = self.config
        for option, wanted in (("algorithm gptq", cfg.algorithm == "gptq"),
                               ("bias_correction", cfg.bias_correction)):
            for part in target_parts(model, cfg.parts) if wanted else []:
                require_real_inputs(model, part, ctx, option)

    def apply(self, model: Model, ctx: Context) -> PassResult:
        cfg = self.config
        if any(isinstance(earlier, Quantize) for earlier in ctx.history):
            raise UnsupportedError("quantize: the model is already quantized by an earlier quantize pass",
                                   hint="keep one quantize pass in the recipe")
        parts = target_parts(model, cfg.parts)
        if cfg.method in BNB_METHODS:
            _check_kernel(cfg, ctx.device)
        else:
            _torchao()
        layout = ctx.adapter.quantization_layout(model)
        if cfg.int8_group_size is not None and not layout.structural:
            raise UnsupportedError("quantize: int8_group_size needs mmopt's own format; this model is written as a "
                                   "stock folder, whose TorchAoConfig describes per-row int8",
                                   hint="leave int8_group_size out for this model")
        _check_globs(model, parts, cfg.exclude)
        result = PassResult()
        record: dict = {"parts": parts, "backend": backend_of(cfg.method), "swaps": [], "linear": [],
                        "embeddings": [], "int4_embeddings": [], "int4_linear": [], "convs": [], "tables": [],
                        "bias_added": [], "compute_dtype": {}}
        float_linear: list[str] = []
        for part in parts:
            record["compute_dtype"][part] = str(model.part_dtype(part)).removeprefix("torch.")
            if layout.structural:
                _swap_structures(model, part, cfg, layout, record, result)
            extra: dict = {}
            targets = _input_means(model, part, ctx) if cfg.bias_correction else None
            if cfg.method in BNB_METHODS:
                _quantize_part(model, part, cfg, layout, record, result, float_linear)
            else:
                extra = _quantize_part_coded(model, part, cfg, layout, record, result, float_linear, ctx)
            if targets is not None:
                extra["bias_corrected"] = _correct_biases(model, part, targets, layout, record, result)
            _note_uncovered(model, part, result)
            result.metrics[part] = {"quantized_fraction": round(quantized_fraction(model, part), 6),
                                    "high_precision": _summary([s for s in result.skipped
                                                                if model.owns(part, s.module)]), **extra}
        model.quantization = Quantization(
            method=cfg.method, int8_threshold=cfg.int8_threshold, blocksize=cfg.blocksize, embeddings=cfg.embeddings,
            compute_dtype=record["compute_dtype"][parts[0]] if parts else "float32", float_linear=sorted(float_linear),
            int8_modules=sorted(record["linear"] + record["embeddings"]) if cfg.method in TORCHAO_METHODS else [],
            group_size=cfg.group_size)
        result.record = record
        return result

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        """Replay the swaps and put empty quantized modules in place; ``load_state`` fills them."""
        _restore(model, self.config, record)

    def load_state(self, model: Model, record: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchao weights: each ``Int8Tensor`` from its saved inner tensors; bitsandbytes 4-bit weights: each
        ``Params4bit`` from its packed data and saved quantization state."""
        if self.config.method in TORCHAO_METHODS:
            return _torchao_state(model, record, state)
        if self.config.method == "llm_int8":
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
        four = f"{metrics['int4_linear']} Linear 4-bit ({metrics['algorithm']}), {metrics['int8_linear']} int8; " \
            if "int4_linear" in metrics else ("int8 codes by GPTQ; " if metrics.get("algorithm") == "gptq" else "")
        return f"{four}{metrics['quantized_fraction']:.1%} of weights in 8/4 bits; kept: {metrics['high_precision']}"


def backend_of(method: str) -> str:
    return "torchao" if method in TORCHAO_METHODS else "bitsandbytes"


def _torchao() -> Any:
    try:
        import torchao
    except ImportError as exc:
        raise UnsupportedError(f"quantize: torchao cannot be imported ({first_line(exc, 120)})",
                               hint="pip install torchao, or use method llm_int8 (bitsandbytes)") from None
    return torchao


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
    working = [m for m in BNB_METHODS if m != cfg.method and _probe(m, 64, device) is None]
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

    # Names, not modules: a list of the modules would keep every replaced float attention alive until the end.
    swapped: dict[str, str] = {}
    for name in [name for name, _ in model.named_modules(part)]:
        if _under_any(name, layout.keep) or _under_any(name, swapped) or excluded(name, cfg.exclude):
            continue
        module = model.module.get_submodule(name)
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
            swapped[name] = kind
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
    from mmopt.modules.quantized import Int4Embedding, Int4Linear, int8_channels_on

    if cfg.method == "int8" and "backend" not in record:
        # before torchao became the default, method int8 meant bitsandbytes LLM.int8 (and wrote no backend)
        raise IntegrityError("this checkpoint was written by an older mmopt whose quantize method int8 was "
                             "bitsandbytes LLM.int8", hint="re-run its recipe (method int8 is torchao now; "
                                                           "method llm_int8 is the old format)")
    if cfg.method in BNB_METHODS:
        _bnb()
    else:
        _torchao()
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
            if cfg.method in BNB_METHODS:
                _set(model.module, name, quantized_linear(_get(model.module, name), cfg.method, cfg.blocksize,
                                                           cfg.int8_threshold, dtype, "cpu"))
    for name in record["embeddings"]:
        if _present(model, name) and cfg.method in BNB_METHODS:
            _set(model.module, name, Int8Embedding.from_embedding(_get(model.module, name)))
    for name in record.get("int4_embeddings", []):
        if _present(model, name):
            _set(model.module, name, Int4Embedding.from_embedding(_get(model.module, name), cfg.group_size))
    for name in record.get("int4_linear", []):
        if _present(model, name):
            linear = _get(model.module, name)
            _set(model.module, name, Int4Linear.like(linear, Int4Linear.group_for(linear, cfg.group_size)))
    for name in record.get("convs", []):
        if _present(model, name):
            int8_channels_on(_get(model.module, name), group_size=cfg.int8_group_size)
    for name in record.get("bias_added", []):
        if _present(model, name):
            module = _get(model.module, name)
            dtype = getattr(torch, record["compute_dtype"].get(model.part_of(name), "float32"))
            module.bias = torch.nn.Parameter(torch.zeros(_out_channels(module), dtype=dtype), requires_grad=False)
    for name in record["tables"]:
        if _present(model, name):
            _int8_table(model, name)


# --- quantization --------------------------------------------------------------------------------------------

def _quantize_part(model: Model, part: str, cfg: QuantizeConfig, layout: QuantLayout, record: dict,
                   result: PassResult, float_linear: list[str]) -> None:
    import torch

    from mmopt.modules.embedding import Int8Embedding

    dtype = getattr(torch, record["compute_dtype"][part])
    fused = _fused_attention(model, part, layout)
    for name, module in list(model.named_modules(part)):
        if type(module) not in _LINEAR_TYPES():
            if isinstance(module, torch.nn.Embedding) and cfg.embeddings == "int8":
                glob = excluded(name, cfg.exclude)
                if glob or layout.float_tables:
                    result.skipped.append(Skip(name, f"excluded by {glob!r}" if glob else layout.float_tables))
                    continue
                _set(model.module, name, Int8Embedding.from_embedding(module))
                record["embeddings"].append(name)
                result.changed.append(Change(name, describe(module.weight), "int8 rows"))
            continue
        if _stays_float(name, cfg, {**layout.keep, **fused}, result, float_linear):
            continue
        before = describe(module.weight)
        _set(model.module, name, quantized_linear(module, cfg.method, cfg.blocksize, cfg.int8_threshold, dtype,
                                                   _device_of(module)))
        record["linear"].append(name)
        result.changed.append(Change(name, before, f"bnb {cfg.method}"))
    if cfg.embeddings == "int8":
        _quantize_tables(model, part, cfg, layout, record, result)


def _quantize_part_torchao(model: Model, part: str, cfg: QuantizeConfig, layout: QuantLayout, record: dict,
                           result: PassResult, float_linear: list[str], codes: Codes) -> None:
    """torchao Int8Tensor weights in the stock Linear / Embedding modules, int8 convolutions (GPTQ's codes where
    ``codes`` has them, rounded to nearest otherwise); the Linear layers ``codes`` has 4-bit groups for become
    ``Int4Linear``."""
    import torch

    from mmopt.modules.linear import PatchLinear
    from mmopt.modules.quantized import Int4Embedding, Int4Linear, int8_channels_on, int8_rows_of, int8_tensor

    fused = _fused_attention(model, part, layout)
    for name, module in list(model.named_modules(part)):
        if isinstance(module, torch.nn.Embedding):
            if cfg.embeddings == "keep":
                continue
            glob = excluded(name, cfg.exclude)
            if glob:
                result.skipped.append(Skip(name, f"excluded by {glob!r}"))
                continue
            before = describe(module.weight)
            # tiny tables (BERT's 2-row token types) stay int8: groups of 4-bit zero points would cost more
            if cfg.embeddings == "int4" and Int4Embedding.fits(module, cfg.group_size) and module.num_embeddings >= 8:
                _set(model.module, name, Int4Embedding.from_embedding(module, cfg.group_size))
                record["int4_embeddings"].append(name)
                result.changed.append(Change(name, before, f"4-bit groups of {cfg.group_size}"))
                continue
            module.weight = torch.nn.Parameter(int8_tensor(module.weight.detach()), requires_grad=False)
            record["embeddings"].append(name)
            result.changed.append(Change(name, before, "int8 rows (torchao)"))
        elif type(module) in _LINEAR_TYPES():
            if _stays_float(name, cfg, {**layout.keep, **fused}, result, float_linear):
                continue
            before = describe(module.weight)
            if name in codes.four:
                q = codes.four[name]
                _set(model.module, name, Int4Linear.from_codes(module, q.codes, q.scale, q.zero, q.group_size))
                record["int4_linear"].append(name)
                result.changed.append(Change(name, before, f"4-bit groups of {q.group_size} ({codes.algorithm})"))
                continue
            module.weight = torch.nn.Parameter(int8_rows_of(module.weight, codes.int8(name, module),
                                                            cfg.int8_group_size), requires_grad=False)
            record["linear"].append(name)
            result.changed.append(Change(name, before, f"{_int8_storage(module)} (torchao{_gptq_note(codes, name)})"))
        elif isinstance(module, torch.nn.modules.conv._ConvNd) and not isinstance(module, PatchLinear):
            reason = _keep_reason(name, cfg.exclude, layout.keep)
            if reason:
                result.skipped.append(Skip(name, reason))
                continue
            before = describe(module.weight)
            int8_channels_on(module, codes.int8(name, module), cfg.int8_group_size)
            record["convs"].append(name)
            result.changed.append(Change(name, before, _int8_storage(module) + _gptq_note(codes, name)))
    if cfg.embeddings != "keep":
        _quantize_tables(model, part, cfg, layout, record, result)


def _quantize_part_coded(model: Model, part: str, cfg: QuantizeConfig, layout: QuantLayout, record: dict,
                         result: PassResult, float_linear: list[str], ctx: Context) -> dict:
    """``method: int8`` / ``int4``: codes made before anything is quantized (so GPTQ's Hessians are the float
    model's), then stored. int4: every Linear layer not kept float in 4-bit groups (GPTQ or round-to-nearest),
    everything else int8; with ``max_size``, the layers whose 4 bits cost the most output error per byte go back
    to int8 rows. Returns the part's metrics."""
    import torch

    from mmopt.memory.counting import module_weight_bytes, part_weight_bytes, unique_bytes
    from mmopt.modules.linear import PatchLinear
    from mmopt.modules.quantized import Int4Linear, int8_rows_of, int8_tensor
    from mmopt.quant.plan import int8_within, part_output_errors, plan_codes, uses_gptq

    before = part_weight_bytes(model, part)
    keep = {**layout.keep, **_fused_attention(model, part, layout)}
    coded = {name: module for name, module in model.named_modules(part)
             if (type(module) in _LINEAR_TYPES() or (isinstance(module, torch.nn.modules.conv._ConvNd)
                                                     and not isinstance(module, PatchLinear)))
             and _keep_reason(name, cfg.exclude, keep) is None}
    linears = {name: module for name, module in coded.items() if cfg.method == "int4"
               and type(module) in _LINEAR_TYPES() and Int4Linear.group_for(module, cfg.group_size)}
    gptq_on = uses_gptq(model, part, cfg.method, cfg.algorithm, ctx)
    codes = plan_codes(model, part, linears, {n: m for n, m in coded.items() if n not in linears}, gptq_on,
                       cfg.group_size, ctx, cfg.int8_group_size)
    # measured while the part is still float: what each layer's 4 bits alone do to the part's output
    errors = (part_output_errors(model, part, codes, list(linears), ctx) if cfg.max_size is not None and gptq_on
              else {name: q.rel_error for name, q in codes.four.items()})
    _quantize_part_torchao(model, part, cfg, layout, record, result, float_linear, codes)
    metrics: dict = {"algorithm": codes.algorithm}
    if codes.inputs:
        metrics["calibration"] = codes.inputs
    if cfg.method != "int4":
        return metrics
    if cfg.max_size is not None:
        budget, now = int(cfg.max_size * before), part_weight_bytes(model, part)
        candidates = {}
        for name, linear in linears.items():
            # the Linear module taken out still holds its float weight: its int8 form is what a promotion costs
            as_int8 = unique_bytes([int8_tensor(linear.weight.detach(), cfg.int8_group_size), linear.bias])
            candidates[name] = (errors[name], as_int8 - module_weight_bytes(_get(model.module, name)))
        for name in int8_within(candidates, budget - now):
            linear = linears[name]
            linear.weight = torch.nn.Parameter(int8_rows_of(linear.weight, codes.int8(name, linear),
                                                            cfg.int8_group_size), requires_grad=False)
            _set(model.module, name, linear)
            record["int4_linear"].remove(name)
            record["linear"].append(name)
            change = next(c for c in result.changed if c.module == name)
            change.after = f"{_int8_storage(linear)} (torchao{_gptq_note(codes, name)}): within max_size " \
                           f"{cfg.max_size:g}, 4-bit {'part output' if gptq_on else 'weight'} error {errors[name]:.2e}"
        after = part_weight_bytes(model, part)
        metrics.update(max_size=cfg.max_size, size_ratio=round(after / before, 4), max_size_met=after <= budget)
    metrics["int4_linear"] = sum(1 for name in record["int4_linear"] if model.owns(part, name))
    metrics["int8_linear"] = sum(1 for name in record["linear"] if model.owns(part, name))
    return metrics


def _gptq_note(codes: Codes, name: str) -> str:
    return ", gptq" if name in codes.eight else ""


def _int8_storage(module: nn.Module) -> str:
    """How an int8 Linear's or convolution's scales are laid out, for the report."""
    import torch

    if isinstance(module, torch.nn.modules.conv._ConvNd):
        group_size = getattr(module.parametrizations.weight[0], "group_size", None)
        return f"int8, a scale per {group_size} filter values" if group_size else "int8 per output channel"
    block = module.weight.block_size[-1]
    return f"int8, a scale per {block} inputs" if block < module.weight.shape[-1] else "int8 rows"


def _input_means(model: Model, part: str, ctx: Context) -> dict:
    """Before quantizing: each Linear / convolution of ``part`` with its float weight and the mean of its inputs on
    the calibration inputs (``bias_correction``); refused on synthetic inputs (their mean is not the data's)."""
    import torch

    from mmopt.calibration import inputs_for
    from mmopt.modules.linear import PatchLinear
    from mmopt.quant import bias
    from mmopt.quant.plan import SEQ_LEN, require_real_inputs

    require_real_inputs(model, part, ctx, "bias_correction")
    modules = {name: module for name, module in model.named_modules(part)
               if (type(module) in _LINEAR_TYPES() or isinstance(module, torch.nn.modules.conv._ConvNd))
               and not isinstance(module, PatchLinear)}
    batches = inputs_for(model, ctx.adapter, part, ctx.calibration, SEQ_LEN, ctx.seed)
    means = bias.collect(modules, lambda batch: ctx.adapter.run(model, part, batch), batches)
    return {name: (module.weight.detach().clone(), means.of(name), getattr(module, "groups", 1))
            for name, module in modules.items() if means.of(name) is not None}


def _correct_biases(model: Model, part: str, targets: dict, layout: QuantLayout, record: dict,
                    result: PassResult) -> int:
    """Subtract each quantized layer's mean output shift from its bias; returns how many were corrected."""
    import torch

    from mmopt.quant.bias import output_shift

    quantized = set(record["linear"] + record["int4_linear"] + record["convs"])
    corrected = 0
    for name, (weight, mean, groups) in targets.items():
        if name not in quantized:
            continue
        module = _get(model.module, name)
        shift = output_shift(weight, _effective_weight(module), mean, groups)
        if module.bias is None:
            if not layout.structural:
                result.skipped.append(Skip(name, "bias correction: no bias, and a stock folder cannot gain one"))
                continue
            module.bias = torch.nn.Parameter(torch.zeros_like(shift, dtype=weight.dtype), requires_grad=False)
            record["bias_added"].append(name)
        module.bias.data -= shift.to(module.bias.dtype)
        corrected += 1
    return corrected


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer computes with."""
    from mmopt.modules.quantized import Int4Linear, is_int8_tensor

    if isinstance(module, Int4Linear):
        return module.dequantized()
    weight = module.weight
    return weight.dequantize() if is_int8_tensor(weight) else weight.detach()


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if hasattr(module, "out_channels") else module.out_features


def _torchao_state(model: Model, record: dict, state: dict) -> dict:
    """Saved ``<module>._weight_qdata`` / ``._weight_scale`` pairs back into ``<module>.weight`` Int8Tensors."""
    from mmopt.modules.quantized import int8_tensor_from

    for name in record["linear"] + record["embeddings"]:
        prefix = f"{name}._weight_"
        if f"{prefix}qdata" not in state:
            continue
        dtype = _get(model.module, name).weight.dtype
        state[f"{name}.weight"] = int8_tensor_from(state.pop(f"{prefix}qdata"), state.pop(f"{prefix}scale"), dtype)
    return state


def _quantize_tables(model: Model, part: str, cfg: QuantizeConfig, layout: QuantLayout, record: dict,
                     result: PassResult) -> None:
    """Bare tables (open_clip's positional embedding, class embedding) as int8 rows."""
    for name, kind in layout.bare_weights.items():
        if kind != "table" or not model.owns(part, name):
            continue
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


def _fused_attention(model: Model, part: str, layout: QuantLayout) -> dict[str, str]:
    """Attention left fused (excluded, or a variant without a Linear-only form) reads out_proj.weight itself:
    module name -> why its Linear weights stay as they are."""
    return {name: "inside a fused attention that reads this weight directly"
            for name, module in model.named_modules(part) if _is_attention(module, layout)}


def _stays_float(name: str, cfg: QuantizeConfig, keep: dict[str, str], result: PassResult,
                 float_linear: list[str]) -> bool:
    """Whether Linear ``name`` is kept float (excluded, or the family needs it as it is); recorded as skipped."""
    reason = _keep_reason(name, cfg.exclude, keep)
    if reason:
        result.skipped.append(Skip(name, reason))
        float_linear.append(name)
    return reason is not None


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
    if method == "llm_int8":
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

    noted = {s.module for s in result.skipped}
    convs = [name for name, m in model.named_modules(part) if isinstance(m, torch.nn.modules.conv._ConvNd)
             and not torch.nn.utils.parametrize.is_parametrized(m, "weight") and name not in noted]
    for name in convs:
        result.skipped.append(Skip(name, "convolution: bitsandbytes has no quantized convolution (not covered)"))
    noted |= set(convs)
    for name, tensor in model.named_tensors(part, buffers=False):
        owner = name.rpartition(".")[0]
        if tensor.dim() < 2 or is_low_bit(tensor) or not tensor.is_floating_point() or owner in noted \
                or name in noted:
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
