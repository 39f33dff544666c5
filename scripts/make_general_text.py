"""Writes ``mmopt/data/general_text.txt.gz``: general-domain English sentences that distillation mixes into
small calibration sets (``augment``), so a student fitted on one domain also sees everyday English.

The sentences are drawn from the word-trigram Markov model of Wikipedia articles that ships with
``essential-generators`` (MIT licence, Shane Mason; the model's source text is Wikipedia's, CC BY-SA): locally
fluent encyclopaedia English about every subject, no sentence of it copied from one article. Nothing of mmopt's
benchmark sets (``scripts/data/*``) goes in: a sentence sharing more than 40 % of its content words (four letters
or more) with one of them is dropped (the count is printed).

    pip download --no-deps essential-generators==1.0 -d /tmp/eg && unzip -o /tmp/eg/*.whl -d /tmp/eg
    PYTHONPATH=/tmp/eg python scripts/make_general_text.py
"""
from __future__ import annotations

import argparse
import gzip
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "mmopt" / "data" / "general_text.txt.gz"
MIN_WORDS, MAX_WORDS = 5, 30
OVERLAP = 0.4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[a-z']{4,}")     # content words: "the", "of" and "and" would make every sentence close


def words_of(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def benchmark_word_sets() -> list[set[str]]:
    sets = []
    for path in sorted((HERE / "data").glob("*")):
        for line in path.read_text().splitlines():
            for text in line.split("\t"):
                if text.strip():
                    sets.append(words_of(text))
    return sets


def too_close(text: str, references: list[set[str]]) -> bool:
    mine = words_of(text)
    return any(len(mine & ref) > OVERLAP * min(len(mine), len(ref)) for ref in references if ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from essential_generators.markov_textgen import MarkovTextGenerator

    random.seed(args.seed)          # the generator draws from the module-level random
    model, references = MarkovTextGenerator(), benchmark_word_sets()
    kept, seen, dropped = [], set(), 0
    while len(kept) < args.count:
        passage = model.gen_text(max_len=200).replace("\n", " ")
        for sentence in _SENTENCE_END.split(passage)[1:-1]:     # the ends are cut mid-sentence
            sentence = " ".join(sentence.split())
            if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS or sentence in seen:
                continue
            if too_close(sentence, references):
                dropped += 1
                continue
            seen.add(sentence)
            kept.append(sentence)
    OUT.write_bytes(gzip.compress(("\n".join(kept[:args.count]) + "\n").encode(), mtime=0))
    print(f"{OUT}: {args.count} sentences, {OUT.stat().st_size:,} bytes; "
          f"{dropped} dropped for sharing > {OVERLAP:.0%} of their words with a benchmark sentence")


if __name__ == "__main__":
    main()
