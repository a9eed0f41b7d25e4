"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

One pair of frozen random matrices is shared by every adapted layer, A: r x max_in and
B: max_out x r (max over the adapted layers); each layer trains two vectors only:

    y = W x + b + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x))))

lambda_d (length r) starts at ``d_initial`` (0.1), lambda_b (length out) at 0. A and B are
Kaiming-uniform (bound sqrt(6 / fan_in)) drawn from a CPU ``torch.Generator`` seeded with
``projection_prng_key``, A first, bit-identical to PEFT's, so adapters saved without the
projections (``save_projection=False``) interchange. There is no alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.adapters.base import (
    AdapterConfig,
    AdapterLayer,
    Method,
    placement_from_peft,
    placement_to_peft,
    register,
    reject_unsupported,
)
from loraforge.errors import UserError


@dataclass(kw_only=True)
class VeraConfig(AdapterConfig):
    method = "vera"
    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UserError(f"r must be a positive integer, got {self.r!r}", where="vera config: r")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}", where="vera config: dropout")

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        return {
            "peft_type": "VERA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "projection_prng_key": self.projection_prng_key,
            "save_projection": self.save_projection,
            "init_weights": True,
            **placement_to_peft(self, target_modules),
            **PEFT_VERA_DEFAULTS,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> VeraConfig:
        reject_unsupported(data, PEFT_VERA_DEFAULTS, where)
        return cls(
            r=int(data.get("r", 256)),
            dropout=float(data.get("vera_dropout", 0.0)),
            d_initial=float(data.get("d_initial", 0.1)),
            projection_prng_key=int(data.get("projection_prng_key", 0)),
            save_projection=bool(data.get("save_projection", True)),
            **placement_from_peft(data, where),
        )


PEFT_VERA_DEFAULTS: dict[str, Any] = {"bias": "none", "fan_in_fan_out": False}


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) * sqrt(2) / sqrt(fan_in), computed in this order (as
    PEFT does: a different order of the same formula can differ by one ulp)."""
    fan_in = shape[1]
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen shared pair (buffers ``vera_A`` r x max_in, ``vera_B`` max_out x r)."""

    def __init__(self, config: VeraConfig, max_in: int, max_out: int, device: torch.device | None = None):
        super().__init__()
        self.save_projection = config.save_projection
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        vera_a = _kaiming_uniform((config.r, max_in), generator)  # A first, then B
        vera_b = _kaiming_uniform((max_out, config.r), generator)
        self.register_buffer("vera_A", vera_a.to(device), persistent=False)
        self.register_buffer("vera_B", vera_b.to(device), persistent=False)

    def peft_tensors(self, config: VeraConfig) -> dict[str, torch.Tensor]:
        if not config.save_projection:
            return {}
        return {"base_model.vera_A": self.vera_A, "base_model.vera_B": self.vera_B}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        for key, buffer in (("base_model.vera_A", self.vera_A), ("base_model.vera_B", self.vera_B)):
            if key not in tensors:
                continue
            if tensors[key].shape != buffer.shape:
                raise UserError(f"shape {tuple(tensors[key].shape)} does not match the model's {tuple(buffer.shape)}",
                                where=f"{where}: {key}")
            buffer.copy_(tensors[key])


def make_projections(config: VeraConfig, targets: dict[str, nn.Module]) -> VeraProjections:
    layers = list(targets.values())
    max_in = max(layer.in_features for layer in layers)
    max_out = max(layer.out_features for layer in layers)
    device = next(layers[0].parameters(), next(layers[0].buffers(), torch.empty(0))).device
    return VeraProjections(config, max_in, max_out, device)


class VeraLayer(AdapterLayer):
    """A linear layer with VeRA adapters (PEFT's parameter names)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.projections: dict[str, VeraProjections] = {}  # shared, owned by the AdapterModel

    def adapter_names(self) -> list[str]:
        return list(self.vera_lambda_b.keys())

    def add(self, name: str, config: VeraConfig, key: str, shared: VeraProjections | None = None) -> None:
        device = shared.vera_A.device
        self.projections[name] = shared
        self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_lambda_d[name] = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=device))
        self.vera_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def remove(self, name: str) -> None:
        for table in (self.vera_lambda_b, self.vera_lambda_d, self.vera_dropout):
            del table[name]
        del self.projections[name]

    def _sliced(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.projections[name]
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features, :]

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lambda_b, lambda_d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        vera_a, vera_b = self._sliced(name)
        x = x.to(lambda_d.dtype)
        return result + lambda_b * F.linear(lambda_d * F.linear(self.vera_dropout[name](x), vera_a), vera_b)

    def delta_weight(self, name: str) -> torch.Tensor:
        vera_a, vera_b = self._sliced(name)
        lambda_b = self.vera_lambda_b[name].float().unsqueeze(1)
        lambda_d = self.vera_lambda_d[name].float().unsqueeze(1)
        return (lambda_b * vera_b.float()) @ (lambda_d * vera_a.float())

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b[name], "vera_lambda_d": self.vera_lambda_d[name]}


register(Method(name="vera", peft_type="VERA", config_cls=VeraConfig, layer_cls=VeraLayer,
                make_shared=make_projections))
