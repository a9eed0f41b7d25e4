"""loraforge's k-bit checkpoint folder, for code books bitsandbytes has no format for (NF2, NF3,
INT-k, per-layer mixes such as LoftQ's 4/2-bit). :func:`load_model` reads it like any model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from loraforge.errors import UserError

KBIT_METHOD = "loraforge-kbit"
QUANT_STATE_SUFFIX = ".weight.quant_state.loraforge"


def _set_submodule(model: nn.Module, key: str, module: nn.Module) -> None:
    parent, _, child = key.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def save_kbit_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """loraforge's k-bit checkpoint, for code books bitsandbytes lacks (NF2, NF3, INT-k, mixes).

    A Hugging Face folder (``config.json`` + ``model.safetensors`` + tokenizer) where
    ``config.json`` has ``quantization_config = {"quant_method": "loraforge-kbit", "version": 1}``
    and every quantized linear ``L`` stores its QuantLinear buffers under ``L.weight`` (packed
    codes, uint8: 2-bit codes four per byte, element 4i in the high bits; 3- and 4-bit two per
    byte, element 2i in the high nibble), ``L.weight.absmax`` (float32 per block, or uint8 codes
    with double quantization, then also ``L.weight.nested_absmax`` float32 per 256 blocks,
    ``L.weight.offset`` and ``L.weight.nested_quant_map``), ``L.weight.quant_map`` (the code book)
    and ``L.weight.quant_state.loraforge`` (UTF-8 JSON bytes: quant_type, blocksize, shape
    [out, in], double_quant, compute_dtype); ``L.bias`` and every other tensor as usual (tied
    tensors once). Weight = quant_map[code] * absmax per block, row-major.
    """
    from loraforge.files import save_tensors
    from loraforge.quant.linear import QuantLinear

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {key: m for key, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in layers.items():
        for buffer in ("absmax", "nested_absmax", "offset", "quant_map", "nested_quant_map"):
            value = getattr(layer, buffer)
            if value is not None:
                tensors[f"{key}.weight.{buffer}"] = value
        tensors[f"{key}.weight"] = layer.qweight
        state = {"quant_type": layer.quant_type, "blocksize": layer.blocksize, "double_quant": layer.double_quant,
                 "shape": [layer.out_features, layer.in_features],
                 "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}
        tensors[key + QUANT_STATE_SUFFIX] = torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)
        if layer.bias is not None:
            tensors[f"{key}.bias"] = layer.bias
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict().items():
        if any(key.startswith(f"{layer}.") for layer in layers):
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        tensors[key] = tensor
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": KBIT_METHOD, "version": 1}
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


def load_kbit_checkpoint(folder: str | Path):
    """(model, tokenizer) from a :func:`save_kbit_checkpoint` folder, its linears QuantLinear
    (tokenizer None when the folder holds none)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraforge.models.bnb_checkpoint import _materialize_buffers
    from loraforge.models.validate import load_safetensors
    from loraforge.quant.double_quant import NestedAbsmax
    from loraforge.quant.linear import QuantLinear

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("quantization_config", {}).get("quant_method") != KBIT_METHOD:
        raise UserError(f"not a loraforge k-bit checkpoint (quantization_config.quant_method != {KBIT_METHOD!r})",
                        where=str(folder / "config.json"))
    tensors = load_safetensors(folder / "model.safetensors")
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for state_key in [k for k in tensors if k.endswith(QUANT_STATE_SUFFIX)]:
        key = state_key[: -len(QUANT_STATE_SUFFIX)]
        state = json.loads(bytes(tensors.pop(state_key).tolist()).decode())
        qweight, absmax, quant_map, nested_absmax, offset, nested_map = (
            tensors.pop(f"{key}.weight{suffix}", None)
            for suffix in ("", ".absmax", ".quant_map", ".nested_absmax", ".offset", ".nested_quant_map"))
        nested = NestedAbsmax(absmax, nested_absmax, offset, nested_map) if state["double_quant"] else None
        out_features, in_features = state["shape"]
        layer = QuantLinear.from_quantized(
            qweight, absmax, in_features=in_features, out_features=out_features, quant_type=state["quant_type"],
            blocksize=state["blocksize"], nested=nested, quant_map=quant_map, bias=tensors.pop(f"{key}.bias", None),
            compute_dtype=getattr(torch, state["compute_dtype"]))
        _set_submodule(model, key, layer)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _materialize_buffers(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"the checkpoint has no weights for {', '.join(missing[:5])}", where=str(folder))
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return model.eval(), (AutoTokenizer.from_pretrained(folder) if has_tokenizer else None)
