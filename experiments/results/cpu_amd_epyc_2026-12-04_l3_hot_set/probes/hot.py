import torch, sys
import pathlib; ROOT = pathlib.Path(__file__).resolve().parents[4]; sys.path[:0] = [str(ROOT), str(ROOT / "src")]
import cwic_exp, cwic_exp.cpu_decode as CD
from cwic_exp.cpu_decode import CwicLinear
from experiments.bench.cpu_decode import forced_setup
torch.set_num_threads(2)
model, prompt, ids, mask, stripe, name = forced_setup("smollm2")
cwic_exp.to_cwic(model, stripe_size=stripe)
st = CD.calibrate_apr(model, ids, 3.0, attention_mask=mask)
print("apr", st["apr"])
store = CD._collect(model, ids, mask)
segs_f, segs_b = [], []
for m, x in store.items():
    if isinstance(m, CwicLinear):
        mean, std = m.running_stats()
        z = ((x - mean) / std.clamp_min(1e-12)).abs()          # (T, N)
        th = m.theta.detach().float()                           # (k, N)
        on = (z[:, None, :] >= th[None]).float().mean(0)       # (k, N)
        rows = m._rows.float().cpu()
        segs_f.append(on.flatten()); segs_b.append((rows[:, None] * 2).expand_as(on).flatten())
    else:
        scale = m.running_stats()[1]
        on = ((x.abs() / scale.clamp_min(1e-12)) >= m.phi.detach()).float().mean(0)
        hid = model.config.hidden_size
        segs_f.append(on.flatten()); segs_b.append(torch.full_like(on.flatten(), 2 * hid * 2))
f = torch.cat(segs_f); b = torch.cat(segs_b)
tot = float(b.sum()); traffic = float((f * b).sum())
print(f"segments {f.numel()}, total {tot/2**20:.1f} MiB, traffic/token {traffic/2**20:.1f} MiB, mean density {traffic/tot:.3f}")
o = torch.argsort(f, descending=True)
cb = torch.cumsum(b[o], 0); ct = torch.cumsum((f * b)[o], 0)
for MB in (4, 8, 16, 24, 32, 48):
    k = int(torch.searchsorted(cb, torch.tensor(MB * 2.0**20)))
    print(f"hot set {MB:3d} MiB covers {float(ct[k-1])/traffic*100:5.1f}% of traffic (uniform: {MB*2**20/tot*100:.1f}%)")
print("freq quantiles", [round(float(q), 3) for q in torch.quantile(f[torch.randperm(f.numel())[:100000]], torch.tensor([.1,.25,.5,.75,.9,.99]))])
