"""Perplexity throughput (what ``loraforge eval`` does on a text file): loraforge's 4-bit model
beside transformers + bitsandbytes 4-bit on the same windows.

The arms are those of ``benchmarks/generate.py`` (SmolLM2-135M-Instruct from the embedded GGUF,
NF4 + double quantization, block 64, lm_head and embeddings unquantized, dense as the scale;
``loraforge-nf4-reference`` = loraforge with ``LORAFORGE_KERNELS=reference``; ``loraforge-nf4-bf16`` =
``loraforge eval --dtype bf16``: the base in bfloat16, as bitsandbytes computes on its own on a
CPU with AVX512-BF16). Each scores the
first ``--tokens`` tokens of ``../shared/data/wiki_demo.txt`` with
:func:`loraforge.infer.evaluate.perplexity_text` (windows of ``--window`` tokens every ``--stride``),
so the work is identical and the perplexities should agree to quantization noise. Windows are
prefill (large M): loraforge dequantizes each weight once per call into a reused buffer, then one
GEMM. One warm-up window per arm, then the median of ``--repeats`` passes, the arms taking turns.

    .venv/bin/python benchmarks/eval_throughput.py --tokens 2048 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate import kernels_mode, load_arms  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_demo.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--text", default=str(DATA))
    parser.add_argument("--arms", nargs="+", default=["loraforge-nf4", "loraforge-nf4-bf16", "bnb-nf4", "dense"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from loraforge.infer.evaluate import perplexity_text, text_token_ids, windows

    models, tokenizer = load_arms("cpu", torch.float32, args.arms)
    ids = text_token_ids(Path(args.text).read_text(encoding="utf-8"), tokenizer)[: args.tokens]
    n_windows = len(windows(len(ids), args.window, args.stride))
    fed = sum(end - begin for begin, end, _ in windows(len(ids), args.window, args.stride))
    results = {}
    for arm, model in models.items():  # warm-up: one window
        with kernels_mode(arm):
            perplexity_text(model, ids[: args.window], args.window, args.window)
    times: dict[str, list[float]] = {arm: [] for arm in models}
    for _ in range(args.repeats):
        for arm, model in models.items():
            with kernels_mode(arm):
                start = time.perf_counter()
                results[arm] = perplexity_text(model, ids, args.window, args.stride)
                times[arm].append(time.perf_counter() - start)
    print(f"\nSmolLM2-135M-Instruct perplexity, {len(ids)} tokens of {Path(args.text).name}, window {args.window}, "
          f"stride {args.stride} ({n_windows} windows, {fed} tokens fed), CPU ({torch.get_num_threads()} threads), "
          f"float32 compute (but the bf16 arm), torch {torch.__version__}\n")
    print("| arm | tokens fed / s | seconds (median) | perplexity |")
    print("|---|---|---|---|")
    for arm, t in times.items():
        median = statistics.median(t)
        print(f"| {arm} | {fed / median:,.1f} | {median:.2f} | {results[arm].value:.4f} |")


if __name__ == "__main__":
    main()
