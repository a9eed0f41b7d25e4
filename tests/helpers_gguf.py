"""Shared pieces of the GGUF tests: a tiny random model of each exportable architecture over the
byte-level BPE test tokenizer, and llama.cpp itself (llama-cpp-python in a venv of its own, run
through ``llamacpp_probe.py``), found at ``$LORAFORGE_LLAMACPP_PYTHON`` or ``.venv-llamacpp``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "llamacpp_probe.py"

# model_type -> config overrides beyond the shared tiny shape (values chosen so that every
# architecture-specific term is exercised: multipliers != 1, partial rope, soft-capping ...)
ARCH_OVERRIDES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "olmo2": {},
    "granite": {"attention_multiplier": 0.2, "embedding_multiplier": 3.0, "residual_multiplier": 0.6,
                "logits_scaling": 2.0},
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
             "original_max_position_embeddings": 256},
    "gemma": {"tie_word_embeddings": True},
    "stablelm": {"use_qkv_bias": True},
    "phi": {},
    "gpt_neox": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    "gpt2": {"n_inner": 96, "tie_word_embeddings": True, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gemma2": {"query_pre_attn_scalar": 16, "tie_word_embeddings": True, "attn_logit_softcapping": 5.0,
               "final_logit_softcapping": 3.0, "sliding_window": 128},
    "gemma3_text": {"query_pre_attn_scalar": 16, "tie_word_embeddings": True, "sliding_window": 128,
                    "final_logit_softcapping": 3.0},
}


def arch_model(model_type: str, tokenizer, seed: int = 0):
    """A 2-layer random ``model_type`` over ``tokenizer``'s vocabulary, every weight visible:
    matrices N(0, 0.08), biases N(0, 0.1), norm weights around their neutral value."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg.update(ARCH_OVERRIDES[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32).eval()
    gemma = model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.normal_(0.0 if gemma else 1.0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def llamacpp_python() -> str | None:
    """The interpreter that has llama-cpp-python (None when there is none)."""
    candidates = [os.environ.get("LORAFORGE_LLAMACPP_PYTHON"), str(ROOT / ".venv-llamacpp" / "bin" / "python")]
    for exe in candidates:
        if exe and Path(exe).is_file():
            ok = subprocess.run([exe, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if ok:
                return exe
    return None


def llamacpp(request: dict, tmp: Path) -> dict:
    """Run one probe request in llama.cpp's venv; the reply, plus the arrays for "run"."""
    exe = llamacpp_python()
    file = tmp / f"request-{os.getpid()}-{len(list(tmp.glob('request-*')))}.json"
    if request["op"] == "run":
        request = {**request, "out": str(file.with_suffix(".npz"))}
    file.write_text(json.dumps(request), encoding="utf-8")
    done = subprocess.run([exe, str(PROBE), str(file)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        signal = " (illegal instruction)" if done.returncode in (-4, 132) else ""
        raise AssertionError(f"llama.cpp failed with exit {done.returncode}{signal} on {request}:\n"
                             f"{done.stderr[-3000:]}")
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    if request["op"] == "run":
        with np.load(request["out"]) as arrays:
            reply["arrays"] = {k: arrays[k] for k in arrays.files}
    return reply


if __name__ == "__main__":  # print where llama.cpp was found (used by `make test-llamacpp`)
    print(llamacpp_python() or "llama-cpp-python not found", file=sys.stderr)
