"""bitsandbytes-format 4-bit and 8-bit checkpoints, read and written without bitsandbytes.

This is the layout transformers + bitsandbytes save for a model loaded with
``BitsAndBytesConfig(load_in_4bit=True, ...)`` (the "*-bnb-4bit" checkpoints on the Hub):

- ``model.safetensors``: for each quantized linear ``L``, ``L.weight`` (packed 4-bit codes, uint8
  ``(n/2, 1)``), ``L.weight.absmax``, ``L.weight.quant_map`` and, with double quantization,
  ``L.weight.nested_absmax`` / ``L.weight.nested_quant_map``, plus
  ``L.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): UTF-8 JSON of the quant state;
  every other tensor (embeddings, norms, ``lm_head``) as usual; tied tensors stored once.
- ``config.json``: the model config plus ``quantization_config``, the dict transformers'
  ``BitsAndBytesConfig.to_dict()`` gives (quant_method "bitsandbytes", load_in_4bit,
  bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, ...), where
  ``llm_int8_skip_modules`` stays null when only the output layer is unquantized (transformers'
  default) and otherwise lists every full-precision linear layer.

The 8-bit layout (``BitsAndBytesConfig(load_in_8bit=True)``, LLM.int8) is the same folder with, for
each quantized linear ``L``, ``L.weight`` (int8 ``[out, in]``), ``L.SCB`` (float32 row absmax) and
``L.weight_format`` (uint8 0), and ``load_in_8bit`` / ``llm_int8_threshold`` in
``quantization_config``; its layers load as :class:`~loraforge.quant.int8_rowwise.Int8Linear`.

Loading builds the transformers model skeleton on the meta device (no weight memory), swaps each
quantized linear for a :class:`~loraforge.quant.linear.QuantLinear` built from its stored state,
assigns the other tensors, re-ties tied weights and computes the non-persistent buffers (rotary
frequencies, embedding scales) with transformers' own initializer.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from loraforge.errors import UserError
from loraforge.models.cache import atomic_directory, check_output_dir
from loraforge.models.resolve import read_config_json
from loraforge.models.validate import check_architecture, check_safetensors

_QUANT_STATE = re.compile(r"^(?P<module>.+)\.weight\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")


def load_bnb_checkpoint(folder: Path, compute_dtype: torch.dtype | None = None):
    """(model, tokenizer) from a bitsandbytes 4-bit or 8-bit folder, its linears as QuantLinear
    (4-bit) or Int8Linear (8-bit) layers.

    ``compute_dtype`` (default: the checkpoint's ``bnb_4bit_compute_dtype``; 8-bit: the stored
    dtype) is the 4-bit matmul dtype; the unquantized tensors keep their stored dtype unless
    ``compute_dtype`` is given.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from loraforge.models.load import load_tokenizer, weight_files
    from loraforge.models.quiet import quiet_transformers

    config_file = folder / "config.json"
    raw = read_config_json(folder)
    check_architecture(raw["model_type"], where=str(config_file))
    qconfig = raw["quantization_config"]
    eight_bit = bool(qconfig.get("load_in_8bit") or qconfig.get("_load_in_8bit"))
    tensors = _read_tensors(weight_files(folder), check_safetensors)
    tokenizer = load_tokenizer(folder)

    with quiet_transformers():
        config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    if eight_bit:
        stored = next((v.dtype for k, v in tensors.items() if v.is_floating_point() and not k.endswith(".SCB")),
                      torch.float32)
        threshold = qconfig.get("llm_int8_threshold", 6.0)
        build = _int8_builder(threshold, compute_dtype or stored, where=str(config_file))
        quantized = [k.removesuffix(".SCB") for k in tensors if k.endswith(".SCB")]
        expected = "'*.SCB' entries (int8 weights and their row scales)"
    else:
        build = _4bit_builder(compute_dtype or getattr(torch, qconfig.get("bnb_4bit_compute_dtype") or "float32"))
        quantized = [m.group("module") for m in map(_QUANT_STATE.match, tensors) if m]
        expected = "'*.weight.quant_state.bitsandbytes__nf4/__fp4' entries"
    bits = 8 if eight_bit else 4
    if not quantized:
        raise UserError(f"config.json declares a bitsandbytes {bits}-bit model but the weights hold no {expected}",
                        where=str(folder))
    for name in quantized:
        linear = _submodule(model, name, bits)
        if not isinstance(linear, nn.Linear):
            raise UserError(
                f"{name!r} is stored {bits}-bit but is not a linear layer of {type(model).__name__}", where=str(folder)
            )
        prefix = f"{name}."
        state = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        bias = state.pop(f"{prefix}bias", None)
        _set_submodule(model, name, build(state, prefix, linear, bias))

    if compute_dtype is not None:
        tensors = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _materialize_buffers(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"the checkpoint has no weights for {shown}", where=str(folder))
    return model.eval(), tokenizer


