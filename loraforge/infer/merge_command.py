"""``loraforge merge MODEL --adapter DIR --out DIR [--dtype bf16|fp16|fp32] [--format safetensors|gguf|nf4]``

Folds the adapter into the base (in float32, a 4-bit base dequantized first). ``--into trained``
(default) merges into the model the adapter was trained on: a QLoRA run's full-precision base is
quantized again exactly as in training (its ``config.yaml`` says how) and dequantized, so the
merged model computes what the trained one did; ``--into original`` merges into the
full-precision weights instead. The command prints which one it used. It writes:

- ``safetensors`` (default): a Hugging Face folder for ``AutoModelForCausalLM.from_pretrained``,
  in ``--dtype`` (default bf16);
- ``nf4``: a bitsandbytes-format 4-bit folder (``--dtype`` is the compute dtype and the dtype of
  the unquantized tensors, default bf16), reporting how far re-quantizing moved the logits;
- ``gguf``: a GGUF file for llama.cpp / Ollama. Its storage type is ``--gguf-type``
  (f32, f16, bf16, q8_0), else ``--dtype`` (fp32 -> f32, fp16 -> f16, bf16 -> bf16), else f16.
  ``--out`` ending in ``.gguf`` names the file; otherwise it is a folder receiving ``model.gguf``
  and an Ollama ``Modelfile``.

An existing, non-empty ``--out`` is refused unless ``--overwrite``; everything is written to a
temporary sibling first and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraforge.errors import UserError

FORMATS = ("safetensors", "gguf", "nf4")
DTYPES = ("bf16", "fp16", "fp32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="base model: HF folder, .gguf file, bnb-4bit folder or alias")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder (PEFT format)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (or a .gguf file path with --format gguf)")
    parser.add_argument("--into", default="trained", metavar="{trained,original}",
                        help="trained (default): the model the adapter was trained on (a QLoRA run's 4-bit base, "
                             "dequantized); original: the full-precision weights")
    parser.add_argument("--format", default="safetensors", choices=FORMATS, help="output format (default safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="output dtype (default bf16; with --format gguf it picks the GGUF type unless --gguf-type)")
    parser.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default=None,
                        help="GGUF storage type (default: from --dtype, else f16)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from loraforge.infer.merge import merge_adapter, merge_target, save_nf4, save_safetensors

    console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
    out = Path(args.out)
    if args.gguf_type and args.format != "gguf":
        raise UserError("--gguf-type applies to --format gguf only", where="--gguf-type")
    gguf_file = _gguf_target(out, args.overwrite) if args.format == "gguf" else None
    if args.format != "gguf":
        from loraforge.models.cache import check_output_dir

        check_output_dir(out, args.overwrite)  # before the (slow) load
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or "bf16"]

    target = merge_target(args.model, args.adapter, args.into)
    console.print(f"merging {args.adapter} into {target.description}, in float32", markup=False)
    model, tokenizer = merge_adapter(args.model, args.adapter, into=args.into)
    if args.format == "safetensors":
        save_safetensors(model, tokenizer, out, dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        console.print(f"wrote {out} ({args.dtype or 'bf16'} safetensors; load with "
                      "AutoModelForCausalLM.from_pretrained)")
    elif args.format == "nf4":
        drift = save_nf4(model, tokenizer, out, dtype, overwrite=args.overwrite)
        console.print(f"wrote {out} (bitsandbytes NF4, compute dtype {args.dtype or 'bf16'})")
        console.print(f"re-quantizing the merged model: {drift.summary()}")
    else:
        _write_gguf(args, model, tokenizer, out, gguf_file)
    return 0


def _gguf_target(out: Path, overwrite: bool) -> Path:
    """The .gguf file to write; refuse an existing output unless ``overwrite``."""
    if out.suffix.lower() == ".gguf":
        if out.exists() and not overwrite:
            raise UserError("the output file exists; pass --overwrite to replace it", where=str(out))
        if out.is_dir():
            raise UserError("is a folder; expected a .gguf file path", where=str(out))
        return out
    from loraforge.models.cache import check_output_dir

    check_output_dir(out, overwrite)
    return out / "model.gguf"


def _write_gguf(args, model, tokenizer, out: Path, target: Path) -> None:
    from rich.console import Console

    from loraforge.infer.export_gguf import DTYPE_TO_GGUF, write_gguf
    from loraforge.models import detect_format, resolve_model_path

    gguf_type = args.gguf_type or DTYPE_TO_GGUF.get(args.dtype or "", "f16")
    source = resolve_model_path(args.model)
    source_gguf = source if detect_format(source) == "gguf" else None
    name = f"{source.name.removesuffix('.gguf')} + {Path(args.adapter).resolve().name}"
    if target.parent == out and out.suffix.lower() != ".gguf":
        from loraforge.models.cache import atomic_directory

        with atomic_directory(out, overwrite=True) as tmp:
            write_gguf(model, tokenizer, tmp / target.name, gguf_type, source_gguf=source_gguf, name=name)
            (tmp / "Modelfile").write_text(f"FROM ./{target.name}\n", encoding="utf-8")
    else:
        write_gguf(model, tokenizer, target, gguf_type, source_gguf=source_gguf, name=name)
    Console(file=sys.stderr, highlight=False, soft_wrap=True).print(
        f"wrote {target} (GGUF {gguf_type}; tokenizer metadata "
        f"{'copied from ' + source.name if source_gguf else 'built from the tokenizer'})")
