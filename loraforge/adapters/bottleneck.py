"""Bottleneck adapters (Houlsby et al., 2019, arXiv:1902.00751; Pfeiffer et al., 2020,
arXiv:2005.00247, the AdapterFusion paper's single-adapter placement).

A small feed-forward block is inserted at the output of a transformer sublayer, before the
block's residual addition, and trained while the model stays frozen::

    h' = h + W_up f(W_down h + b_down) + b_up        (residual: true, the papers' adapter)
    h' =     W_up f(W_down h + b_down) + b_up        (residual: false, no skip connection)

with h the sublayer's output (size d), W_down: m x d, W_up: d x m, f the non-linearity. The
bottleneck size is m = d // reduction_factor (AdapterHub's rule) or ``bottleneck_size``.
Placement ``houlsby``: after the attention and after the MLP (the outputs of ``o_proj`` and
``down_proj`` in a Llama-family model); ``pfeiffer``: after the MLP only. ``f`` defaults to
AdapterHub's choice per placement (houlsby: swish, pfeiffer: relu); any name of transformers'
``ACT2FN`` works. Initialised near identity (Houlsby's aim) exactly: W_up = 0, b_up = 0 (the
adapter starts as h' = h), W_down Kaiming-uniform as ``nn.Linear``, b_down = 0. ``dropout``
acts on the adapter's input. The block is nonlinear in h, so there is no merge rule: merging
refuses. Works on dense and quantized bases (the adapter only sees the sublayer's output).

On disk (loraforge's own format in PEFT's layout; PEFT has no bottleneck method and
AdapterHub's ``pytorch_adapter.bin`` keys differ per model class): ``adapter_config.json`` with
``peft_type: "BOTTLENECK"``, ``placement``, ``reduction_factor``, ``bottleneck_size``,
``non_linearity``, ``residual``, ``adapter_dropout`` and PEFT's placement fields
(``target_modules`` lists the adapted output projections), and ``adapter_model.safetensors``::

    base_model.model.<module>.adapter_down.weight  [m, d]    .adapter_down.bias  [m]
    base_model.model.<module>.adapter_up.weight    [d, m]    .adapter_up.bias    [d]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    Method,
    placement_from_peft,
    placement_to_peft,
    register,
)
from loraforge.errors import UserError, check_choice

PLACEMENTS = {"houlsby": ["o_proj", "down_proj"], "pfeiffer": ["down_proj"]}
DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}
DEFAULT_REDUCTION_FACTOR = 16
NO_MERGE = ("bottleneck adapters cannot be merged: h + W_up f(W_down h) is nonlinear in the layer's output, not a "
            "change of its weight; load the adapter with the base at run time instead (e.g. loraforge generate "
            "MODEL --adapter DIR)")


@dataclass(kw_only=True)
class BottleneckConfig(AdapterConfig):
    """``targets`` None or ``"all-linear"`` (the training config's default): the placement's
    sublayer outputs; a list or regex names the output projections to adapt explicitly."""

    method = "bottleneck"
    targets: str | list[str] | None = None
    placement: str = "houlsby"
    reduction_factor: int | None = None  # None: 16 unless bottleneck_size is given
    bottleneck_size: int | None = None
    non_linearity: str | None = None  # None: swish (houlsby), relu (pfeiffer)
    residual: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        where = "bottleneck config"
        check_choice(self.placement, tuple(PLACEMENTS), "bottleneck placement", where=f"{where}: placement")
        if self.targets is None or (isinstance(self.targets, str) and self.targets.lower() == "all-linear"):
            self.targets = list(PLACEMENTS[self.placement])
        super().validate()
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise UserError("give reduction_factor or bottleneck_size, not both", where=f"{where}: bottleneck_size")
        for key in ("reduction_factor", "bottleneck_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise UserError(f"{key} must be a positive integer, got {value!r}", where=f"{where}: {key}")
        self.non_linearity = self.non_linearity or DEFAULT_NON_LINEARITY[self.placement]
        from transformers.activations import ACT2FN

        check_choice(self.non_linearity, tuple(sorted(ACT2FN)), "non-linearity", where=f"{where}: non_linearity")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}", where=f"{where}: dropout")

    def size(self, features: int, key: str) -> int:
        """The bottleneck size m for a sublayer output of ``features``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        m = features // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR)
        if m < 1:
            raise UserError(f"reduction_factor {self.reduction_factor} leaves no bottleneck for {key} "
                            f"({features} features)", where="bottleneck config: reduction_factor")
        return m

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        return {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "placement": self.placement,
                "reduction_factor": self.reduction_factor, "bottleneck_size": self.bottleneck_size,
                "non_linearity": self.non_linearity, "residual": self.residual, "adapter_dropout": self.dropout,
                **placement_to_peft(self, target_modules), "inference_mode": True}

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> BottleneckConfig:
        return cls(placement=str(data.get("placement", "houlsby")), reduction_factor=data.get("reduction_factor"),
                   bottleneck_size=data.get("bottleneck_size"), non_linearity=data.get("non_linearity"),
                   residual=bool(data.get("residual", True)), dropout=float(data.get("adapter_dropout", 0.0)),
                   **placement_from_peft(data, where))


class BottleneckLayer(AdapterLayer):
    """A sublayer's output projection followed by bottleneck adapters (applied in turn)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, nn.Module] = {}
        self.residual: dict[str, bool] = {}

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down.keys())

    def add(self, name: str, config: BottleneckConfig, key: str, shared: nn.Module | None = None) -> None:
        from transformers.activations import ACT2FN

        d = self.out_features
        m = config.size(d, key)
        device = next(self.base_layer.parameters(), next(self.base_layer.buffers(), torch.empty(0))).device
        down = nn.Linear(d, m, device=device, dtype=torch.float32)
        up = nn.Linear(m, d, device=device, dtype=torch.float32)
        with torch.no_grad():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        self.adapter_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.non_linearity[name] = ACT2FN[config.non_linearity]
        self.residual[name] = config.residual

    def remove(self, name: str) -> None:
        for table in (self.adapter_down, self.adapter_up, self.adapter_dropout):
            del table[name]
        del self.non_linearity[name], self.residual[name]

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        h = result.to(self.adapter_down[name].weight.dtype)
        z = self.adapter_up[name](self.non_linearity[name](self.adapter_down[name](self.adapter_dropout[name](h))))
        return h + z if self.residual[name] else z

    def delta_weight(self, name: str) -> torch.Tensor:
        raise UserError(NO_MERGE, where="merge")

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        down, up = self.adapter_down[name], self.adapter_up[name]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}


register(Method(name="bottleneck", peft_type="BOTTLENECK", config_cls=BottleneckConfig, layer_cls=BottleneckLayer,
                merge_refusal=NO_MERGE))
