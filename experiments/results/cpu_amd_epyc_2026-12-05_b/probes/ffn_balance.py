"""How evenly do the two threads' static halves of the CWIC FFN share its work? SmolLM2 at 3x (calibrated),
per layer and token: the gate walk's cost (active pairs x stripe columns) and the active units, halves 0 / 1."""
import sys, statistics, torch
import os
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[os.pardir] * 4))
sys.path[:0] = [os.path.join(ROOT, "src"), os.path.join(ROOT, "experiments", "bench")]
import cpu_decode as B
B.ensure_imports()
import cwic_exp
from cwic_exp.cpu_decode import calibrate_apr
from cwic_exp.modeling.layers import CwicGatedMLP
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
calib = B.calib_batch(tok)
cwic_exp.to_cwic(model, stripe_size=192)
calibrate_apr(model, calib[0], 3.0, attention_mask=calib[1])
rec = []
def hook(mod, args, out):
    x = args[0].reshape(-1, args[0].shape[-1]).float()
    gp = mod.gate_proj
    mean = gp.running_stats()[0].float(); thr = gp.thresholds().float()        # (n,), (k, n)
    on = ((x[:, None, :] - mean).abs() >= thr[None])                          # (T, k, n)
    k = thr.shape[0]; cnt = on.sum(-1).float()                                # (T, k)
    g = gp(args[0]).reshape(x.shape[0], -1); a = mod.act_fn(g).float()
    u = (a.abs() >= mod.unit_thresholds().float())                            # (T, F)
    F = u.shape[1]
    rec.append((cnt[:, :k // 2].sum(1), cnt[:, k // 2:].sum(1), u[:, :F // 2].sum(1).float(), u[:, F // 2:].sum(1).float()))
hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CwicGatedMLP)]
ids = B.chat_ids(tok, B.PROMPT)
with torch.no_grad():
    model(torch.tensor([ids]))
g0 = torch.cat([r[0] for r in rec]); g1 = torch.cat([r[1] for r in rec])
u0 = torch.cat([r[2] for r in rec]); u1 = torch.cat([r[3] for r in rec])
print("tokens x layers", g0.numel())
print("gate pairs/thread: mean %.1f / %.1f; mean |diff| %.1f (%.1f%% of the mean)" % (g0.mean(), g1.mean(), (g0 - g1).abs().mean(), 100 * (g0 - g1).abs().mean() / ((g0 + g1) / 2).mean()))
print("units/thread: mean %.1f / %.1f; mean |diff| %.1f (%.1f%% of the mean)" % (u0.mean(), u1.mean(), (u0 - u1).abs().mean(), 100 * (u0 - u1).abs().mean() / ((u0 + u1) / 2).mean()))
# cost proxy: gate bytes (pairs * 192 * 2) + unit bytes (2 * 576 * 2)
c0 = g0 * 384 + u0 * 2304; c1 = g1 * 384 + u1 * 2304
print("bytes/thread: mean %.0f / %.0f KB; mean |diff| %.1f%% of the mean; max-side excess over balanced %.1f%%" % (c0.mean()/1e3, c1.mean()/1e3, 100 * (c0 - c1).abs().mean() / ((c0 + c1) / 2).mean(), 100 * (torch.maximum(c0, c1) / ((c0 + c1) / 2) - 1).mean()))
