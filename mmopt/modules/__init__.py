"""The custom ``nn.Module``s passes install, each rebuilt by ``mmopt.load`` from a JSON record (never pickled):

- ``attention``: ``HeadSlicedAttention`` (prune: heads), ``SplitAttention`` (quantize: fused attention as Linear
  projections) and the attention-mask conversion they share;
- ``linear``: ``PatchLinear`` and ``MatmulLinear``, Linear forms of patch convolutions and bare projections;
- ``embedding``: ``Int8Embedding`` and ``Int8Rows``, embedding tables as int8 rows;
- ``swapped``: ``SwappedPart``, another model's part (plus a projection) in place of a part (substitute: swap).

They import torch at the top: import them inside the functions that need them. bitsandbytes' own modules stay in
``passes/quantize.py``, the only code that imports bitsandbytes.
"""
