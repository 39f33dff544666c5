"""Scratch (issue 13): which FFN units to keep before the least-squares refit. MiniLM FFN -30 %, no training.
Judged on scripts/data/everyday_dev.txt only.

Variants, as arguments: magnitude | energy | obs<step> [-oneshot] [:ridge]; a leading ``w`` weighs the refit's
tokens by 1 / var of the LayerNorm input after the FFN. ``obs<step>-oneshot`` takes mmopt's ``unit_choice.eliminate``
on the original (what the pass does), cached across the variants of one run."""
import sys, time, json, copy
import torch
from minilm_scratch import batches, dev, embed, fit_texts, load_teacher, tok
torch.manual_seed(0); torch.set_num_threads(2)
teacher = load_teacher()
fit = fit_texts(2000)
AMOUNT = 0.3
ref_dev = embed(teacher, dev)

def layer_stats(model, l, weighted=False):
    """x: the FFN's hidden units (after GELU) on every real token; weighted: each token by 1/var of the
    LayerNorm input that follows the FFN (post-LN BERT: an error e there reaches the output as gamma*P e/sigma)."""
    inter = model.encoder.layer[l].intermediate
    ln = model.encoder.layer[l].output.LayerNorm
    xs = []; ls = []
    h1 = inter.register_forward_hook(lambda m, a, o: xs.append(o.detach()))
    h2 = ln.register_forward_pre_hook(lambda m, a: ls.append(a[0].detach()))
    G = None; n = 0.0
    with torch.no_grad():
        for b in batches(fit):
            xs.clear(); ls.clear()
            model(**b)
            mask = b["attention_mask"].bool()
            x = xs[0][mask].double()
            w = torch.ones(len(x), dtype=x.dtype)
            if weighted:
                w = 1.0 / (ls[0][mask].double().var(-1, unbiased=False) + 1e-12)
            x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            g = (x1 * w[:, None]).T @ x1
            G = g if G is None else G + g
            n += float(w.sum())
    h1.remove(); h2.remove()
    return G / n

def select(method, W2, W1, b1, G):
    n = W2.shape[1]; drop = int(round(AMOUNT * n))
    if method == "magnitude":
        score = W1.pow(2).sum(1) + b1.pow(2) + W2.pow(2).sum(0)
        return torch.argsort(score, descending=True)[: n - drop].sort().values
    if method == "energy":
        score = torch.diagonal(G)[:n] * W2.pow(2).sum(0)
        return torch.argsort(score, descending=True)[: n - drop].sort().values
    if method.startswith("obs"):
        # greedy backward elimination: removing unit c costs |w_c|^2 / [G^-1]_cc, the rest re-solved (OBS)
        Ga = G.clone()          # with the ones column: the bias absorbs mean shifts
        damp = 1e-3 * torch.diagonal(Ga)[:n].mean()
        Ga[:n, :n] += damp * torch.eye(n, dtype=Ga.dtype)
        Hinv = torch.linalg.inv(Ga)
        W = torch.cat([W2.double(), torch.zeros(W2.shape[0], 1, dtype=torch.float64)], 1)   # bias column
        alive = torch.ones(n + 1, dtype=torch.bool)
        step = int(method[3:] or 1)
        removed = 0
        while removed < drop:
            d = torch.diagonal(Hinv).clone()
            cost = W.pow(2).sum(0) / d
            cost[~alive] = float("inf"); cost[n] = float("inf")
            k = min(step, drop - removed)
            cs = torch.argsort(cost)[:k]
            for c in cs.tolist():
                dcc = Hinv[c, c]
                W -= torch.outer(W[:, c], Hinv[c, :]) / dcc
                Hinv -= torch.outer(Hinv[:, c], Hinv[c, :]) / dcc
                W[:, c] = 0; alive[c] = False
            removed += k
        return torch.nonzero(alive[:n]).flatten()
    raise ValueError(method)

CACHE = {}
def run(method):
    t = time.time()
    method, _, r = method.partition(":")
    RIDGE = float(r or 1e-3)
    global WEIGHTED
    WEIGHTED = method.startswith('w')
    method = method.lstrip('w')
    model = copy.deepcopy(teacher)
    oneshot = method.endswith("-oneshot")
    method = method.removesuffix("-oneshot")
    if oneshot and method in CACHE:
        keeps = CACHE[method]
    elif oneshot:
        from mmopt.distill.unit_choice import eliminate
        keeps = []
        for l in range(6):
            lay = teacher.encoder.layer[l]
            fc1, fc2 = lay.intermediate.dense, lay.output.dense
            n = fc2.weight.shape[1]; drop = n - int(n * (1 - AMOUNT))
            sc = eliminate(fc2.weight.detach(), layer_stats(teacher, l), drop, step=int(method[3:] or 1))
            keeps.append(torch.nonzero(sc >= drop).flatten())
        CACHE[method] = keeps
    for l in range(6):
        lay = model.encoder.layer[l]
        fc1, fc2 = lay.intermediate.dense, lay.output.dense
        G = layer_stats(model, l, weighted=WEIGHTED)
        keep = keeps[l] if oneshot else select(method, fc2.weight.detach().double(), fc1.weight.detach().double(), fc1.bias.detach().double(), G)
        # least-squares refit of fc2 on the kept units (ridge 1e-3 of their mean variance), targets = the full fc2
        n = fc2.weight.shape[1]
        idx = torch.cat([keep, torch.tensor([n])])
        Gk = G[idx][:, idx]
        C = G[:, idx]                               # E[x_full1 x_keep1^T]
        Wfull = torch.cat([fc2.weight.detach().double(), fc2.bias.detach().double()[:, None]], 1)
        ridge = RIDGE * torch.diagonal(Gk)[:-1].mean()
        A = Gk + ridge * torch.diag(torch.cat([torch.ones(len(keep)), torch.zeros(1)]).double())
        Wk = torch.linalg.solve(A, (Wfull @ C).T).T
        with torch.no_grad():
            new1 = torch.nn.Linear(fc1.in_features, len(keep)); new2 = torch.nn.Linear(len(keep), fc2.out_features)
            new1.weight.copy_(fc1.weight[keep]); new1.bias.copy_(fc1.bias[keep])
            new2.weight.copy_(Wk[:, :-1].float()); new2.bias.copy_(Wk[:, -1].float())
        lay.intermediate.dense, lay.output.dense = new1, new2
    cos = torch.nn.functional.cosine_similarity(embed(model, dev), ref_dev)
    return dict(method=method + ('-oneshot' if oneshot else '') + f':{RIDGE}', dev_mean=round(float(cos.mean()), 4), dev_min=round(float(cos.min()), 4), s=round(time.time() - t))

for m in sys.argv[1:]:
    print(json.dumps(run(m)), flush=True)
