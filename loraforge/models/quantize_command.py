"""``loraforge quantize MODEL --out DIR``: write a bitsandbytes-format 4-bit checkpoint, or with
``--type llm_int8`` an 8-bit (LLM.int8) one: int8 rows with one absmax each (``weight`` + ``SCB``)
and ``llm_int8_threshold`` recorded for the matmul's outlier decomposition.

The output folder loads in transformers + bitsandbytes (``AutoModelForCausalLM.from_pretrained``)
and in loraforge (``load_model``) alike; it holds ``model.safetensors``, ``config.json`` with
``quantization_config``, ``generation_config.json`` and the tokenizer with its chat template.
Prints the weight memory before and after, with bits per parameter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loraforge.errors import UserError, check_choice

BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 .. 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="HF folder, .gguf file or alias (smollm2-135m-instruct)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    parser.add_argument("--type", default="nf4", metavar="nf4|fp4|llm_int8",
                        help="4-bit data type, or llm_int8 for LLM.int8's 8-bit rows (default nf4)")
    parser.add_argument("--blocksize", type=int, default=None, metavar="N",
                        help="weights per absmax block (default 64; 4-bit only)")
    parser.add_argument(
        "--no-double-quant", dest="double_quant", action="store_false", default=None,
        help="keep absmax in fp32 instead of 8 bits (4.5 instead of 4.127 bits/param at block 64; 4-bit only)",
    )
    parser.add_argument("--llm-int8-threshold", type=float, default=None, metavar="T",
                        help="llm_int8: outlier threshold of the mixed-precision matmul (default 6.0; 0: none)")
    parser.add_argument("--device", default=None, help="quantize on this device (e.g. cuda; default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from loraforge.models.bnb_checkpoint import save_quantized
    from loraforge.models.cache import check_output_dir
    from loraforge.models.load import load_model
    from loraforge.models.memory import describe_memory
    from loraforge.models.resolve import detect_format, resolve_model_path
    from loraforge.models.validate import check_quantizable
    from loraforge.quant.bnb_format import BNB_QUANT_TYPES
    from loraforge.quant.int8_rowwise import DEFAULT_THRESHOLD, INT8_TYPE, check_threshold
    from loraforge.quant.replace import quantize_model

    check_choice(args.type, (*BNB_QUANT_TYPES, INT8_TYPE), "quantization type", where="--type")
    eight_bit = args.type == INT8_TYPE
    if eight_bit:
        for flag, given in (("--blocksize", args.blocksize is not None), ("--no-double-quant", args.double_quant is False)):
            if given:
                raise UserError("llm_int8 keeps one absmax per weight row, not per block, and no nested scales; "
                                "drop this option (it applies to nf4 / fp4)", where=flag)
        threshold = check_threshold(DEFAULT_THRESHOLD if args.llm_int8_threshold is None else args.llm_int8_threshold,
                                    where="--llm-int8-threshold")
    elif args.llm_int8_threshold is not None:
        raise UserError(f"the outlier threshold belongs to --type llm_int8, not {args.type}", where="--llm-int8-threshold")
    args.blocksize = 64 if args.blocksize is None else args.blocksize
    args.double_quant = args.double_quant is not False
    if args.blocksize not in BLOCKSIZES:
        raise UserError(
            f"block size {args.blocksize} is not supported; expected a power of two from 32 to 4096",
            where="--blocksize",
        )
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    fmt = detect_format(resolve_model_path(args.model))
    if fmt in ("bnb-4bit", "bnb-8bit"):
        what = "a 4-bit" if fmt == "bnb-4bit" else "an 8-bit"
        raise UserError(f"is already {what} checkpoint; quantize a full-precision model", where=args.model)

    status = Console(file=sys.stderr, highlight=False)
    start = time.perf_counter()
    with status.status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, device=args.device)
    check_quantizable(model.config.model_type, where=args.model)
    before = describe_memory(model)
    with status.status(f"quantizing to {args.type}"):
        if eight_bit:
            quantize_model(model, quant_type=INT8_TYPE, threshold=threshold)
        else:
            quantize_model(model, quant_type=args.type, blocksize=args.blocksize, double_quant=args.double_quant)
    with status.status(f"writing {out}"):
        save_quantized(model, tokenizer, out, overwrite=args.overwrite)
    seconds = time.perf_counter() - start

    on_disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    if eight_bit:
        how = f"row-wise absmax, outlier threshold {threshold:g}"
    else:
        how = f"block {args.blocksize}, " + ("double quant" if args.double_quant else "no double quant")
    print(f"quantized {args.model} to {args.type} ({how}) in {seconds:.1f} s -> {out}")
    print(f"  before:  {before}")
    print(f"  after:   {describe_memory(model)}")
    print(f"  on disk: {on_disk / 1e6:,.1f} MB")
    return 0

