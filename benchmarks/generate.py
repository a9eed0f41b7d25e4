"""Generation speed: loraforge's 4-bit model beside transformers + bitsandbytes 4-bit.

Both arms run the same SmolLM2-135M-Instruct weights (the embedded GGUF, dequantized once into
loraforge's cache), NF4 with double quantization and block 64, lm_head and embeddings
unquantized, the same chat-templated prompts, greedy decoding of exactly ``--new-tokens`` tokens
(no early stop) with a KV cache. The peers run as their users run them, through transformers'
``generate``: bitsandbytes' ``Linear4bit`` model and a dense row (the same model unquantized, the
scale). loraforge runs its own path (``loraforge.infer.generate``: its ``QuantLinear`` and, for
the Llama family, the lean decoding loop of ``loraforge.infer.decode``); the arm
``loraforge-nf4-hf-generate`` runs the same loraforge model through transformers' ``generate``.
One warm-up generation per arm, then the median of ``--repeats`` runs, the arms taking turns.
The arm ``loraforge-nf4-reference`` runs the same loraforge model with ``LORAFORGE_KERNELS=reference``
(on CPU: dequantize the whole weight per call, the path before the fused CPU kernel).

    .venv/bin/python benchmarks/generate.py                 # CPU (float32 compute)
    .venv/bin/python benchmarks/generate.py --device cuda   # GPU (bfloat16 compute)

Batch-1 decoding reads every weight once per token, so on a GPU it is bound by memory bandwidth:
a 4-bit weight stream should beat the dense one (see shared/reference/anchors.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE_ARM = "loraforge nf4, reference path (LORAFORGE_KERNELS=reference)"
HF_GENERATE_ARM = "loraforge nf4 through transformers' generate"
PEER_ARMS = ("transformers + bitsandbytes nf4", "dense float32 (reference)", "dense bfloat16 (reference)",
             HF_GENERATE_ARM)  # run through transformers' generate
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in one sentence.",
    "List three prime numbers.",
]


def load_arms(device: str, dtype: torch.dtype, arms: list[str]):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.models import load_model, resolve_model_path
    from loraforge.models.gguf import cached_gguf_folder
    from loraforge.models.quiet import quiet_transformers

    folder = cached_gguf_folder(resolve_model_path("smollm2-135m-instruct"))
    models = {}
    if "loraforge-nf4" in arms:
        models["loraforge nf4"], tokenizer = load_model(folder, quantize="nf4", compute_dtype=dtype, device=device)
    if "loraforge-nf4-reference" in arms:
        models[REFERENCE_ARM], tokenizer = load_model(folder, quantize="nf4", compute_dtype=dtype, device=device)
    if "loraforge-nf4-hf-generate" in arms:
        models[HF_GENERATE_ARM], tokenizer = load_model(folder, quantize="nf4", compute_dtype=dtype, device=device)
    if "loraforge-nf4-bf16" in arms:  # eval --dtype bf16 (eval_throughput.py)
        models["loraforge nf4, bf16"], tokenizer = load_model(folder, quantize="nf4", compute_dtype=torch.bfloat16,
                                                              device=device)
    if "bnb-nf4" in arms:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        with quiet_transformers(capture_stderr=True):
            models["transformers + bitsandbytes nf4"] = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=bnb, device_map=device, dtype=dtype).eval()
    if "dense" in arms:
        models[f"dense {str(dtype).removeprefix('torch.')} (reference)"], tokenizer = load_model(
            folder, compute_dtype=dtype, device=device)
    if "tokenizer" not in locals():
        from loraforge.models.load import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return models, tokenizer


@contextlib.contextmanager
def kernels_mode(arm: str):
    """``LORAFORGE_KERNELS=reference`` while the reference arm runs."""
    before = os.environ.get("LORAFORGE_KERNELS")
    if arm == REFERENCE_ARM:
        os.environ["LORAFORGE_KERNELS"] = "reference"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LORAFORGE_KERNELS", None)
        else:
            os.environ["LORAFORGE_KERNELS"] = before


def run_once(arm: str, model, prompts, batch: int, new_tokens: int, device: str) -> tuple[float, list]:
    """(seconds, generated ids) for all prompts in batches of ``batch``: loraforge's arms through
    its ``generate_ids``, the peers through transformers' ``generate`` with the same settings."""
    from loraforge.infer.generate import GenerationSettings, generate_ids, left_pad

    settings = GenerationSettings(max_new_tokens=new_tokens)
    start = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        if arm in PEER_ARMS:
            ids, mask = left_pad(prompts[i:i + batch], 0, device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings.hf_config([], 0))
            outs += out[:, ids.shape[1]:].tolist()
        else:
            outs += generate_ids(model, prompts[i:i + batch], settings, stop_ids=[], pad_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, outs


def time_arms(models: dict, prompts, batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Median tokens/s per arm; the arms take turns within each repeat, so that a busy machine
    slows them alike. One warm-up run per arm first."""
    outs = {}
    for arm, model in models.items():
        with kernels_mode(arm):
            outs[arm] = run_once(arm, model, prompts, batch, new_tokens, device)[1]
    times: dict[str, list[float]] = {arm: [] for arm in models}
    for _ in range(repeats):
        for arm, model in models.items():
            with kernels_mode(arm):
                times[arm].append(run_once(arm, model, prompts, batch, new_tokens, device)[0])
    # tokens actually generated (an arm that stopped early would otherwise be credited with all of them)
    return {arm: (sum(map(len, outs[arm])) / statistics.median(t), outs[arm]) for arm, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--arms", nargs="+", default=["loraforge-nf4", "bnb-nf4", "dense"],
                        help="loraforge-nf4, loraforge-nf4-hf-generate, loraforge-nf4-reference, bnb-nf4, dense")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)

    from loraforge.infer.prompts import encode_text

    models, tokenizer = load_arms(args.device, dtype, args.arms)
    prompts = [encode_text(p, tokenizer, "tokenizer") for p in PROMPTS]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nSmolLM2-135M-Instruct, {len(prompts)} prompts, {args.new_tokens} new tokens each, greedy, "
          f"{name}, compute {str(dtype).removeprefix('torch.')}, torch {torch.__version__}\n")
    print("| arm | batch | tokens/s | tokens generated | same tokens as loraforge nf4 |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        results = time_arms(models, prompts, batch, args.new_tokens, args.repeats, args.device)
        reference = next(iter(results.values()))[1]
        for arm, (tps, outs) in results.items():
            same = sum(a == b for a, b in zip(outs, reference))
            print(f"| {arm} | {batch} | {tps:,.1f} | {sum(map(len, outs))} | {same}/{len(outs)} |", flush=True)


if __name__ == "__main__":
    main()
