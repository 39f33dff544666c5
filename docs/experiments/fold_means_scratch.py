"""Scratch (3 Dec 2026): Torch-Pruning with and without the removed channels' means folded into their readers
(MobileNetV2, 150 development views, no training). The pass does this in mmopt/passes/prune_means.py."""
import sys, copy, warnings
sys.path.insert(0, "/work/main/scripts")
import torch, torchvision, torch_pruning as tp
from torchvision import transforms
from bench_quant import _ten_views, _calibration_sources
from fetch_assets import default_dest, fetch, paths
torch.manual_seed(0); torch.set_num_threads(2)
W = paths(default_dest())["mobilenet"]
base = torchvision.models.mobilenet_v2(); base.load_state_dict(torch.load(W, weights_only=True)); base.eval()
views = _ten_views(fetch(("dev_photos",))["dev_photos"])
norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
aug = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.1, 0.6)), transforms.RandomHorizontalFlip()])
src = _calibration_sources()
calib = torch.stack([norm(aug(src[i % 3])) for i in range(96)])
with torch.no_grad():
    ref = torch.cat([base(v) for v in views.split(50)])
nparam = lambda m: sum(p.numel() for p in m.parameters())

def input_means(model):
    means, hooks = {}, []
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and getattr(m, "groups", 1) == 1:
            def hook(mod, inp, n=n):
                x = inp[0].detach()
                mu = x.mean(dim=(0, 2, 3)) if x.dim() == 4 else x.mean(0)
                means[n] = means.get(n, 0) + mu / len(calib.split(16))
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in calib.split(16): model(b)
    for h in hooks: h.remove()
    return means

def following_bn(model):
    mods = list(model.named_modules()); nxt = {}
    for (n, m), (n2, m2) in zip(mods, mods[1:]):
        if isinstance(m, torch.nn.Conv2d) and isinstance(m2, torch.nn.BatchNorm2d): nxt[n] = m2
    return nxt

def run(label, compensate, **kw):
    m = copy.deepcopy(base)
    means = input_means(m)
    imp = kw.pop("imp", None) or tp.importance.MagnitudeImportance(p=2)
    names = {mod: n for n, mod in m.named_modules()}
    bns = following_bn(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = tp.pruner.MetaPruner(m, torch.randn(1, 3, 224, 224), importance=imp, ignored_layers=[m.classifier[1]], **kw)
        deltas, kin, kout = {}, {}, {}
        for n in means:
            mod = m.get_submodule(n); w = mod.weight
            kin[n] = torch.arange(w.shape[1]); kout[n] = torch.arange(w.shape[0]); deltas[n] = torch.zeros(w.shape[0])
        for group in pr.step(interactive=True):
            for dep, idxs in group:
                mod = dep.target.module
                n = names.get(mod)
                if n not in means: continue
                idx = torch.tensor([int(getattr(i, "idx", i)) for i in idxs], dtype=torch.long)
                keep = torch.ones(len(kin[n]) if dep.handler.__name__.endswith("in_channels") else len(kout[n]), dtype=torch.bool); keep[idx] = False
                if dep.handler.__name__.endswith("in_channels"):
                    w = mod.weight.detach()
                    wsum = w[:, idx].sum(dim=(2, 3)) if w.dim() == 4 else w[:, idx]
                    deltas[n][kout[n]] += wsum @ means[n][kin[n][idx]]
                    kin[n] = kin[n][keep]
                elif dep.handler.__name__.endswith("out_channels"):
                    kout[n] = kout[n][keep]
            group.prune()
        deltas = {n: d[kout[n]] for n, d in deltas.items()}
    if compensate:
        with torch.no_grad():
            for n, d in deltas.items():
                mod = m.get_submodule(n)
                if n in bns: bns[n].running_mean -= d
                elif getattr(mod, "bias", None) is not None: mod.bias.copy_(mod.bias + d)
                else: print("no place for", n)
    m.eval()
    with torch.no_grad():
        out = torch.cat([m(v) for v in views.split(50)])
    top1 = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(out, ref).mean().item()
    print(f"{label:45s} params {nparam(m)/nparam(base):.3f}x top1 {top1:.3f} cos {cos:.3f}", flush=True)
    return m
for r in (0.03, 0.1, 0.3):
    run(f"uniform {r}", False, pruning_ratio=r)
    run(f"uniform {r} + mean compensation", True, pruning_ratio=r)
run("global 0.3 + mean compensation", True, pruning_ratio=0.3, global_pruning=True)
