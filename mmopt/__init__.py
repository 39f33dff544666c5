"""mmopt: shrink CLIP, BERT-family and ResNet-family models and tell the truth about their memory."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["optimize", "profile", "load", "validate", "__version__"]


def __getattr__(name: str):
    # Heavy imports (torch, transformers, open_clip) wait until the API is used, so `mmopt --help` is instant.
    if name in ("optimize", "profile", "load", "validate"):
        from mmopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmopt' has no attribute {name!r}")
