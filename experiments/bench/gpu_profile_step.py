"""One eager CWIC decode step inside an NVTX range "step", for Nsight Compute (`ncu`) at the real shapes.

    ncu --nvtx --nvtx-include "step/" -k regex:"gmm|ffn_gate|attn" --launch-count 4 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python experiments/bench/gpu_profile_step.py            # layer 0: q/k/v, attention, o, FFN

The same 1B-shaped random model and 3x-APR calibration as `gpu_tune_decode.py`; the engine runs without a
CUDA graph (ncu profiles each launch), after a prefill and two decode steps. Prints nothing of its own but
the APR. `--ffn '{"num_warps": 8}'` profiles the FFN with other tiles (`ffn_fused.ffn_updown_config`'s keys).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_decode import CONFIGS, build_model, calibrate_density, collect_calibration, measure_apr  # noqa: E402
from gpu_kernels import ensure_imports  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1B")
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--ffn", default=None, help='JSON overrides of the one-launch FFN tiles, e.g. \'{"num_warps": 8}\'')
    args = ap.parse_args(argv)
    ensure_imports()
    if args.ffn:
        import json
        from cwic_kernels.gpu import ffn_fused
        over = json.loads(args.ffn)
        c = CONFIGS[args.model]                         # the model's FFN shape is the table's key
        key = (c["hidden_size"], c["intermediate_size"])
        ffn_fused.ffn_updown_config(*key, **over)       # unknown keys: a clear error before the model is built
        ffn_fused.TUNED_UPDOWN[key] = {**ffn_fused.TUNED_UPDOWN.get(key, {}), **over}
    import cwic_exp
    from cwic_exp.engine import DecodeEngine
    dev = torch.device("cuda")
    model = build_model(args.model, dev)
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, V, (32,), generator=g).to(dev)
    calib = torch.randint(0, V, (1, 256), generator=g).to(dev)
    cwic_exp.to_cwic(model, stripe_size=512)
    z = collect_calibration(model, calib)
    calibrate_density(model, z, calib, args.apr)
    eng = DecodeEngine(model, max_len=64, cuda_graph=False)
    eng.prefill(prompt)
    eng.decode(2)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("step")
    eng.decode(1)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print(f"APR {measure_apr(model, calib)['apr']:.2f} (calibration tokens)")


if __name__ == "__main__":
    main()
