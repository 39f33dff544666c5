"""Scratch (issue 13): least-squares refit of a layer-dropped MiniLM (6 -> 3) before distillation. No training.
Judged on scripts/data/everyday_dev.txt only. Args: keep layers (e.g. 0,4,5), iterations."""
import sys, time, copy, os
import torch
from minilm_scratch import batches, dev, embed, fit_texts, load_teacher
from mmopt.distill.refit import _add_rows, _solve
torch.manual_seed(0); torch.set_num_threads(2)
teacher = load_teacher()
fit = fit_texts(int(os.environ.get("NGEN", 2000)))
keep = [int(x) for x in sys.argv[1].split(",")]
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 1
what = sys.argv[3] if len(sys.argv) > 3 else "all"
ref_dev = embed(teacher, dev)
def score(model):
    return float(torch.nn.functional.cosine_similarity(embed(model, dev), ref_dev).mean())
student = copy.deepcopy(teacher)
student.encoder.layer = torch.nn.ModuleList([student.encoder.layer[i] for i in keep])
student.config.num_hidden_layers = len(keep)
print("keep", keep, "dev", round(score(student), 4), flush=True)
depth = [keep[k + 1] for k in range(len(keep) - 1)] + [teacher.config.num_hidden_layers]
t0 = time.time()
layers = range(len(keep)) if what == "all" else [int(w) for w in what.split("+")]
for it in range(iters):
    for k in layers:
        layer = student.encoder.layer[k]
        ln = layer.output.LayerNorm
        grab = {}
        hs = [layer.intermediate.register_forward_hook(lambda m, a, o: grab.update(h=a[0], x=o)),
              ln.register_forward_pre_hook(lambda m, a: grab.update(u=a[0]))]
        stats = {"n": 0}
        with torch.no_grad():
            for b in batches(fit):
                T = teacher(**b, output_hidden_states=True).hidden_states[depth[k]]
                student(**b)
                mask = b["attention_mask"].bool()
                h, x, u, T = grab["h"][mask], grab["x"][mask], grab["u"][mask], T[mask]
                mu, sd = u.mean(-1, keepdim=True), (u.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
                ustar = (T - ln.bias) / ln.weight * sd + mu
                _add_rows(stats, x, ustar - h)
        for hk in hs: hk.remove()
        w, bias = _solve(stats, 1e-3)
        with torch.no_grad():
            layer.output.dense.weight.copy_(w.float()); layer.output.dense.bias.copy_(bias.float())
        print(f"iter {it} layer {k}: dev {score(student):.4f}  ({time.time()-t0:.0f} s)", flush=True)
