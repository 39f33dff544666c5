"""Distillation of one part of a student toward its teacher: recovery after pruning, training after substitution.

What a recipe's ``distill: {steps: N}`` / ``recover: {steps: N}`` gets without further options (issue 13):

- a held-out split of the pass's calibration data (every 5th sample) that training never sees: the student is
  scored on it (mean cosine to the teacher) at intervals, the best weights are kept, training stops when it
  stops improving;
- a learning rate chosen by a short range test on the fit split (``schedule.py``), then warm-up and cosine decay;
- a small calibration set widened without labels (``augment.py``): the teacher labels every augmented sample;
- progress as ``step n/N, loss, held out`` and a report of the chosen rate, the steps run and the held-out curve.

Modules: ``options`` (the recipe options, no torch), ``data`` (fit / held-out samples, batches),
``augment`` (text and image augmentation), ``schedule`` (range test, warm-up-cosine, best-weights keeper),
``engine`` (the loop), ``parallel`` (the loop shared by several processes), ``precision`` (the precision the
teacher labels in). Importing this package does not import torch.
"""
from mmopt.distill.engine import describe_run, distill, loss_fn, runner, use_tokens
from mmopt.distill.options import Training

__all__ = ["Training", "describe_run", "distill", "loss_fn", "runner", "use_tokens"]
