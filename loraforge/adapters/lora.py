"""LoRA (Hu et al., 2021, arXiv:2106.09685), rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) and
the DoRA variant (see ``dora.py``).

    y = W x + b + s * B A dropout(x)        A: r x in, B: out x r
    s = alpha / r   (LoRA)      s = alpha / sqrt(r)   (rsLoRA)

Initialisations (``init``), as PEFT's ``init_lora_weights``:

- ``"default"`` (PEFT ``True``): A Kaiming-uniform with a = sqrt(5) (nn.Linear's own init), B = 0.
- ``"gaussian"``: A ~ N(0, 1/r), B = 0.
- ``"pissa"`` (Meng et al., 2024, arXiv:2404.02948): the top-r singular triplets of W go into the
  adapter, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), and the base keeps the residual
  W - s B A, so the model output is unchanged at init. ``"pissa_niter_N"`` uses a randomized SVD
  with N iterations. On a quantized base the residual is quantized again with the base's own
  settings (QPiSSA, as the PiSSA paper does; PEFT instead refuses a 4-bit base and asks for the
  residual to be quantized by hand): the base is dequantized, the SVD taken in float32, and the
  residual re-quantized, which changes the quantization error the adapter sees.
- ``"none"`` (PEFT ``False``): both A and B keep nn.Linear's random init (B != 0; for tests).

Other files add inits to :data:`LORA_INITS` (LoftQ does).
Adapter parameters are float32 on the base layer's device (PEFT's default
``autocast_adapter_dtype``); the input is cast to their dtype and the sum back to the base's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loraforge.adapters import dora
from loraforge.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    Method,
    dense_weight,
    is_quantized_linear,
    placement_from_peft,
    placement_to_peft,
    register,
    reject_unsupported,
)
from loraforge.errors import UserError, check_choice


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern p (in dict order)
    such that the module name matches ``(.*\\.)?(p)$``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA / rsLoRA / DoRA settings. ``rank_pattern`` / ``alpha_pattern`` map a module-name
    pattern (suffix or regex, matched as PEFT does) to its own r / alpha."""

    method = "lora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        where = f"{self.method} config"
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UserError(f"r must be a positive integer, got {self.r!r}", where=f"{where}: r")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}", where=f"{where}: dropout")
        if not self.init.startswith("pissa_niter_"):
            check_choice(self.init, LORA_INITS, "LoRA init", where=f"{where}: init")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"rank {value!r} for {key!r} must be a positive integer", where=f"{where}: rank_pattern")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        init = {"default": True, "none": False}.get(self.init, self.init)
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": init,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            **placement_to_peft(self, target_modules),
            **PEFT_LORA_DEFAULTS,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> LoraConfig:
        # fan_in_fan_out only says the base stores W as [in, out] (GPT-2's Conv1D); PEFT follows
        # each layer's type whatever the flag, and so do we (models/conv1d.py)
        reject_unsupported(data, {k: v for k, v in PEFT_LORA_DEFAULTS.items() if k != "fan_in_fan_out"}, where)
        init = data.get("init_lora_weights", True)
        # the loaded tensors replace the init; only inits that change the base weights matter
        init = INITS_FROM_PEFT.get(init, init) if isinstance(init, (bool, str)) else init
        config_cls = DoraConfig if data.get("use_dora") else LoraConfig
        return config_cls(
            r=int(data.get("r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0)),
            rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            init=init,
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            **placement_from_peft(data, where),
        )


@dataclass(kw_only=True)
class DoraConfig(LoraConfig):
    """LoRA settings with ``use_dora=True`` (the ``dora`` method name)."""

    method = "dora"
    use_dora: bool = True


# PEFT init_lora_weights values -> ours; "eva" and "orthogonal" leave the base alone, so a
# loaded adapter does not depend on them
INITS_FROM_PEFT: dict[bool | str, str] = {True: "default", False: "none", "eva": "default", "orthogonal": "default"}

# PEFT LoraConfig fields whose non-default values name features loraforge does not implement;
# written with these values, and any other value is refused on load.
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "layer_replication": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "megatron_config": None,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
}


class LoraLayer(AdapterLayer):
    """A linear layer with LoRA / rsLoRA / DoRA adapters (PEFT's parameter names)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self._dora_cache: dict[str, Any] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: LoraConfig, key: str, shared: nn.Module | None = None) -> None:
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        device = next(self.base_layer.parameters(), next(self.base_layer.buffers(), torch.empty(0))).device
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, config.scaling(r, alpha)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        init = "pissa" if config.init.startswith("pissa_niter_") else config.init
        LORA_INITS[init](self, name, config)
        if config.use_dora:
            dora.init_magnitude(self, name)

    def remove(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude):
            if name in table:
                del table[name]
        for table in (self.r, self.alpha, self.scaling):
            table.pop(name, None)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = x.to(lora_a.weight.dtype)
        if name in self.lora_magnitude:
            return dora.output(self, name, x, result)
        return result + lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def merge_weight(self, name: str, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        if name in self.lora_magnitude:
            return dora.merge_weight(self, name, weight, base_weight)
        return weight + self.delta_weight(name)

    def unmerge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if name in self.lora_magnitude:
            return dora.unmerge_weight(self, name, weight)
        return weight - self.delta_weight(name)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude:
            tensors["lora_magnitude_vector"] = self.lora_magnitude[name]
        return tensors

    @torch.no_grad()
    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        for suffix, param in self.peft_tensors(name).items():
            value = tensors[suffix]
            if value.shape != param.shape:
                raise UserError(f"shape {tuple(value.shape)} does not match the model's {tuple(param.shape)} "
                                f"(r={self.r[name]}, in={self.in_features}, out={self.out_features})",
                                where=f"{where}.{suffix}")
            param.copy_(value)


# ----- initialisations -------------------------------------------------------------------------

@torch.no_grad()
def _init_default(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


@torch.no_grad()
def _init_gaussian(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    nn.init.normal_(layer.lora_A[name].weight, std=1 / layer.r[name])
    nn.init.zeros_(layer.lora_B[name].weight)


@torch.no_grad()
def _init_none(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    """Keep nn.Linear's own random init for both A and B (PEFT's init_lora_weights=False)."""


@torch.no_grad()
def _init_pissa(layer: LoraLayer, name: str, config: LoraConfig) -> None:
    r, s = layer.r[name], layer.scaling[name]
    base = layer.base_layer
    weight = dense_weight(base)
    if config.init == "pissa":
        u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r] / s, vh[:r]
    else:
        u, sv, v = torch.svd_lowrank(weight, r, niter=int(config.init.removeprefix("pissa_niter_")))
        sv, vh = sv / s, v.t()
    lora_a = torch.diag(sv.sqrt()) @ vh
    lora_b = u @ torch.diag(sv.sqrt())
    layer.lora_A[name].weight.copy_(lora_a)
    layer.lora_B[name].weight.copy_(lora_b)
    residual = weight - s * lora_b @ lora_a
    if is_quantized_linear(base):
        layer.base_layer = _requantize(base, residual)
    else:
        base.weight.copy_(residual.to(base.weight.dtype))


def _requantize(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A quantized layer like ``base`` (same type and settings) holding ``weight``."""
    from_linear = getattr(type(base), "from_linear", None)
    if from_linear is None:
        raise UserError(f"PiSSA on a {type(base).__name__} base needs {type(base).__name__}.from_linear "
                        "to quantize the residual")
    dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    dense.weight.data = weight
    if base.bias is not None:
        dense.bias.data = base.bias.detach().float()
    if hasattr(base, "threshold"):  # an LLM.int8 layer: row scales, no blocks
        return from_linear(dense, threshold=base.threshold, compute_dtype=base.compute_dtype)
    return from_linear(dense, quant_type=base.quant_type, blocksize=base.blocksize,
                       double_quant=getattr(base, "double_quant", True), compute_dtype=base.compute_dtype)


# name -> init function(layer, adapter name, config); "pissa_niter_N" uses "pissa"
LORA_INITS: dict[str, Callable[[LoraLayer, str, LoraConfig], None]] = {
    "default": _init_default,
    "gaussian": _init_gaussian,
    "pissa": _init_pissa,
    "none": _init_none,
}

register(Method(name="lora", peft_type="LORA", config_cls=LoraConfig, layer_cls=LoraLayer))
register(Method(name="dora", peft_type="LORA", config_cls=DoraConfig, layer_cls=LoraLayer))
