"""Unlabeled variations of a small calibration set; the teacher labels every one of them.

Text: crops (spans), word shuffles, two-sentence mixes, words replaced by words from the tokenizer's
vocabulary, and strings of vocabulary words. In the issue-13 research (MiniLM 6 -> 3 distilled on 400 docstring
sentences, judged on everyday sentences no run saw) 75% augmented texts per batch raised the everyday cosine
from 0.77 to 0.83 and FFN -30% recovery from 0.82 to 0.90; 100% with heavier replacement did worse (0.827):
the student must still see the real sentences. General English sentences (``general_sentences``, shipped with
mmopt) took half of each batch from 2 Dec 2026: 6 -> 3 on everyday development sentences 0.849 -> 0.876 at the
rates the range test chose, the same teacher labelling them; three quarters did worse (0.872).

Images: random resized crops, horizontal flips, colour jitter (per-channel gain and offset) and mixing of two
images, on the preprocessed batch (no decoding per step).
"""
from __future__ import annotations

import bisect
import functools
import gzip
import random
import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

RATIO = 0.75                 # share of each batch that is augmented
TEXT_OPS = ("span", "shuffle", "concat", "replace", "random")
REPLACE_FRAC = 0.3           # chance a word is replaced in "replace"
ZIPF_OFFSET = 50             # vocabulary words drawn ~ 1 / (rank + offset): frequent words more often
_WORD = re.compile(r"^[a-z]{2,}$")


def vocab_words(tokenizer: Any) -> list[str]:
    """Whole alphabetic words of a WordPiece / BPE vocabulary in id order (BERT's lists them roughly by corpus
    frequency, so the order doubles as a frequency prior)."""
    seen, words = set(), []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token.startswith(("##", "[", "<")):
            continue
        word = token.lstrip("\u0120\u2581").lower()        # GPT-style and sentencepiece word starts
        if _WORD.match(word) and word not in seen:
            seen.add(word)
            words.append(word)
    return words


@functools.lru_cache(maxsize=1)
def general_sentences() -> tuple[str, ...]:
    """12,000 general-domain English sentences shipped with mmopt (``scripts/make_general_text.py``)."""
    data = resources.files("mmopt") / "data" / "general_text.txt.gz"
    return tuple(gzip.decompress(data.read_bytes()).decode().splitlines())


class TextAugmenter:
    """Draws training texts: the calibration sentences, a ``ratio`` of them replaced by a variation each or, for a
    ``general`` share of the batch, by a general English sentence."""

    def __init__(self, sentences: Sequence[str], words: Sequence[str], ratio: float = RATIO, seed: int = 0,
                 general: Sequence[str] = (), general_ratio: float = 0.0):
        if not sentences:
            raise ValueError("no sentences to augment")
        self.sentences, self.words, self.ratio = list(sentences), list(words), ratio
        self.general = list(general)
        self.general_ratio = min(general_ratio, ratio) if self.general else 0.0
        self.ops = [op for op in TEXT_OPS if self.words or op not in ("replace", "random")]
        self.rng = random.Random(seed)
        self._order: list[int] = []
        weights = [1.0 / (rank + ZIPF_OFFSET) for rank in range(len(self.words))]
        total, acc, self._cumulative = sum(weights), 0.0, []
        for w in weights:
            acc += w / total
            self._cumulative.append(acc)

    def describe(self) -> str:
        names = {"span": "crops", "shuffle": "shuffles", "concat": "mixes of two sentences",
                 "replace": "vocabulary-word replacement", "random": "vocabulary-word strings"}
        general = f"; general English sentences ({self.general_ratio:.0%})" if self.general_ratio else ""
        return (f"text: {', '.join(names[op] for op in self.ops)} "
                f"({self.ratio - self.general_ratio:.0%} of each batch){general}")

    def _sentence(self) -> str:
        if not self._order:
            self._order = list(range(len(self.sentences)))
            self.rng.shuffle(self._order)
        return self.sentences[self._order.pop()]

    def _word(self) -> str:
        index = bisect.bisect_left(self._cumulative, self.rng.random())
        return self.words[min(index, len(self.words) - 1)]

    def augment(self, text: str, op: str) -> str:
        rng, words = self.rng, text.split()
        if op == "span":
            k = max(3, int(len(words) * rng.uniform(0.3, 1.0)))
            start = rng.randint(0, max(0, len(words) - k))
            return " ".join(words[start:start + k])
        if op == "shuffle":
            rng.shuffle(words)
            return " ".join(words)
        if op == "concat":
            other = self._sentence().split()
            return " ".join(words[:max(1, int(len(words) * rng.uniform(0.3, 0.7)))]
                            + other[int(len(other) * rng.uniform(0.3, 0.7)):])
        if op == "replace":
            return " ".join(self._word() if rng.random() < REPLACE_FRAC else w for w in words)
        if op == "random":
            return " ".join(self._word() for _ in range(rng.randint(4, 30)))
        raise ValueError(f"unknown augmentation {op!r}")

    def batch(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            text, draw = self._sentence(), self.rng.random()
            if draw < self.general_ratio:
                text = self.general[self.rng.randrange(len(self.general))]
            elif draw < self.ratio:
                text = self.augment(text, self.rng.choice(self.ops))
            out.append(text)
        return out


def describe_images(ratio: float = RATIO) -> str:
    return f"images: crops, flips, colour jitter, mixes of two images ({ratio:.0%} of each batch)"


def augment_images(images: torch.Tensor, generator: torch.Generator, ratio: float = RATIO) -> torch.Tensor:
    """A batch (N x C x H x W, preprocessed) with a ``ratio`` of its images varied: a random crop of 35-100% of
    the area resized back, a horizontal flip, a per-channel gain and offset, and (for half of them) a mix with
    another image of the batch."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    out = images.clone()
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    chosen = (rand(n) < ratio).nonzero().flatten().tolist()
    for i in chosen:
        area = float(rand(1)) * 0.65 + 0.35
        ch, cw = max(8, int(h * area ** 0.5)), max(8, int(w * area ** 0.5))
        top, left = int(rand(1) * (h - ch + 1)), int(rand(1) * (w - cw + 1))
        img = F.interpolate(images[i:i + 1, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                            align_corners=False)[0]
        if float(rand(1)) < 0.5:
            img = img.flip(-1)
        gain = 1 + (rand(img.shape[0], 1, 1) - 0.5) * 0.4
        offset = (rand(img.shape[0], 1, 1) - 0.5) * 0.4
        img = img * gain + offset
        if n > 1 and float(rand(1)) < 0.5:
            other = images[int(rand(1) * n) % n]
            mix = float(rand(1)) * 0.4 + 0.5
            img = mix * img + (1 - mix) * other
        out[i] = img
    return out
