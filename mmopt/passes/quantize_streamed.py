"""``quantize: {method: int8}`` on a model streamed from its weights file (``--stream``: larger than memory).

The pass runs on the model built on the meta device as it does on a loaded one, which gives the output's tensors
(names, dtypes, shapes) and the record of what it did. The values are then made one *unit* at a time while the
output is written: a swapped attention, patch convolution or bare projection, a quantized Linear, embedding or
convolution, or a quantized bare table. Each unit's original tensors are read from the source, what the record
says is replayed on them, and the unit's output tensors are handed to the writer. Memory: about one unit (the
largest is usually the token embedding table), whatever the size of the model.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmopt.passes.quantize import QuantizeConfig


class UnitValues:
    """Output tensor name -> its value, for the names under a unit the quantize pass rewrote."""

    def __init__(self, before: nn.Module, record: dict, config: QuantizeConfig, source: Path) -> None:
        # ``before``: the meta model as the quantize pass found it (earlier casts and strips applied), whose
        # modules are copied and filled from the source to rebuild each unit as the pass saw it.
        self.before, self.record, self.config, self.source = before, record, config, Path(source)
        swaps = {s["name"]: s["kind"] for s in record["swaps"]}
        modules = {name: "quantized" for name in record["linear"] + record["embeddings"] + record["convs"]}
        modules.update({name: "int4_embedding" for name in record.get("int4_embeddings", [])})
        # a Linear made by a swap is quantized as part of its swap's unit
        units = {name: kind for name, kind in modules.items() if not _under(name, swaps)}
        units.update(swaps)
        self.prefixes = {name + ".": name for name in units}
        self.prefixes.update({_table_prefix(name): name for name in record["tables"]})
        self.kinds = {**units, **{name: "table" for name in record["tables"]}}
        self._cached: tuple[str | None, dict] = (None, {})

    def unit_of(self, key: str) -> str | None:
        """The unit whose output holds tensor ``key``, or None for a tensor copied as it is."""
        return next((unit for prefix, unit in self.prefixes.items() if key.startswith(prefix)), None)

    def __call__(self, key: str) -> torch.Tensor:
        unit = self.unit_of(key)
        if self._cached[0] != unit:
            # the writer goes by dtype, then name: a unit's int8 and float tensors are asked for apart
            self._cached = (unit, self._make(unit))
        return self._cached[1][key]

    def _make(self, unit: str) -> dict[str, torch.Tensor]:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        from mmopt.weights import unique_state_dict

        kind = self.kinds[unit]
        if kind in ("table", "projection"):
            owner_name, _, attr = unit.rpartition(".")
            made, prefix = self._parameter_unit(unit, attr, kind), _dot(owner_name)
        else:
            made, prefix = self._module_unit(unit, kind), unit + "."
        tensors, _ = flatten_tensor_state_dict({prefix + k: v for k, v in unique_state_dict(made).items()})
        return tensors

    def _read(self, key: str, like: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.source), framework="pt") as reader:
            return reader.get_tensor(key).to(like.dtype)

    def _module_unit(self, name: str, kind: str) -> nn.Module:
        import torch

        from mmopt.modules.attention import split_attention_from
        from mmopt.modules.linear import patch_linear_from
        from mmopt.modules.quantized import Int4Embedding, int8_channels_on, int8_tensor

        module = copy.deepcopy(self.before.get_submodule(name)).to_empty(device="cpu")
        with torch.no_grad():
            for key, tensor in module.state_dict().items():
                tensor.copy_(self._read(f"{name}.{key}", tensor))
        if kind == "attention":
            module, _ = split_attention_from(module)
        elif kind == "patch":
            module = patch_linear_from(module)
        elif kind == "int4_embedding":
            return Int4Embedding.from_embedding(module, self.config.group_size)
        elif kind == "quantized" and isinstance(module, torch.nn.modules.conv._ConvNd):
            int8_channels_on(module, group_size=self.config.int8_group_size)
            return module
        quantized = set(self.record["linear"] + self.record["embeddings"])
        for child, sub in module.named_modules():
            if (f"{name}.{child}" if child else name) in quantized:
                group_size = self.config.int8_group_size if isinstance(sub, torch.nn.Linear) else None
                sub.weight = torch.nn.Parameter(int8_tensor(sub.weight.detach(), group_size), requires_grad=False)
        return module

    def _parameter_unit(self, name: str, attr: str, kind: str) -> nn.Module:
        import torch

        from mmopt.modules.embedding import int8_rows_on
        from mmopt.modules.linear import matmul_linear_from
        from mmopt.modules.quantized import int8_tensor

        owner_name = name.rpartition(".")[0]
        meta = getattr(self.before.get_submodule(owner_name) if owner_name else self.before, attr)
        value = self._read(name, meta)
        holder = torch.nn.Module()
        if kind == "projection":
            linear = matmul_linear_from(value)
            if f"{name}.linear" in self.record["linear"]:
                linear.linear.weight = torch.nn.Parameter(
                    int8_tensor(linear.linear.weight.detach(), self.config.int8_group_size), requires_grad=False)
            holder.add_module(attr, linear)
        else:
            holder.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
            int8_rows_on(holder, attr)
        return holder


def _under(name: str, owners: dict) -> bool:
    return any(name.startswith(owner + ".") for owner in owners)


def _dot(name: str) -> str:
    return name + "." if name else ""


def _table_prefix(name: str) -> str:
    """A table int8-stored by a parametrization is saved under ``<owner>.parametrizations.<attr>.``."""
    owner, _, attr = name.rpartition(".")
    return f"{_dot(owner)}parametrizations.{attr}."
