"""Keep only the parts a deployment uses, and drop output heads no embedding reads."""
from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mmopt.passes.base import Change, Context, Pass, PassConfig, PassResult

if TYPE_CHECKING:
    from mmopt.adapters.base import Adapter
    from mmopt.core import Model


class StripConfig(PassConfig):
    keep: list[str] | None = Field(None, description="parts to keep (default: all)")
    heads: bool = Field(True, description="drop heads the part embeddings do not use (BERT pooler; a stock "
                                          "Hugging Face folder keeps its weights so transformers loads cleanly)")
    features: bool = Field(False, description="CNNs: drop the classifier, output pooled features")


class Strip(Pass):
    name = "strip"
    Config = StripConfig

    def parts_named(self) -> list[tuple[tuple, str]]:
        return [(("keep", i), part) for i, part in enumerate(self.config.keep or [])]

    def apply(self, model: Model, ctx: Context) -> PassResult:
        cfg = self.config
        result = PassResult()
        for part in cfg.keep or []:
            model.check_part(part)
        for part in [p for p in list(model.parts) if cfg.keep is not None and p not in cfg.keep]:
            ctx.adapter.drop_part(model, part)
            result.changed.append(Change(part, "present", "removed"))
        heads = []
        if cfg.heads or cfg.features:
            heads = ctx.adapter.drop_unused_heads(model, features=cfg.features)
            for name in heads:
                result.changed.append(Change(name, "present", "removed"))
        result.record = {"removed": [c.module for c in result.changed], "heads": heads}
        return result

    def load_state(self, model: Model, record: dict, state: dict) -> dict:
        """A stock Hugging Face file keeps dropped heads' weights for stock loaders; mmopt leaves them out."""
        heads = tuple(f"{name}." for name in record.get("heads", []))
        return {k: v for k, v in state.items() if not k.startswith(heads)} if heads else state

    def restore(self, model: Model, record: dict, adapter: Adapter) -> None:
        """Heads are dropped again on the rebuilt model (parts not in the checkpoint are dropped by the loader)."""
        if self.config.heads or self.config.features:
            adapter.drop_unused_heads(model, features=self.config.features)

    def parts_after(self, parts: list[str]) -> list[str]:
        return [p for p in parts if self.config.keep is None or p in self.config.keep]

    @property
    def aligns_reference(self) -> bool:
        return self.config.features

    def align_reference(self, teacher: Model, record: dict, adapter: Adapter) -> None:
        """Without its classifier the model outputs features: compare against the original's features, not logits."""
        if self.config.features:
            adapter.drop_unused_heads(teacher, features=True)
