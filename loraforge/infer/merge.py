"""Merging an adapter into its base and writing the result (safetensors or bitsandbytes 4-bit).

Which base: by default the model the adapter was trained on (``into="trained"``). A run of
``loraforge train`` with ``quantization: {type: nf4, ...}`` trained on a 4-bit copy of the base,
so merging into the full-precision weights would give a model that was never trained (its logits
differ by the base's quantization error, 0.1-0.3 on SmolLM2). The run's ``config.yaml`` beside
the adapter says how the base was quantized; the full-precision base is quantized again the same
way (same code, so the same codes and scales) and merged into. ``into="original"`` merges into
the full-precision weights as given. A 4-bit source is merged into as it is; with LoftQ the
trained base is the run's ``base/`` folder, which must be given. An 8-bit (``llm_int8``) base
works the same way: re-quantized row-wise as in training (or read as stored from an 8-bit folder)
and dequantized (``C * SCB / 127``); the merged dense layer then computes in full precision what
training computed with LLM.int8's decomposition, so the two agree to the 8-bit rounding of the
activations (as a PEFT merge on bitsandbytes' 8-bit layers does).

Merging happens in float32 whatever the base: the model is loaded with float32 compute, a 4-bit
base layer is dequantized (``QuantLinear.dequantize``: code * absmax in float32) and each adapted
layer becomes a dense ``nn.Linear`` holding the method's merged weight (the adapters registry's
merge rule: W + s B A for LoRA, m (W + s B A) / ||W + s B A|| for DoRA, W + diag(lambda_b) B
diag(lambda_d) A for VeRA, and whatever a later method registers). Only then is the model cast
to the output dtype, so the 4-bit base is never rounded twice.

Tied embeddings: when the output head is adapted (or trained in full through
``modules_to_save``) while it shares its weight with the input embeddings, the head gets its own
copy before merging (otherwise merging into it would change the embeddings as well) and the
config says ``tie_word_embeddings = false``; an untouched tied head stays tied and is stored once.

Outputs:
- ``safetensors``: ``save_pretrained`` shards (``model-0000k-of-0000n.safetensors`` + index when
  larger than ``max_shard_size``), the tokenizer with its chat template, the generation config;
  plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.
- ``nf4``: the merged layers are quantized again (NF4 with the base's block size and double
  quantization; every 4-bit layer the adapter did not touch keeps its codes) and written with
  ``loraforge.models.save_quantized`` as a bitsandbytes checkpoint. How far that moves the logits
  on a few probe tokens is measured and reported.
- ``gguf``: see ``export_gguf.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters.model import set_tied
from loraforge.errors import UserError, check_choice

PROBE_TEXT = ("The capital of France is Paris. Water boils at 100 degrees Celsius at sea level. "
              "def add(a, b): return a + b")


INTO = ("trained", "original")


@dataclass
class MergeTarget:
    """The weights an adapter is merged into: ``quantization`` (``{type, blocksize,
    double_quant}``) re-quantizes a full-precision base as training did; None loads it as is."""

    quantization: dict | None
    description: str  # for the user: which weights, and why


def merge_target(source: str | Path, adapter: str | Path, into: str = "trained") -> MergeTarget:
    """Decide what to merge into (see module docstring) from the source's format and the
    adapter's training config; cheap, so the command can say it before the slow load."""
    from loraforge.infer.session import training_config
    from loraforge.models import detect_format, resolve_model_path

    check_choice(into, INTO, "merge target", where="--into")
    fmt = detect_format(resolve_model_path(source))
    quantized_source = fmt in ("bnb-4bit", "bnb-8bit", "kbit")
    bits = "8-bit" if fmt == "bnb-8bit" else "4-bit"
    run = training_config(adapter)
    quant = trained_quantization(run, Path(adapter) / "config.yaml") if run else None
    if into == "original":
        if quantized_source:
            raise UserError(f"is a {bits} checkpoint, it holds no full-precision weights to merge into: give the "
                            "full-precision model, or drop --into original", where=str(source))
        trained_on = f" (not the {quant['type']} model the adapter was trained on)" if quant else ""
        return MergeTarget(None, f"the full-precision weights of {source}{trained_on}")
    if quantized_source:
        return MergeTarget(None, f"the {bits} weights of {source} (dequantized)")
    if run is None:
        return MergeTarget(None, f"{source} as loaded (no config.yaml beside the adapter says how its base "
                                 "was quantized in training)")
    if quant is None:
        return MergeTarget(None, f"the full-precision weights of {source}, which the adapter was trained on")
    if (run.get("adapter") or {}).get("init") == "loftq":
        raise UserError(f"the adapter was trained with LoftQ on the quantized base saved in {Path(adapter) / 'base'}: "
                        f"merge into that folder (loraforge merge {Path(adapter) / 'base'} --adapter {adapter}), "
                        "or pass --into original for the full-precision weights", where=str(source))
    if quant["type"] == "llm_int8":
        how = "row-wise int8"
    else:
        how = f"block {quant['blocksize']}{', double quant' if quant['double_quant'] else ''}"
    return MergeTarget(quant, f"{source} quantized to {quant['type']} ({how}) and dequantized, as in training "
                              "(--into original: the full-precision weights instead)")


