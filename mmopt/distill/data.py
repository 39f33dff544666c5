"""The samples a distillation run learns from and is scored on.

The pass's calibration data (already without the pipeline's own held-out samples, which the report's
fidelity is measured on) is split again: every ``HOLDOUT_EVERY``-th sample scores the student during training
(the best weights are kept, training stops when the score stops improving) and is never trained on. Text
samples stay text, so augmentation can vary them and the teacher labels each variation; everything else (images,
synthetic inputs) is held as tensors.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Iterable

from mmopt.calibration import HOLDOUT_EVERY, HOLDOUT_MAX

if TYPE_CHECKING:
    import torch

SMALL = 2000        # fewer fit samples than this: augmentation (``augment: auto``) is on
BUCKET = 16         # text batches are drawn BUCKET at a time and grouped by length: less padding per step
# Augmented variations a least-squares refit (``refit.py``) sees beside the fit samples: the research's 1000
# (fit + 1000 variations: 0.918 on everyday development text; fit alone: 0.840). General English sentences on top:
# with 2000 of them FFN -30% reached 0.943 on the development sentences, with 500 0.939 (refit 290 s against 110 s
# on one loaded core). The whole recipe (refit, then 300 steps) on 4000 instead of 2000 (3 Dec 2026, the session
# that chose it): development 0.9580 -> 0.9596, evaluation 0.9495 -> 0.9508 (min 0.858 -> 0.852), refit 137 s ->
# 207 s. Re-measured 3 Dec (evening), student in bfloat16: evaluation 0.9509, refit 153 s, 363 s in all on the idle
# 2-core CPU (scripts/bench_distill.py --only minilm-ffn30 --judge dev eval).
REFIT_EXTRA = 1000
REFIT_GENERAL = 4000
REFIT_PER_SAMPLE = 4   # at most this many variations per fit text: those of a few texts add little but time
REFIT_BATCH = 32
REFIT_IMAGES = 256  # 256 images of 3 x 224 x 224 in float32: 154 MB


def split(items: list) -> tuple[list, list, bool]:
    """(fit, held out, really held out?): every ``HOLDOUT_EVERY``-th item held out; with too few items to
    hold any out, the fit items score themselves (and the flag says so)."""
    fit, held = [], []
    for i, item in enumerate(items):
        (held if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and len(held) < HOLDOUT_MAX else fit).append(item)
    if not held or not fit:
        return list(items), list(items), False
    return fit, held, True


class TextData:
    """Calibration texts, tokenized per batch; ``augmenter`` (a ``TextAugmenter`` over the fit texts) or None."""

    kind = "text"

    def __init__(self, texts: list[str], tokenize: Callable[[list[str]], tuple], batch_size: int, augment: bool,
                 words: Callable[[], list[str]], seed: int = 0, general: float = 0.0):
        from mmopt.distill.augment import TextAugmenter, general_sentences

        self.fit, self.held, self.really_held = split(texts)
        self.tokenize, self.batch_size = tokenize, batch_size
        self.words = words() if augment else []
        self.general = general_sentences() if augment and general else ()
        self.augmenter = (TextAugmenter(self.fit, self.words, seed=seed, general=self.general, general_ratio=general)
                          if augment else None)
        self.seed = seed
        self.rng = random.Random(seed)
        self.queue: list[list[str]] = []
        self._order: list[int] = []

    def _draw(self, n: int) -> list[str]:
        if self.augmenter is not None:
            return self.augmenter.batch(n)
        out = []
        for _ in range(n):
            if not self._order:
                self._order = list(range(len(self.fit)))
                self.rng.shuffle(self._order)
            out.append(self.fit[self._order.pop()])
        return out

    def next_batch(self) -> tuple:
        if not self.queue:
            texts = sorted(self._draw(self.batch_size * BUCKET), key=len)
            self.queue = [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
            self.rng.shuffle(self.queue)
        return self.tokenize(self.queue.pop())

    def held_batches(self) -> Iterable[tuple]:
        texts = sorted(self.held, key=len)
        for i in range(0, len(texts), 64):
            yield self.tokenize(texts[i:i + 64])

    def refit_texts(self, extra: int | None = None, general: int = REFIT_GENERAL) -> list[str]:
        """The fit texts and, when augmenting, ``extra`` variations of them (every one varied; by default
        ``REFIT_EXTRA``, at most ``REFIT_PER_SAMPLE`` per fit text) and ``general`` general English sentences, by
        length."""
        from mmopt.distill.augment import TextAugmenter

        extra = min(REFIT_EXTRA, REFIT_PER_SAMPLE * len(self.fit)) if extra is None else extra
        texts = list(self.fit)
        if self.augmenter is not None:      # its own generator: the training draws stay as they were
            varied = TextAugmenter(self.fit, self.words, ratio=1.0, seed=self.seed + 1, general_ratio=0.0)
            texts += varied.batch(extra)
            texts += random.Random(self.seed + 2).sample(self.general, min(general, len(self.general)))
        return sorted(texts, key=len)

    def refit_batches(self, extra: int | None = None, general: int = REFIT_GENERAL) -> Callable[[], Iterable[tuple]]:
        """What a least-squares refit runs on: a callable giving the batches of ``refit_texts`` (tokenized once;
        a few MB of token ids) again for every block."""
        texts = self.refit_texts(extra, general)
        batches = [self.tokenize(texts[i:i + REFIT_BATCH]) for i in range(0, len(texts), REFIT_BATCH)]
        return lambda: iter(batches)

    def describe_augmentation(self) -> str | None:
        return self.augmenter.describe() if self.augmenter is not None else None


class TensorData:
    """Input tuples held as tensors (one row per sample); image batches may be augmented."""

    kind = "tensors"

    def __init__(self, batches: Iterable[tuple], batch_size: int, augment: bool, device: str, seed: int = 0):
        import torch

        batches = [tuple(b) for b in batches]
        if not batches:
            raise ValueError("distillation got no input batches")
        rows = [tuple(t[i] for t in batch) for batch in batches for i in range(batch[0].shape[0])]
        fit, held, self.really_held = split(rows)
        stack = lambda items: tuple(torch.stack(col).to(device) for col in zip(*items))  # noqa: E731
        self.fit, self.held = stack(fit), stack(held)
        self.batch_size = batch_size
        # Only single-tensor image batches (N x C x H x W, floating) can be cropped, flipped and mixed.
        self.images = len(self.fit) == 1 and self.fit[0].is_floating_point() and self.fit[0].dim() == 4
        self.augment = augment and self.images
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def next_batch(self) -> tuple:
        import torch

        n = self.fit[0].shape[0]
        idx = []
        while len(idx) < min(self.batch_size, n):
            if not self._order:
                self._order = torch.randperm(n, generator=self.generator).tolist()
            idx.append(self._order.pop())
        batch = tuple(t[idx] for t in self.fit)
        if self.augment:
            from mmopt.distill.augment import augment_images

            batch = (augment_images(batch[0].cpu(), self.generator).to(batch[0].device),)
        return batch

    def held_batches(self) -> Iterable[tuple]:
        n = self.held[0].shape[0]
        for i in range(0, n, 64):
            yield tuple(t[i:i + 64] for t in self.held)

    def refit_batches(self, extra: int | None = None, general: int = 0) -> Callable[[], Iterable[tuple]]:
        """The fit samples and, when augmenting images, up to ``extra`` augmented copies (drawn once, at most
        ``REFIT_IMAGES``: they are held in memory), in batches; ``general`` is for text (there is no general set
        of images)."""
        import torch

        rows, extra = self.fit, min(REFIT_EXTRA if extra is None else extra, REFIT_IMAGES)
        if self.augment and extra:
            gen = torch.Generator().manual_seed(int(self.generator.initial_seed()) + 1)
            idx = torch.randint(0, rows[0].shape[0], (extra,), generator=gen)
            from mmopt.distill.augment import augment_images

            varied = augment_images(rows[0][idx].cpu(), gen, ratio=1.0).to(rows[0].device)
            rows = (torch.cat([rows[0], varied]),)
        n = rows[0].shape[0]
        return lambda: (tuple(t[i:i + REFIT_BATCH] for t in rows) for i in range(0, n, REFIT_BATCH))

    def describe_augmentation(self) -> str | None:
        from mmopt.distill.augment import describe_images

        return describe_images() if self.augment else None


def for_part(teacher: Any, adapter: Any, part: str, calib: Any, seq_len: int, seed: int, options: Any,
             device: str) -> TextData | TensorData:
    """The run's data for ``part`` (``options``: the step's ``Training``): texts where the teacher has a tokenizer,
    else the calibration batches."""
    from mmopt.calibration import _can_tokenize, inputs_for, text_source
    from mmopt.core import is_text_part

    if is_text_part(part) and _can_tokenize(teacher, adapter):
        texts = list(text_source(calib))
        return TextData(texts, lambda chunk: tuple(t.to(device) for t in adapter.tokenize(teacher, chunk, seq_len)),
                        options.batch_size, augmenting(options, len(texts)), lambda: _vocabulary(adapter, teacher),
                        seed, options.general_text)
    batches = list(inputs_for(teacher, adapter, part, calib, seq_len, seed))
    count = sum(b[0].shape[0] for b in batches)
    return TensorData(batches, options.batch_size, augmenting(options, count), device, seed)


def augmenting(options: Any, samples: int) -> bool:
    return options.augment == "on" or (options.augment == "auto" and samples < SMALL)


def _vocabulary(adapter: Any, teacher: Any) -> list[str]:
    """Whole words of the teacher's tokenizer; none (crops, shuffles and mixes only) where the adapter has none."""
    words = getattr(adapter, "vocabulary", None)
    return words(teacher) if words is not None else []
