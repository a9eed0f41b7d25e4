"""LoftQ initialisation (Li et al., ICLR 2024, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for
Large Language Models", arXiv:2310.08659): quantize the base and initialise the LoRA adapter
together, so that quantized base + adapter start close to the full-precision weight.

Per adapted layer with weight W, rank r and LoRA scale s (alpha / r, or alpha / sqrt(r) with
rsLoRA), alternate T times (the paper's Algorithm 1, PEFT's ``loftq_init``), from A = B = 0:

    Q_t = dequant(quant(W - s B_{t-1} A_{t-1}))
    W - Q_t = U S V^T                           (SVD)
    B_t = U_r sqrt(S_r / s),   A_t = sqrt(S_r / s) V_r^T      so  s B_t A_t = U_r S_r V_r^T

The base layer becomes Q_T (stored as a loraforge :class:`~loraforge.quant.linear.QuantLinear`)
and the adapter starts from (A_T, B_T). PEFT and the authors' code set B = U sqrt(S), ignoring s,
which is only right when alpha = r (PEFT issue #1982); dividing by s makes it right for any alpha.
Every Q_t is quantized exactly as it is stored (same code book, block size, double quantization),
so the adapter fits the stored base, not an approximation of it.

Quantizers: ``nf`` (k-bit NormalFloat: nf4 is bitsandbytes' NF4, nf2 / nf3 built the QLoRA way)
or ``uniform`` (INT-k, levels linspace(-1, 1, 2^k)). Mixed precision as in the paper: the first
``mixed_4bit_layers`` decoder layers at 4 bits, the rest at ``bits``.

:func:`loftq_attach` does the whole set-up on a full-precision model: linear layers the adapter
does not target (but the output head) are quantized plainly, then attaching the adapter runs
LoftQ on each target. Layers are processed one at a time: each full-precision linear is replaced
by its quantized version and its weight released before the next is read, and only one layer's
fp32 temporaries exist at a time, so no second full-precision copy of the model is ever held.
``attach(model, LoftqConfig(...))`` alone (or a plain ``LoraConfig(init="loftq")``, which uses
LoftQ's defaults: NF4, one iteration) quantizes the targeted layers only.
For every layer the relative errors ||W - Q_0||_F / ||W||_F (plain quantization) and
||W - Q_T - s B_T A_T||_F / ||W||_F (LoftQ) are printed, and the totals at the end
(:class:`LoftqReport`).

Saving (:func:`save_loftq`): ``adapter/`` a plain PEFT LoRA adapter whose config says
``init_lora_weights: true``, the value the LoftQ authors' own ``quantize_save.py`` writes so that
loading does not run LoftQ again (PEFT re-runs ``loftq_init`` on the loaded base when it reads
``"loftq"``); ``base/`` the quantized base: a bitsandbytes 4-bit folder when every layer is NF4 or
FP4 with one setting (transformers + bitsandbytes and loraforge load it), otherwise loraforge's
k-bit folder (:mod:`loraforge.models.kbit_checkpoint`), which bitsandbytes has no format for.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.adapters.base import AdapterLayer, Method, is_quantized_linear, register
from loraforge.adapters.lora import LORA_INITS, LoraConfig, LoraLayer
from loraforge.errors import UserError, check_choice

QUANTIZERS = ("nf", "uniform")


# ----- the algorithm ---------------------------------------------------------------------------

@dataclass
class LoftqResult:
    """Output of :func:`loftq_decompose` for one weight: the quantized base (whatever ``quantize``
    returned), A [r, in], B [out, r], and the errors ||W - Q_0||_F, ||W - Q_T - s B A||_F, ||W||_F."""

    quantized: Any
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    plain_error: float
    loftq_error: float
    weight_norm: float


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, rank: int, scaling: float, iterations: int,
                    quantize: Callable[[torch.Tensor], tuple[Any, torch.Tensor]]) -> LoftqResult:
    """LoftQ's alternating optimisation for one weight ``[out, in]``.

    ``quantize(residual)`` returns ``(stored, dequantized)``: whatever is kept as the base and the
    float32 tensor it stands for. Returns the last ``stored`` with the matching adapter.
    """
    if iterations < 1:
        raise UserError(f"LoftQ needs at least 1 iteration, got {iterations}", where="loftq.iterations")
    w = weight.detach().float()
    out_features, in_features = w.shape
    lora_a = w.new_zeros(rank, in_features)
    lora_b = w.new_zeros(out_features, rank)
    plain_error = 0.0
    for t in range(iterations):
        stored, q = quantize(w - scaling * (lora_b @ lora_a))
        residual = w - q
        if t == 0:
            plain_error = float(torch.linalg.matrix_norm(residual))
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        k = min(rank, s.numel())
        root = (s[:k] / scaling).sqrt()
        lora_b = w.new_zeros(out_features, rank)
        lora_a = w.new_zeros(rank, in_features)
        lora_b[:, :k] = u[:, :k] * root
        lora_a[:k] = root[:, None] * vh[:k]
        del u, vh
    loftq_error = float(torch.linalg.matrix_norm(residual - scaling * (lora_b @ lora_a)))
    return LoftqResult(stored, lora_a, lora_b, plain_error, loftq_error, float(torch.linalg.matrix_norm(w)))


def quant_type_for(quantizer: str, bits: int) -> str:
    """loraforge's quant type name: ("nf", 4) -> "nf4", ("uniform", 2) -> "int2"."""
    check_choice(quantizer, QUANTIZERS, "LoftQ quantizer", where="loftq.quantizer")
    return f"nf{bits}" if quantizer == "nf" else f"int{bits}"


