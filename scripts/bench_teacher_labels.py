"""Teacher labels in float32 against bfloat16 autocast, side by side in one run (issue 13, the swap's 10 minutes).

    python scripts/bench_teacher_labels.py [--batches 30]

A distillation step is the teacher labelling a batch, then the student's forward, backward and AdamW step. On the
batches the engine trains on (16 texts: the 400 docstrings of ``bench_distill.py`` widened by its augmentation,
half general English sentences), each batch is labelled in float32 and in bfloat16 in turn (the order alternates,
so the machine's drift hits both alike), and the student takes one step on it. Teachers: all-mpnet-base-v2 (the
swap's) and all-MiniLM-L6-v2 (FFN -30 %'s and 6 -> 3's). Prints seconds per batch, the speed-up, the labels'
cosine to float32's (sentence embeddings and every token), and the share of a step the bfloat16 labels save.
Then the student's step itself (all-MiniLM-L6-v2: forward, backward, AdamW) in float32 and under bfloat16
autocast (``train_precision``), in turn on the same batches, and what the two together save of a float32 step.
What ``auto`` picks on this machine is printed first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_distill import MINILM  # noqa: E402
from bench_substitute import corpus  # noqa: E402
from fetch_assets import fetch  # noqa: E402


def load(path: str):
    from transformers import AutoModel, AutoTokenizer

    from mmopt.paths import local_path

    folder = str(local_path(path, "teacher"))
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()

    from mmopt.distill.augment import TextAugmenter, general_sentences, vocab_words
    from mmopt.distill.precision import computing_in, resolve

    print(f"teacher_labels and train_precision auto on this machine: {resolve('auto', 'cpu')}")
    student_tok, student = load(MINILM)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    augmenter = TextAugmenter(corpus(400, 0)[0], vocab_words(student_tok), seed=0, general=general_sentences(),
                              general_ratio=0.5)
    texts = [augmenter.batch(16) for _ in range(args.batches)]
    tokenized = [student_tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
                 for batch in texts]

    def student_step(inputs: dict, dtype: str) -> float:
        started = time.perf_counter()
        with computing_in(dtype, "cpu"):
            hidden = student(**inputs).last_hidden_state
        hidden.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    teachers = {"all-mpnet-base-v2": str(fetch(("mpnet",))["mpnet"]), "all-MiniLM-L6-v2": MINILM}
    labels = {}
    print("| teacher | float32 s / batch | bfloat16 s / batch | speed-up | sentence cos mean / min | token cos min "
          "| student step s / batch | step time saved |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in teachers.items():
        tok, teacher = load(path)
        teacher.eval()
        seconds = {"float32": 0.0, "bfloat16": 0.0}
        sentence_cos, token_cos, step = [], [], 0.0
        for i, batch in enumerate(texts):
            inputs = tok(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
            out = {}
            for dtype in (("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")):
                started = time.perf_counter()
                with torch.no_grad(), computing_in(dtype, "cpu"):
                    out[dtype] = teacher(**inputs).last_hidden_state.float()
                seconds[dtype] += time.perf_counter() - started
            mask = inputs["attention_mask"]
            sentence_cos.append(F.cosine_similarity(pooled(out["float32"], mask), pooled(out["bfloat16"], mask)))
            token_cos.append(F.cosine_similarity(out["float32"][mask.bool()], out["bfloat16"][mask.bool()]))
            step += student_step(tokenized[i], "float32")
        n = len(texts)
        f32, b16, st = seconds["float32"] / n, seconds["bfloat16"] / n, step / n
        sentences, tokens = torch.cat(sentence_cos), torch.cat(token_cos)
        print(f"| {name} | {f32:.3f} | {b16:.3f} | {f32 / b16:.2f}x | {float(sentences.mean()):.6f} / "
              f"{float(sentences.min()):.6f} | {float(tokens.min()):.5f} | {st:.3f} | "
              f"{(f32 - b16) / (f32 + st):.0%} |")
        labels[name] = (f32, b16)

    steps = {"float32": 0.0, "bfloat16": 0.0}
    for i, inputs in enumerate(tokenized):
        for dtype in (("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")):
            steps[dtype] += student_step(inputs, dtype)
    f32, b16 = steps["float32"] / len(texts), steps["bfloat16"] / len(texts)
    print(f"\nstudent step (all-MiniLM-L6-v2): float32 {f32:.3f} s, bfloat16 autocast {b16:.3f} s ({f32 / b16:.2f}x)")
    for name, (label32, label16) in labels.items():
        whole32, whole16 = label32 + f32, label16 + b16
        print(f"a step with {name} labelling: all float32 {whole32:.3f} s, both in bfloat16 {whole16:.3f} s "
              f"({1 - whole16 / whole32:.0%} saved)")


if __name__ == "__main__":
    main()
