import sys, torch, numpy as np
sys.path[:0] = ["/work/main", "/work/main/src"]
import cwic_exp, cwic_exp.cpu_decode as CD
from cwic_exp.modeling.layers import CwicLinear, CwicGatedMLP
from experiments.bench.cpu_decode import PROMPT, calib_batch, chat_ids
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
prompt = chat_ids(tok, PROMPT)
ids, mask = calib_batch(tok)
with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=96, do_sample=False)
seq = out[0]
cwic_exp.to_cwic(model, stripe_size=192)
st = CD.calibrate_apr(model, ids, 3.0, attention_mask=mask, stats=True, cache={})
print("apr", st["apr"])
T0 = len(prompt)
rec = []
def hook_lin(m, inp):
    x = inp[0].reshape(-1, m.in_features)[T0:].float()
    mean, std = m.running_stats()
    thr = m.theta * std
    on = ((x - mean).abs()[:, None, :] >= thr[None]).float()  # (T, k, n)
    w = torch.tensor([min(m.stripe_size, m.out_features - r*m.stripe_size) for r in range(m.num_stripes)]).float()
    rec.append((m.kind, on.mean(0), (w[:, None] * 2).expand_as(thr)))
def hook_ffn(m, inp, out):
    pass
acts = {}
def hook_mlp_pre(m, inp):
    x = inp[0]
    g = m.gate_proj(x); a = m.act_fn(g).reshape(-1, m.intermediate_size)[T0:]
    on = (a.float().abs() >= m.unit_thresholds()).float()
    rec.append(("updown", on.mean(0), torch.full((m.intermediate_size,), 4.0 * m.hidden_size)))
for mod in model.modules():
    if isinstance(mod, CwicLinear): mod.register_forward_pre_hook(hook_lin)
    if isinstance(mod, CwicGatedMLP): mod.register_forward_pre_hook(hook_mlp_pre)
with torch.no_grad():
    model(input_ids=seq[None])
f = torch.cat([r[1].flatten() for r in rec]).numpy(); b = torch.cat([r[2].flatten() for r in rec]).numpy()
kinds = np.concatenate([[r[0]] * r[1].numel() for r in rec])
print("tokens", len(seq) - T0, "pieces", len(f), "total MB", b.sum() / 1e6, "reads MB/token", (f * b).sum() / 1e6)
for k in np.unique(kinds):
    s = kinds == k
    print(f"  {k:10s} MB {b[s].sum()/1e6:7.1f} reads/token MB {(f[s]*b[s]).sum()/1e6:6.2f} density {(f[s]*b[s]).sum()/b[s].sum():.3f}")
o = np.argsort(-f); cb = np.cumsum(b[o]); cr = np.cumsum((f * b)[o])
for mb in (4, 8, 16, 24, 32):
    i = np.searchsorted(cb, mb * 1e6)
    print(f"hottest {mb} MB of pieces: {cr[i]/cr[-1]*100:.1f}% of reads (min freq {f[o][i]:.2f})")
print("freq quantiles", np.quantile(f, [0.1, .25, .5, .75, .9, .99]))
