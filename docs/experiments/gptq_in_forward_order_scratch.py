"""Scratch (3 Dec 2026): GPTQ with Hessians from one float pass ("float"), in forward order on the quantized
model's inputs ("seq"), or in forward order toward the float outputs ("asym", GPTAQ-style); MobileNetV2 int8/int4
codes, no bias correction. Run from the repository root: python docs/experiments/gptq_in_forward_order_scratch.py
dev float,seq,asym int8 (judge dev|eval, modes, bits int8|int4). Results: docs/quantization.md."""
import sys, time, json
from pathlib import Path
import torch, torch.nn.functional as F
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import bench_quant as bq
from mmopt.quant import gptq as G
from mmopt.modules.quantized import quantize_groups4

torch.set_num_threads(2)
judge = sys.argv[1] if len(sys.argv) > 1 else "dev"
modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float", "seq", "asym"]
bits = sys.argv[3] if len(sys.argv) > 3 else "int8"
import torchvision
model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(bq.MOBILENET, weights_only=True))
model.eval()
from torchvision import transforms
srcs = bq._calibration_sources()
aug = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.1, 0.6)), transforms.RandomHorizontalFlip()])
norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
torch.manual_seed(0)
calib = torch.stack([norm(aug(srcs[i % 3])) for i in range(96)]).split(16)
folder = Path.home() / ".cache/mmopt/assets" / ("dev_photos" if judge == "dev" else "photos")
views = bq._ten_views(folder)
imgs = bq._photos(folder)

mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
# execution order
order = []
hs = [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None) for n, m in mods.items()]
with torch.no_grad():
    model(calib[0][:1])
for h in hs: h.remove()
orig = {n: m.weight.detach().clone() for n, m in mods.items()}
with torch.no_grad():
    ref_views = model(views); ref_imgs = model(imgs)


def four(name, m):
    return bits == "int4" and (isinstance(m, torch.nn.Linear) or (m.kernel_size == (1, 1) and m.groups == 1))


def rows(m, x):
    if isinstance(m, torch.nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()[None]          # (1, N, in)
    cols = F.unfold(x.float(), m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (B, C*k*k, L)
    B, CK, L = cols.shape
    cols = cols.reshape(B, m.groups, CK // m.groups, L).permute(1, 0, 3, 2).reshape(m.groups, B * L, CK // m.groups)
    return cols


class Stop(Exception):
    pass


def capture(name, batch):
    got = {}
    def hook(mod, args):
        got["x"] = args[0].detach(); raise Stop
    h = mods[name].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(batch)
    except Stop:
        pass
    finally:
        h.remove()
    return got["x"]


def quantize(name, W, H):
    m = mods[name]
    if four(name, m):
        w2 = W.reshape(W.shape[0], -1)
        gs = 32 if w2.shape[1] % 32 == 0 else 16 if w2.shape[1] % 16 == 0 else 8
        q = G.gptq(w2, H[0], gs)
        return q.dequantize().reshape(W.shape)
    q = G.gptq_int8(W, H if H.shape[0] > 1 else H[0])
    return (q.codes.float() * q.scale.float().reshape(-1, *[1] * (W.dim() - 1))).reshape(W.shape)


def run(mode):
    t = time.time()
    quant = {}
    if mode == "float":
        Hs = {}
        for name in order:
            m = mods[name]
            H = 0; n = 0
            for b in calib:
                r = rows(m, capture(name, b)); H = H + r.transpose(1, 2) @ r; n += r.shape[1]
            quant[name] = quantize(name, orig[name], H / n)
    else:
        for name in order:
            m = mods[name]
            H = 0; M = 0; n = 0
            for b in calib:
                for k in quant: mods[k].weight.data = orig[k]
                xf = rows(m, capture(name, b))
                for k in quant: mods[k].weight.data = quant[k]
                xq = rows(m, capture(name, b))
                H = H + xq.transpose(1, 2) @ xq; M = M + xf.transpose(1, 2) @ xq; n += xq.shape[1]
            H, M = H / n, M / n
            W = orig[name]
            if mode == "asym":
                g = H.shape[0]
                W3 = W.reshape(g, W.shape[0] // g, -1)          # (g, out/g, n)
                lam = 0.01 * torch.diagonal(H, dim1=1, dim2=2).mean(-1)[:, None, None]
                dead = torch.diag_embed((torch.diagonal(H, dim1=1, dim2=2) == 0).float())
                Hd = H + lam * torch.eye(H.shape[-1]) + dead
                target = W3 + torch.linalg.solve(Hd, (W3 @ (M - H)).transpose(1, 2)).transpose(1, 2)  # W + W (M - H) Hd^-1
                W = target.reshape(W.shape)
            quant[name] = quantize(name, W, H)
        for k in quant: mods[k].weight.data = orig[k]
    secs = time.time() - t
    for k in quant: mods[k].weight.data = quant[k]
    with torch.no_grad():
        ov, oi = model(views), model(imgs)
    for k in quant: mods[k].weight.data = orig[k]
    cos = F.cosine_similarity(ov, ref_views, dim=-1)
    kl = F.kl_div(ov.log_softmax(-1), ref_views.log_softmax(-1), log_target=True, reduction="batchmean")
    res = dict(mode=mode, bits=bits, judge=judge, views=int((ov.argmax(-1) == ref_views.argmax(-1)).sum()), n_views=len(ov),
               photos=int((oi.argmax(-1) == ref_imgs.argmax(-1)).sum()), n=len(oi), cos=round(float(cos.mean()), 6),
               cos_min=round(float(cos.min()), 6), kl=round(float(kl), 6), secs=round(secs, 1))
    print(json.dumps(res), flush=True)


for mode in modes:
    run(mode)