def _4bit_builder(matmul_dtype: torch.dtype):
    from loraforge.quant.bnb_format import from_bnb_state_dict

    def build(state, prefix, linear, bias):
        return from_bnb_state_dict(state, prefix, linear.in_features, linear.out_features, bias=bias,
                                   compute_dtype=matmul_dtype)
    return build


def _int8_builder(threshold, dtype: torch.dtype, where: str):
    from loraforge.quant.bnb_format import from_bnb8_state_dict
    from loraforge.quant.int8_rowwise import check_threshold

    threshold = check_threshold(threshold, where=f"{where}: quantization_config.llm_int8_threshold")

    def build(state, prefix, linear, bias):
        return from_bnb8_state_dict(state, prefix, linear.in_features, linear.out_features, threshold=threshold,
                                    compute_dtype=dtype, bias=bias)
    return build


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` (its linears QuantLinear nf4/fp4, or Int8Linear) as a bitsandbytes 4-bit
    (8-bit) folder, atomically."""
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig

    from loraforge.quant.bnb_format import to_bnb8_state_dict, to_bnb_state_dict
    from loraforge.quant.int8_rowwise import Int8Linear
    from loraforge.quant.linear import QuantLinear

    out = Path(out_dir)
    check_output_dir(out, overwrite)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, Int8Linear))}
    if not layers:
        raise UserError("the model has no 4-bit or 8-bit layers; quantize it first "
                        "(load_model(..., quantize='nf4' or 'llm_int8'))")
    kinds = {(layer.quant_type, getattr(layer, "double_quant", None), getattr(layer, "threshold", None))
             for layer in layers.values()}
    if len(kinds) > 1:
        raise UserError(
            f"the quantized layers mix settings {sorted(kinds, key=str)} (type, double quant, int8 threshold); a "
            "bitsandbytes checkpoint has one for the whole model"
        )
    quant_type, use_double_quant, threshold = kinds.pop()
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if isinstance(layer, Int8Linear):
            tensors.update(to_bnb8_state_dict(layer, f"{name}."))
        else:
            tensors.update(to_bnb_state_dict(layer, f"{name}."))  # UserError unless nf4 / fp4

    seen: set[tuple[int, int]] = set()
    plain_dtype = None
    for key, tensor in model.state_dict().items():
        if any(key.startswith(f"{name}.") for name in layers):
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:  # a tied weight (lm_head = embed_tokens) is stored once
            continue
        seen.add(ident)
        tensors[key] = tensor
        if plain_dtype is None and tensor.is_floating_point():
            plain_dtype = tensor.dtype
    plain_dtype = plain_dtype or torch.float32
    compute = {layer.compute_dtype for layer in layers.values()} - {None}
    compute_dtype = compute.pop() if len(compute) == 1 else plain_dtype

    config = copy.deepcopy(model.config)
    if quant_type == Int8Linear.quant_type:
        settings = dict(load_in_8bit=True, llm_int8_threshold=threshold)
    else:
        settings = dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=use_double_quant,
                        bnb_4bit_compute_dtype=compute_dtype)
    config.quantization_config = BitsAndBytesConfig(
        **settings, llm_int8_skip_modules=_skip_modules(model, layers)).to_dict()
    config.architectures = [type(model).__name__]
    config.dtype = plain_dtype

    with atomic_directory(out, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out


def _skip_modules(model: nn.Module, quantized: dict[str, nn.Module]) -> list[str] | None:
    """``llm_int8_skip_modules``: None when only the output layer stays full precision."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_names = {n for n, m in model.named_modules() if output is not None and m is output}
    if output_names & set(quantized):
        raise UserError(
            "the output layer is quantized; transformers keeps it in full precision, so it must stay unquantized"
        )
    full = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return None if full == output_names else sorted(full | output_names)


def _read_tensors(files: list[Path], check) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        check(file)
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _submodule(model: nn.Module, name: str, bits: int = 4) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserError(
            f"the checkpoint has {bits}-bit weights for {name!r}, which {type(model).__name__} does not have"
        ) from None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def _materialize_buffers(model: nn.Module) -> None:
    """Give buffers still on the meta device (never saved: rotary inv_freq, embed_scale, ...)
    real storage and let transformers' initializer fill exactly those: it skips every tensor
    flagged ``_is_hf_initialized``, which all loaded tensors are."""
    meta = False
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_meta:
            meta = True
        else:
            tensor._is_hf_initialized = True
    if not meta:
        return
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                setattr(module, name, torch.empty_like(buf, device="cpu"))
    model.initialize_weights()