def trained_quantization(run: dict, where: Path) -> dict | None:
    """``quantization`` of a training config (None: trained in full precision), checked."""
    quant = run.get("quantization")
    if quant is None:
        return None
    expected = {"type": str, "blocksize": int, "double_quant": bool}
    if not isinstance(quant, dict) or any(not isinstance(quant.get(k), t) for k, t in expected.items()):
        raise UserError("expected quantization: {type: <name>, blocksize: <int>, double_quant: <bool>} or null",
                        where=f"{where}: quantization")
    return {k: quant[k] for k in expected} | {"llm_int8_threshold": quant.get("llm_int8_threshold")}


def merge_adapter(source: str | Path, adapter: str | Path | None, *, into: str = "trained"):
    """(model, tokenizer): ``source`` with the adapter folder merged in, float32 throughout,
    into the weights ``merge_target`` picks.

    Layers the adapter does not touch stay as loaded (4-bit layers stay 4-bit)."""
    from loraforge.adapters.io import read_adapter
    from loraforge.infer.session import attach_adapter
    from loraforge.models import load_model

    if adapter is None:
        return load_model(source, compute_dtype=torch.float32)
    quant = merge_target(source, adapter, into).quantization or {}
    contents = read_adapter(adapter)  # a broken adapter file fails before the slow load
    model, tokenizer = load_model(source, quantize=quant.get("type"), blocksize=quant.get("blocksize", 64),
                                  double_quant=quant.get("double_quant", True), compute_dtype=torch.float32,
                                  llm_int8_threshold=quant.get("llm_int8_threshold"))
    adapter_model = attach_adapter(model, contents, adapter, str(source))
    merged = adapter_model.merge_and_unload()
    mark_untied(merged)
    return merged, tokenizer


def mark_untied(model: nn.Module) -> None:
    """``tie_word_embeddings = false`` when head and embeddings no longer share one tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is not embed.weight:
        set_tied(model, False)


def is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


@torch.no_grad()
def dequantize_all(model: nn.Module) -> nn.Module:
    """Replace every quantized linear layer by a float32 ``nn.Linear`` with its dequantized weight."""
    from loraforge.adapters.base import is_quantized_linear

    for key, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        weight = module.dequantize(torch.float32)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=torch.float32)
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias.float())
        dense.requires_grad_(False)
        parent, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    return model


def save_safetensors(model: nn.Module, tokenizer, out: str | Path, dtype: torch.dtype, *,
                     max_shard_size: str | int = "2GB", overwrite: bool = False) -> Path:
    """Write a plain (dense) Hugging Face folder atomically: shards, config, tokenizer, template."""
    from loraforge.models.cache import atomic_directory, check_output_dir
    from loraforge.models.quiet import quiet_transformers

    out = Path(out)
    check_output_dir(out, overwrite)
    dequantize_all(model)
    model.to(dtype)
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    with atomic_directory(out, overwrite=True) as tmp, quiet_transformers():
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return out


@dataclass
class LogitDrift:
    """How far re-quantizing moved the logits on the probe tokens."""

    tokens: int
    max_abs: float
    mean_abs: float
    relative: float  # ||new - ref|| / ||ref||
    argmax_agree: int  # probe positions whose most likely next token is unchanged

    def summary(self) -> str:
        return (f"logits on {self.tokens} probe tokens moved by max |d| {self.max_abs:.4g}, mean |d| "
                f"{self.mean_abs:.4g} (relative {self.relative:.2%}); the most likely next token is "
                f"unchanged at {self.argmax_agree}/{self.tokens} positions")


@torch.no_grad()
def probe_logits(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=probe.to(device)).logits.float().cpu()[0]


def logit_drift(ref: torch.Tensor, new: torch.Tensor) -> LogitDrift:
    diff = (new - ref).abs()
    return LogitDrift(
        tokens=ref.shape[0],
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        relative=((new - ref).norm() / ref.norm().clamp_min(1e-30)).item(),
        argmax_agree=int((new.argmax(-1) == ref.argmax(-1)).sum()),
    )


@torch.no_grad()
def save_nf4(model: nn.Module, tokenizer, out: str | Path, dtype: torch.dtype, *,
             overwrite: bool = False) -> LogitDrift:
    """Quantize the merged (dense) linear layers to NF4, write a bitsandbytes folder, report drift."""
    from loraforge.adapters.base import is_quantized_linear
    from loraforge.models import save_quantized
    from loraforge.models.cache import check_output_dir
    from loraforge.quant.replace import quantize_model

    out = Path(out)
    check_output_dir(out, overwrite)
    probe = torch.tensor([tokenizer.encode(PROBE_TEXT, add_special_tokens=True)], dtype=torch.long)
    reference = probe_logits(model, probe)
    kept = [m for m in model.modules() if is_quantized_linear(m)]
    if any(not hasattr(m, "blocksize") for m in kept):
        raise UserError("the base is 8-bit (llm_int8): --format nf4 would quantize its untouched layers a second "
                        "time; write --format safetensors (or quantize that with loraforge quantize)", where="--format")
    blocksize = kept[0].blocksize if kept else 64
    double_quant = getattr(kept[0], "double_quant", True) if kept else True
    quantize_model(model, quant_type="nf4", blocksize=blocksize, double_quant=double_quant, compute_dtype=dtype)
    for module in model.modules():
        if is_quantized_linear(module):
            module.compute_dtype = dtype
        else:
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
    drift = logit_drift(reference, probe_logits(model, probe))
    save_quantized(model, tokenizer, out, overwrite=True)
    return drift