def layer_index(key: str) -> int | None:
    """The decoder layer of a module name: the first number between dots (``model.layers.3.mlp...`` -> 3)."""
    match = re.search(r"\.(\d+)\.", key)
    return int(match.group(1)) if match else None


# ----- the report ----------------------------------------------------------------------------------

@dataclass
class LoftqReport:
    """Per-layer rows (key, quant type, ||W - Q0||, ||W - Q - sBA||, ||W||) and the totals."""

    rows: list[tuple[str, str, float, float, float]] = field(default_factory=list)
    echo: Callable[[str], None] | None = print

    def add(self, key: str, quant_type: str, result: LoftqResult) -> None:
        self.rows.append((key, quant_type, result.plain_error, result.loftq_error, result.weight_norm))
        if self.echo is not None:
            norm = max(result.weight_norm, 1e-30)
            self.echo(f"loftq {key:<48} {quant_type:>5}  plain {result.plain_error / norm:.4f}  "
                      f"loftq {result.loftq_error / norm:.4f}")

    def totals(self) -> tuple[float, float]:
        """(plain, LoftQ) relative error over all layers: sqrt(sum err^2) / sqrt(sum ||W||^2)."""
        norm = math.sqrt(sum(r[4] ** 2 for r in self.rows)) or 1.0
        return (math.sqrt(sum(r[2] ** 2 for r in self.rows)) / norm,
                math.sqrt(sum(r[3] ** 2 for r in self.rows)) / norm)

    def summary(self) -> str:
        plain, loftq = self.totals()
        return (f"loftq total over {len(self.rows)} layers: plain quantization error {plain:.4f}, "
                f"LoftQ error {loftq:.4f} (relative Frobenius)")


# ----- the config and the layer ------------------------------------------------------------------

