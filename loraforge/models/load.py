"""``load_model``: one entry point for every model source loraforge reads.

source          how it is read
--------------  -------------------------------------------------------------------------------
HF folder       ``AutoModelForCausalLM.from_pretrained`` after checking config + safetensors
                (GPT-2's Conv1D projections become linear layers, see conv1d.py)
.gguf file      transformers' GGUF loader once, then the cached safetensors folder (see gguf.py)
bnb-4bit folder loraforge's own QuantLinear layers, no bitsandbytes (see bnb_checkpoint.py)
bnb-8bit folder loraforge's own Int8Linear (LLM.int8) layers, no bitsandbytes (same module)
alias           the file an installed package ships (see resolve.py)

With ``quantize="nf4"`` or ``"fp4"`` every ``nn.Linear`` but ``lm_head`` becomes a frozen
blockwise 4-bit :class:`~loraforge.quant.linear.QuantLinear` as in QLoRA (Dettmers et al., 2023):
W ~ code[q] * absmax per block of ``blocksize`` weights, the absmax themselves 8-bit quantized
with ``double_quant``. The k-bit types QuantLinear also knows (nf2, nf3, int4, ..., for LoftQ's
low-bit bases) work the same way but have no bitsandbytes on-disk format. With
``quantize="llm_int8"`` they become :class:`~loraforge.quant.int8_rowwise.Int8Linear` layers
(LLM.int8, Dettmers et al., 2022: int8 rows and one absmax each, the activation's outlier columns
above ``llm_int8_threshold`` multiplied in full precision); ``blocksize`` and ``double_quant``
do not apply to it. With a ``device`` the
model moves there before it is quantized, so a GPU does the quantization (bitsandbytes' CUDA
rounding, the one most published checkpoints were made with).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loraforge.errors import UserError, check_choice
from loraforge.models.conv1d import linearize_conv1d
from loraforge.models.resolve import detect_format, read_config_json, resolve_model_path
from loraforge.models.validate import check_architecture, check_quantizable, check_safetensors
from loraforge.quant.codebooks import QUANT_TYPES  # nf4, fp4 (bitsandbytes' formats), nf2, nf3, int4, ...
from loraforge.quant.int8_rowwise import DEFAULT_THRESHOLD, INT8_TYPE

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_model(
    source: str | Path,
    quantize: str | None = None,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    llm_int8_threshold: float | None = None,
):
    """(model, tokenizer) for a model folder, GGUF file, bnb-4bit/8-bit folder or alias, in eval mode.

    ``compute_dtype`` sets the dtype of the unquantized weights and of the 4-bit matmuls; None
    keeps the checkpoint's (float32 for GGUF; a bnb-4bit folder's ``bnb_4bit_compute_dtype``).
    ``llm_int8_threshold`` is the outlier threshold of ``llm_int8`` layers; None: 6.0 when
    quantizing, the recorded one for an 8-bit checkpoint (a number replaces it there: it is a
    setting of the matmul, not of the stored weights).
    """
    if quantize is not None:
        check_choice(quantize, (*QUANT_TYPES, INT8_TYPE), "quantization type")
    dtype = as_dtype(compute_dtype)
    path = resolve_model_path(source)
    fmt = detect_format(path)
    if fmt in ("bnb-4bit", "bnb-8bit", "kbit"):
        if fmt in ("bnb-4bit", "bnb-8bit"):
            from loraforge.models.bnb_checkpoint import load_bnb_checkpoint

            model, tokenizer = load_bnb_checkpoint(path, compute_dtype=dtype)
        else:
            from loraforge.models.kbit_checkpoint import load_kbit_checkpoint

            model, tokenizer = load_kbit_checkpoint(path)
        if quantize is not None:
            _check_same_quantization(model, quantize, path)
        if llm_int8_threshold is not None:
            _set_threshold(model, llm_int8_threshold, path)
        if device is not None:
            model.to(device)
        set_provenance(model, source, path)
        return model.eval(), tokenizer
    load_dtype = None if quantize is not None else dtype  # quantize the checkpoint's own values
    if fmt == "gguf":
        from loraforge.models.gguf import cached_gguf_folder

        model, tokenizer = load_hf_folder(cached_gguf_folder(path), load_dtype or torch.float32)
    else:
        if quantize is not None:
            check_quantizable(read_config_json(path)["model_type"], where=str(path / "config.json"))
        model, tokenizer = load_hf_folder(path, load_dtype)
    if device is not None:
        model.to(device)
    if quantize is not None:
        from loraforge.quant.replace import cast_unquantized, quantize_model

        quantize_model(model, quant_type=quantize, blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype,
                       threshold=DEFAULT_THRESHOLD if llm_int8_threshold is None else llm_int8_threshold)
        if dtype is not None:
            cast_unquantized(model, dtype)
    set_provenance(model, source, path)
    return model.eval(), tokenizer


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def set_provenance(model, source: str | Path, path: Path) -> None:
    """Name the model by what the user passed, never by a private cache folder: the alias, the
    GGUF file or folder as given, or the hub-style id a folder's config.json carries. It is what
    an adapter's ``base_model_name_or_path`` records."""
    name = str(source)
    if path.is_dir() and (path / "config.json").is_file():
        recorded = str(read_config_json(path).get("_name_or_path") or "")
        if HUB_ID.fullmatch(recorded) and not Path(recorded).exists():
            name = recorded
    model.name_or_path = name
    model.config._name_or_path = name


