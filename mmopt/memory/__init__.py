"""Every byte count in mmopt, for ``optimize`` and ``profile`` alike.

- ``counting``: bytes and parameters of tensors, modules and parts, and what they would take in another
  storage format (float16, int8, nf4);
- ``tracing``: the peak activation of one inference forward, measured on CUDA or estimated by the one
  fake-tensor tracer (``trace_forward``), always on a copy: measuring never changes the model; latency;
- ``training``: the peak of a training step (weights, gradients, optimizer state, activations);
- ``estimator``: what ``profile`` builds on those: the module tree, the largest batch under a budget, CPU
  offload, video frames in windows;
- ``what_if``: the memory each technique would reach, and the pass or option that delivers it;
- ``profile``: the ``profile`` command itself (which model, which options).
"""
