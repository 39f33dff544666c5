"""The options of a learning step (``substitute.distill``, ``prune.recover``), shared by both passes."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from mmopt.distill.precision import Precision
from mmopt.passes.base import PassConfig


class Training(PassConfig):
    steps: int = Field(400, ge=0, description="optimizer steps (at most)")
    lr: float | None = Field(None, gt=0, description="AdamW peak learning rate (default: chosen by a range test "
                                                     "on the fit split)")
    batch_size: int = Field(16, gt=0, description="inputs per step")
    loss: Literal["cosine", "mse"] = Field("cosine", description="1 - cosine similarity, or mean squared error")
    match: Literal["auto", "output", "tokens"] = Field(
        "auto", description="match the part's output, or also every token's hidden state (auto: tokens where the "
                            "student keeps the teacher's width and the adapter can run hidden states)")
    augment: Literal["auto", "on", "off"] = Field(
        "auto", description="widen the calibration set with unlabeled variations the teacher labels (text: crops, "
                            "shuffles, mixes, vocabulary words, general English sentences; images: crops, flips, "
                            "colour jitter, mixing); auto: on when the set is small")
    general_text: float = Field(
        0.5, ge=0, le=0.75, description="when augmenting text: this share of each batch is general English sentences "
                                        "shipped with mmopt, so the student also learns outside the calibration "
                                        "domain (0: none)")
    teacher_labels: Precision = Field(
        "auto", description="precision the teacher labels training batches (and a student's projection texts) in "
                            "(auto: bfloat16 where the device multiplies it natively: CPUs with AMX or AVX512-BF16, "
                            "CUDA GPUs that support it; float32 elsewhere); held-out scores and refits are always "
                            "float32")
    train_precision: Precision = Field(
        "auto", description="precision of the student's forward and backward (bfloat16 autocast; weights, gradients "
                            "and optimizer states stay float32). auto: bfloat16 where the device multiplies it "
                            "natively, as for teacher_labels")
    eval_every: int = Field(50, gt=0, description="score the held-out split every this many steps")
    patience: int | None = Field(4, gt=0, description="stop after this many held-out scores without a gain "
                                                      "(null: run every step)")
