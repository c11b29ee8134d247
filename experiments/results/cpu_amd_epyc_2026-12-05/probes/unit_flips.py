"""How many FFN unit decisions the activation's bf16 rounding changes on a real model (2026-12-05).

SmolLM2-135M-Instruct converted with stripe 192, its thresholds calibrated to 3x APR on the chat calibration batch
(as experiments/bench/cpu_decode.py does), then run in bf16 (weights bf16; theta, phi and statistics fp32) on the
same tokens. Each layer's gate output g (bf16, the model's own) is read by a hook; the unit decision of
  - the model: |act_in_dtype(g)| = |bf16(silu(g))| >= phi*scale (what every kernel path now compares)
  - the kernels before 02c709b: |silu(g)| in fp32 >= phi*scale
is counted over the real tokens. Prints a table and a last-line JSON.
Run: PYTHONPATH=.:src python experiments/results/cpu_amd_epyc_2026-12-05/probes/unit_flips.py [APR ...]
"""
import json
import sys

import torch

import cwic_exp
from cwic_exp.cpu_decode import calibrate_apr
from cwic_kernels import reference as R
from experiments.bench.cpu_decode import forced_setup

aprs = [float(a) for a in sys.argv[1:]] or [2.0, 3.0, 4.0]
model, _, ids, mask, stripe, label = forced_setup("smollm2")
cwic_exp.to_cwic(model, stripe_size=stripe)
mlps = [m for m in model.modules() if isinstance(m, cwic_exp.CwicGatedMLP)]
cwic_names = {f"{mn}.{n}" if mn else n for mn, m in model.named_modules() if m in set(cwic_exp.iter_cwic_modules(model))
              for n, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
              if n not in ("weight", "bias")}
w32 = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in cwic_names}   # fp32 weights
cache, rows = {}, []
for i, apr in enumerate(aprs):
    model.float()
    model.load_state_dict(w32, strict=False)          # the fp32 weights again (bf16 rounding is lossy)
    st = calibrate_apr(model, ids, apr, attention_mask=mask, stats=i == 0, cache=cache)
    # the model in bf16 as a bf16 checkpoint loads (from_config in bf16, then to_cwic): theta, phi and the
    # statistics stay fp32
    keep = {(m, n): t.detach().clone() for m in cwic_exp.iter_cwic_modules(model)
            for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            if n not in ("weight", "bias")}
    model.bfloat16()
    for (m, n), t in keep.items():
        getattr(m, n).data = t
    seen = []
    hooks = [m.gate_proj.register_forward_hook(lambda mod, a, o, m=m: seen.append((m, o.detach()))) for m in mlps]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = mask.bool().reshape(-1)
    flips = ons = total = 0
    for m, g in seen:
        g = g.float().reshape(-1, g.shape[-1])[real]
        thr = m.unit_thresholds().float()
        new = R.act_in_dtype(g, "silu", torch.bfloat16).abs() >= thr
        old = torch.nn.functional.silu(g).abs() >= thr
        flips += int((new != old).sum())
        ons += int(new.sum())
        total += new.numel()
    rows.append({"apr_target": apr, "apr": float(st["apr"]), "unit_decisions": total, "on": ons, "flipped": flips,
                 "flipped_pct": 100 * flips / total, "flipped_pct_of_on": 100 * flips / max(ons, 1)})
print(f"{label}, stripe {stripe}, calibrated thresholds; bf16 forward on the calibration batch ({int(mask.sum())} tokens)")
print(f"{'APR':>8} {'decisions':>10} {'on':>9} {'flipped':>8} {'% of all':>9} {'% of on':>8}")
for r in rows:
    print(f"{r['apr']:8.2f} {r['unit_decisions']:10d} {r['on']:9d} {r['flipped']:8d} {r['flipped_pct']:9.3f} "
          f"{r['flipped_pct_of_on']:8.3f}")
print(json.dumps({"model": label, "stripe": stripe, "rows": rows}))
