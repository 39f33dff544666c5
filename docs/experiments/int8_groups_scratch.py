"""Scratch: int8 GPTQ per output channel vs per group of g inputs (MobileNetV2, dev views). Not the pass."""
import sys, json, copy, time
sys.path.insert(0, "/work/main/scripts")
import torch, torchvision
from torchvision import transforms
from bench_quant import _calibration_sources, _ten_views
from fetch_assets import default_dest, fetch, paths
from mmopt.quant import gptq
torch.manual_seed(0)
torch.set_num_threads(2)
W = paths(default_dest())["mobilenet"]
model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(W, weights_only=True)); model.eval()
norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
aug = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.1, 0.6)), transforms.RandomHorizontalFlip()])
src = _calibration_sources()
calib = torch.stack([norm(aug(src[i % 3])) for i in range(96)])
judge = sys.argv[1] if len(sys.argv) > 1 else "dev"
folder = fetch(("dev_photos",))["dev_photos"] if judge == "dev" else paths(default_dest())["photos"]
views = _ten_views(folder)
mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
H = gptq.collect(mods, lambda b: model(b[0]), [(c,) for c in calib.split(16)])
with torch.no_grad():
    ref = torch.cat([model(v) for v in views.split(50)])

def gptq_groups(weight, hess, g):
    """int8 symmetric, one scale per g consecutive inputs of a row (g >= row: per channel)."""
    rows = weight.detach().reshape(weight.shape[0], -1).float()
    h = hess.float(); h = h if h.dim() == 3 else h[None]
    G = h.shape[0]; n = rows.shape[1]; g = min(g, n)
    Wg = rows.reshape(G, -1, n)
    ng = -(-n // g)
    pad = ng * g - n
    Wp = torch.nn.functional.pad(Wg.abs(), (0, pad)).reshape(G, Wg.shape[1], ng, g)
    scale = (Wp.amax(-1) / 127).clamp(min=1e-12).half().float()     # (G, out, ng)
    Wd, Hd = gptq._without_dead_inputs(Wg, h)
    ar = torch.arange(G)
    def qc(w, cols):
        s = scale[ar, :, cols // g]
        return torch.round(w / s).clamp(-127, 127), lambda q: q * s
    codes = gptq._error_feedback(Wd, Hd, qc, True, gptq.DAMP)
    full = scale.repeat_interleave(g, -1)[..., :n]
    return (codes * full).reshape(weight.shape)

def run(g, bc=True, skip=()):
    m = copy.deepcopy(model)
    mm = {n: x for n, x in m.named_modules() if n in mods}
    for n, mod in mm.items():
        if n in skip: continue
        M = H.sums[n] / H.rows[n]
        hess = M[..., :-1, :-1]; mean = M[..., :-1, -1]
        q = gptq_groups(mod.weight, hess, g)
        delta = (q - mod.weight.detach()).reshape(mod.weight.shape[0], -1)
        with torch.no_grad():
            mod.weight.copy_(q)
            if bc:
                Gc = mean.shape[0] if mean.dim() == 2 else 1
                me = mean.reshape(Gc, -1)
                shift = (delta.reshape(Gc, -1, me.shape[1]) * me[:, None, :]).sum(-1).reshape(-1)
                if mod.bias is None:
                    mod.bias = torch.nn.Parameter(torch.zeros(mod.weight.shape[0]))
                mod.bias -= shift
    with torch.no_grad():
        out = torch.cat([m(v) for v in views.split(50)])
    cos = torch.nn.functional.cosine_similarity(out, ref).mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    agree = int((out.argmax(-1) == ref.argmax(-1)).sum())
    return dict(g=g, bc=bc, cos=round(cos, 6), kl=round(kl, 6), views=f"{agree}/{len(ref)}")

for g in [int(a) for a in sys.argv[2].split(",")] if len(sys.argv) > 2 else (100000, 64, 32, 16):
    t = time.time(); r = run(g); r["s"] = round(time.time() - t, 1); r["judge"] = judge
    print(json.dumps(r), flush=True)

if len(sys.argv) > 3:
    dw = [n for n, x in mods.items() if isinstance(x, torch.nn.Conv2d) and x.groups > 1]
    pw = [n for n, x in mods.items() if n not in dw]
    for label, skip in (("depthwise float", dw), ("only depthwise quantized", pw), ("classifier float", ["classifier.1"]), ("first conv float", ["features.0.0"])):
        r = run(16, skip=set(skip)); r["case"] = label; print(json.dumps(r), flush=True)
