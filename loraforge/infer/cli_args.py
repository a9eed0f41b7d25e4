"""Arguments shared by the ``generate``, ``chat`` and ``eval`` commands."""

from __future__ import annotations

import argparse
import sys

TEMPLATE_CHOICES = ("tokenizer", "auto", "chatml", "alpaca", "llama3", "plain")


def add_model_arguments(parser: argparse.ArgumentParser, *, template: bool = True) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="base model: HF folder, .gguf file, bitsandbytes 4-bit/8-bit folder or alias (smollm2-135m-instruct)")
    parser.add_argument("--adapter", metavar="DIR", default=None, help="adapter folder to apply (unmerged)")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "llm_int8"), default=None,
                        help="load a full-precision base in 4 bits (QLoRA-style) or 8 bits (LLM.int8) before "
                             "applying the adapter")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    if template:
        parser.add_argument("--template", choices=TEMPLATE_CHOICES, default=None,
                            help="chat template (default: the one the adapter was trained with, else the tokenizer's own)")


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int = 256) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                        help=f"most tokens to generate per reply (default {max_new_tokens}); a prompt too long to "
                             "leave them room in the model's context (at most half of it) is cut from the left, "
                             "with a note")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0 = off)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (default 0 = off)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")


def settings_from_args(args: argparse.Namespace):
    from loraforge.infer.generate import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed)


def load_session(args: argparse.Namespace):
    from loraforge.infer.session import load_for_inference

    dtype = {"bf16": "bfloat16", "fp32": None}[getattr(args, "dtype", "fp32")]  # eval --dtype
    return load_for_inference(args.model, args.adapter, quantize=args.quantize, compute_dtype=dtype, device=args.device)


def stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def print_note(notice: str | None) -> None:
    """A one-line note on stderr (nothing for None)."""
    if notice:
        stderr_console().print(f"note: {notice}", markup=False)