@dataclass(kw_only=True)
class LoftqConfig(LoraConfig):
    """LoRA with LoftQ initialisation (``adapter.init: loftq`` and ``adapter.loftq``).

    ``loftq_bits`` (2, 3, 4 or 8), ``loftq_iterations`` (T), ``loftq_quantizer`` ("nf" or
    "uniform"), ``loftq_mixed_4bit_layers`` (first decoder layers kept at 4 bits), and the
    storage of the quantized base: ``blocksize``, ``double_quant``, ``compute_dtype`` (None: the
    layer's dtype). ``echo`` prints the per-layer errors (None: silent); ``report`` collects them.
    """

    method = "loftq"
    init: str = "loftq"
    loftq_bits: int = 4
    loftq_iterations: int = 1
    loftq_quantizer: str = "nf"
    loftq_mixed_4bit_layers: int = 0
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    echo: Callable[[str], None] | None = print

    def validate(self) -> None:
        super().validate()
        where = f"{self.method} config"
        if self.init != "loftq":
            raise UserError(f"a LoftQ config has init 'loftq', got {self.init!r}", where=f"{where}: init")
        if self.loftq_bits not in (2, 3, 4, 8):
            raise UserError(f"expected 2, 3, 4 or 8 bits, got {self.loftq_bits!r}", where=f"{where}: loftq.bits")
        if not isinstance(self.loftq_iterations, int) or self.loftq_iterations < 1:
            raise UserError(f"expected at least 1 iteration, got {self.loftq_iterations!r}",
                            where=f"{where}: loftq.iterations")
        check_choice(self.loftq_quantizer, QUANTIZERS, "LoftQ quantizer", where=f"{where}: loftq.quantizer")
        if not isinstance(self.loftq_mixed_4bit_layers, int) or self.loftq_mixed_4bit_layers < 0:
            raise UserError(f"expected a number of layers >= 0, got {self.loftq_mixed_4bit_layers!r}",
                            where=f"{where}: loftq.mixed_4bit_layers")
        self.report = LoftqReport(echo=self.echo)

    def quant_type_for(self, key: str | None) -> str:
        index = layer_index(key) if key else None
        bits = 4 if index is not None and index < self.loftq_mixed_4bit_layers else self.loftq_bits
        return quant_type_for(self.loftq_quantizer, bits)

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        # init_lora_weights: true, as the LoftQ authors write it: the adapter holds its trained
        # values, and "loftq" would make PEFT run LoftQ again on the loaded base
        return self.to_lora().to_peft(target_modules)

    def to_lora(self) -> LoraConfig:
        """The same adapter as a plain :class:`LoraConfig` with the default init (what is saved)."""
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                          init="default", rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
                          targets=self.targets, exclude=self.exclude, layers_to_transform=self.layers_to_transform,
                          layers_pattern=self.layers_pattern, modules_to_save=list(self.modules_to_save))


class LoftqLayer(LoraLayer):
    """A :class:`LoraLayer` that knows its module name, which LoftQ's mixed precision needs."""

    def add(self, name: str, config: LoraConfig, key: str, shared: nn.Module | None = None) -> None:
        self.module_key = key
        super().add(name, config, key, shared)