def load_tokenizer_for(source: str | Path):
    """The tokenizer of any model source, without reading its weights (``train --dry-run``):
    a GGUF file's from its metadata (or the converted folder when cached)."""
    path = resolve_model_path(source)
    if detect_format(path) != "gguf":
        return load_tokenizer(path)
    from loraforge.models.gguf import gguf_cache_entry

    entry = gguf_cache_entry(path)
    if (entry / "tokenizer_config.json").is_file():
        return load_tokenizer(entry)
    from transformers import AutoTokenizer

    from loraforge.models.quiet import quiet_transformers

    with quiet_transformers(capture_stderr=True):
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_hf_folder(folder: Path, dtype: torch.dtype | None):
    """(model, tokenizer) from a Hugging Face folder of safetensors weights, checked first."""
    from transformers import AutoModelForCausalLM

    from loraforge.models.quiet import quiet_transformers

    from safetensors import SafetensorError

    config = read_config_json(folder)
    check_architecture(config["model_type"], where=str(folder / "config.json"))
    for file in weight_files(folder):
        check_safetensors(file)
    tokenizer = load_tokenizer(folder)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
    except SafetensorError as err:  # what the header check cannot see (an unknown dtype, ...)
        raise UserError(f"cannot read the weights ({err}); expected complete .safetensors files (re-save or "
                        "re-download them)", where=str(folder)) from None
    return linearize_conv1d(model), tokenizer


def weight_files(folder: Path) -> list[Path]:
    """The ``*.safetensors`` files of a model folder (UserError when there are none)."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        missing = sorted(set(read_shard_index(index).values()) - {f.name for f in files})
        if missing:
            raise UserError(f"the shard {missing[0]!r} it lists is missing ({len(missing)} missing in all); "
                            "expected every shard of the model (re-download it)", where=str(index))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(
            "only pickled PyTorch weights (.bin/.pt) here; loraforge reads safetensors only "
            "(re-save the model with save_pretrained(..., safe_serialization=True))",
            where=str(folder),
        )
    raise UserError(
        "no *.safetensors weights in this folder; expected model.safetensors or its shards", where=str(folder)
    )


def read_shard_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file name) of a ``model.safetensors.index.json``."""
    import json

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise UserError(f"unreadable shard index ({err}); expected JSON with a 'weight_map'", where=str(index)) from None
    if not isinstance(weight_map, dict):
        raise UserError("expected JSON with a 'weight_map' object (tensor name -> shard file)", where=str(index))
    return weight_map


def load_tokenizer(folder: Path):
    """The tokenizer saved in a model folder (UserError when there is none)."""
    from transformers import AutoTokenizer

    from loraforge.models.quiet import quiet_transformers

    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(
            f"no tokenizer in this folder; expected one of {', '.join(_TOKENIZER_FILES)}", where=str(folder)
        )
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder)


def as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype, a name ("bf16", "float16", ...) or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    return _DTYPES[check_choice(str(value), _DTYPES, "dtype")]


def _check_same_quantization(model, quantize: str, path: Path) -> None:
    from loraforge.quant.int8_rowwise import Int8Linear
    from loraforge.quant.linear import QuantLinear

    stored = {m.quant_type for m in model.modules() if isinstance(m, (QuantLinear, Int8Linear))}
    if stored != {quantize}:
        raise UserError(
            f"this checkpoint is already quantized ({', '.join(sorted(stored))}); re-quantizing it as "
            f"{quantize} would stack two rounding errors: load it without a quantization type",
            where=str(path),
        )


def _set_threshold(model, threshold: float, path: Path) -> None:
    from loraforge.quant.int8_rowwise import Int8Linear, check_threshold

    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers:
        raise UserError("an outlier threshold (llm_int8_threshold) was given, but this checkpoint holds no "
                        "llm_int8 layers", where=str(path))
    for layer in layers:
        layer.threshold = check_threshold(threshold)
