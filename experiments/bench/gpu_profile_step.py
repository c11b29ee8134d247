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
from gpu_decode import calibrated_model, ffn_tile_overrides, measure_apr  # noqa: E402
from gpu_kernels import ensure_imports  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1B")
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--ffn", default=None, help='JSON overrides of the one-launch FFN tiles, e.g. \'{"num_warps": 8}\'')
    args = ap.parse_args(argv)
    ensure_imports()
    ffn_tile_overrides(args.model, args.ffn)
    from cwic_exp.engine import DecodeEngine
    model, prompt, calib = calibrated_model(args.model, torch.device("cuda"), args.apr)
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