@torch.no_grad()
def _init_loftq(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """LoftQ for one layer: replace its full-precision base by Q_T, set A_T and B_T.
    A plain :class:`LoraConfig` with ``init="loftq"`` gets LoftQ's defaults (NF4, 1 iteration)."""
    settings = config if isinstance(config, LoftqConfig) else LoftqConfig(
        r=config.r, alpha=config.alpha, rslora=config.rslora, echo=None)
    base = layer.base_layer
    key = getattr(layer, "module_key", None)
    if is_quantized_linear(base) or not isinstance(base, nn.Linear):
        raise UserError(f"LoftQ needs the full-precision weight of {key or 'each layer'}, but the base is already "
                        "quantized; load the model without quantization: LoftQ quantizes it itself",
                        where="adapter.init")
    if settings.loftq_mixed_4bit_layers and key is None:
        raise UserError("loftq.mixed_4bit_layers needs a LoftqConfig (the layer names)", where="adapter.loftq")
    quant_type = settings.quant_type_for(key)
    compute_dtype = settings.compute_dtype or base.weight.dtype

    def quantize(residual: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        from loraforge.quant.linear import QuantLinear

        stored = QuantLinear.from_linear(_as_linear(residual, base.bias), quant_type=quant_type,
                                         blocksize=settings.blocksize, double_quant=settings.double_quant,
                                         compute_dtype=compute_dtype)
        return stored, stored.dequantize(torch.float32)

    result = loftq_decompose(base.weight, layer.r[name], layer.scaling[name], settings.loftq_iterations, quantize)
    layer.lora_A[name].weight.copy_(result.lora_a)
    layer.lora_B[name].weight.copy_(result.lora_b)
    layer.base_layer = result.quantized
    base.weight = None  # release the full-precision weight now, not when attaching ends
    settings.report.add(key or "?", quant_type, result)


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding ``weight`` (no copy) and ``bias``, to hand to QuantLinear.from_linear."""
    linear = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                device=weight.device, dtype=weight.dtype)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias.detach()
    return linear


LORA_INITS["loftq"] = _init_loftq
register(Method(name="loftq", peft_type="LORA", config_cls=LoftqConfig, layer_cls=LoftqLayer))


def loftq_attach(model: nn.Module, config: LoftqConfig, name: str = "default"):
    """The whole LoftQ set-up of a full-precision ``model``: every linear layer the adapter does
    not target (but the output head) is quantized plainly with the type of its decoder layer, then
    the adapter is attached, which LoftQ-quantizes the targets; prints the per-layer errors and
    the totals. Returns the :class:`~loraforge.adapters.model.AdapterModel`."""
    from loraforge.adapters.inject import find_targets
    from loraforge.adapters.model import attach
    from loraforge.quant.linear import QuantLinear

    targets = set(find_targets(model, config))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rest = [key for key, m in model.named_modules() if type(m) is nn.Linear and m is not head and key not in targets]
    for key in rest:
        linear = model.get_submodule(key)
        _set_submodule(model, key, QuantLinear.from_linear(
            linear, quant_type=config.quant_type_for(key), blocksize=config.blocksize,
            double_quant=config.double_quant, compute_dtype=config.compute_dtype))
        linear.weight = None
    adapter_model = attach(model, config, name)
    if config.echo is not None:
        config.echo(config.report.summary())
    return adapter_model


# ----- saving and loading ------------------------------------------------------------------------



@contextlib.contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every adapter layer of ``model`` is replaced by its base layer (so the
    model's state dict has the base model's names); restored afterwards."""
    wrappers = [(key, module) for key, module in model.named_modules() if isinstance(module, AdapterLayer)]
    for key, module in wrappers:
        _set_submodule(model, key, module.base_layer)
    try:
        yield model
    finally:
        for key, module in wrappers:
            _set_submodule(model, key, module)


def _set_submodule(model: nn.Module, key: str, module: nn.Module) -> None:
    parent, _, child = key.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def save_loftq_base(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """The LoftQ-quantized base (its Q_T, not a plain quantization of the model): a bitsandbytes
    4-bit folder when every layer is nf4 / fp4 with one setting, else loraforge's k-bit folder
    (:mod:`loraforge.models.kbit_checkpoint`). Both load with ``loraforge.models.load_model``."""
    from loraforge.models import save_quantized
    from loraforge.models.kbit_checkpoint import save_kbit_checkpoint
    from loraforge.quant.linear import QuantLinear

    with unwrapped(model):
        kinds = {(m.quant_type, m.double_quant) for m in model.modules() if isinstance(m, QuantLinear)}
        if len(kinds) == 1 and next(iter(kinds))[0] in ("nf4", "fp4"):
            return save_quantized(model, tokenizer, folder, overwrite=True)
        return save_kbit_checkpoint(model, tokenizer, folder)


def save_loftq(adapter_model, tokenizer, out_dir: str | Path, name: str = "default") -> Path:
    """Write ``out_dir/adapter`` (PEFT LoRA) and ``out_dir/base`` (the quantized base)."""
    out = Path(out_dir)
    adapter_model.save_pretrained(out / "adapter", adapter_names=[name])
    save_loftq_base(adapter_model.model, tokenizer, out / "base")
    return out


def load_loftq(out_dir: str | Path, name: str = "default", is_trainable: bool = False):
    """(AdapterModel, tokenizer) from a folder written by :func:`save_loftq`."""
    from loraforge.adapters.model import load_adapter

    from loraforge.models import load_model

    out = Path(out_dir)
    model, tokenizer = load_model(str(out / "base"))
    return load_adapter(model, out / "adapter", name=name, is_trainable=is_trainable), tokenizer
