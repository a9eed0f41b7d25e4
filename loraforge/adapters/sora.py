"""SoRA, sparse low-rank adaptation (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of
Pre-trained Language Models", arXiv:2311.11696).

A LoRA update with a gate g (one entry per rank) between the down- and the up-projection::

    y = W x + b + B (g * (A dropout(x))) * alpha / r       A: r x in, B: out x r, g: r

initialised as the reference code does: A Kaiming-uniform (nn.Linear's init), B = 0, g ~ N(0, 1).
The gates carry an L1 penalty lambda ||g||_1 that is not differentiated but applied by the
proximal step of the paper (its eq. 4), after the optimizer has taken its step on g:

    g <- T_{eta lambda}(g),   T_xi(z) = sign(z) max(|z| - xi, 0)       (eta: the step's lr)

so gates shrink by eta * lambda per step and stay exactly zero once they cross it. loraforge
follows the paper here; the reference code leaves eta out (it thresholds by lambda alone) and,
through two in-place passes, zeroes every gate with |g| < 2 lambda. ``lambda_schedule``:
``"constant"`` (default) uses lambda on every step; ``"linear"`` ramps it up linearly,
lambda_t = lambda * t / T over the run's T steps, a simple form of the paper's sparsifying
scheduler (lambda grows during training so ranks are pruned progressively).

Saving prunes the ranks whose gate is zero and folds g into B, giving a plain PEFT LoRA adapter
that computes the same output::

    A' = A[keep],  B' = B[:, keep] * g[keep],  r' = |keep|,  alpha' = alpha * r' / r

``rank_pattern`` / ``alpha_pattern`` hold each module's r' and alpha' (so alpha' / r' = alpha / r),
and a module with no gate left is listed in ``exclude_modules`` (PEFT cannot hold rank 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.adapters.base import AdapterConfig, AdapterLayer, Method, register
from loraforge.adapters.lora import LoraConfig
from loraforge.adapters.method_hooks import TrainingHooks
from loraforge.errors import UserError, check_choice

LAMBDA_SCHEDULES = ("constant", "linear")


@dataclass(kw_only=True)
class SoraConfig(AdapterConfig):
    """SoRA settings: rank r, alpha, dropout, the L1 weight ``lambda_`` and its schedule."""

    method = "sora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    lambda_: float = 1e-3
    lambda_schedule: str | None = None  # None: "constant"

    def validate(self) -> None:
        super().validate()
        where = f"{self.method} config"
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UserError(f"r must be a positive integer, got {self.r!r}", where=f"{where}: r")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}", where=f"{where}: dropout")
        if not (isinstance(self.lambda_, (int, float)) and self.lambda_ >= 0 and math.isfinite(self.lambda_)):
            raise UserError(f"lambda must be a number >= 0, got {self.lambda_!r}", where=f"{where}: lambda")
        self.lambda_schedule = check_choice(self.lambda_schedule or "constant", LAMBDA_SCHEDULES,
                                            "lambda schedule", where=f"{where}: lambda_schedule")

    def scaling(self) -> float:
        return self.alpha / self.r

    def lambda_at(self, step: int, total_steps: int | None) -> float:
        if self.lambda_schedule == "linear" and total_steps:
            return self.lambda_ * min(step, total_steps) / total_steps
        return self.lambda_

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        """The pruned adapter's config: plain LoRA with per-module ranks (see the module docstring).
        Needs the live layers (registered by :meth:`SoraLayer.add`)."""
        ranks = {key: layer.kept_rank(name) for key, (layer, name) in self._layers.items()}
        dropped = sorted(key for key, r in ranks.items() if r == 0)
        kept = {key: r for key, r in ranks.items() if r}
        exclude = self.exclude
        if dropped and isinstance(exclude, str):  # a regex: add the dropped names as alternatives
            exclude = "|".join([exclude] + [_escape(k) for k in dropped])
        elif dropped:
            exclude = list(exclude or []) + dropped
        lora = LoraConfig(
            r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets, exclude=exclude,
            layers_to_transform=self.layers_to_transform, layers_pattern=self.layers_pattern,
            modules_to_save=self.modules_to_save,
            rank_pattern={_escape(k): r for k, r in kept.items() if r != self.r},
            alpha_pattern={_escape(k): self.alpha * r / self.r for k, r in kept.items() if r != self.r},
        )
        return lora.to_peft(target_modules)

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> SoraConfig:
        raise UserError("SoRA adapters are saved as plain LoRA (peft_type LORA); this file is not one",
                        where=f"{where}: peft_type")

    def training_hooks(self, adapter_model, name: str, total_steps: int | None) -> SoraHooks:
        return SoraHooks(adapter_model, name, total_steps)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._layers: dict[str, tuple[SoraLayer, str]] = {}


def _escape(key: str) -> str:
    """A module name as a PEFT pattern (matched with re, so dots are escaped)."""
    return key.replace(".", r"\.")


class SoraLayer(AdapterLayer):
    """A linear layer with SoRA adapters: ``lora_A``, ``lora_B`` (nn.Linear, as LoRA) and ``lora_gate``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_gate = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: SoraConfig, key: str, shared: nn.Module | None = None) -> None:
        device = next(self.base_layer.parameters(), next(self.base_layer.buffers(), torch.empty(0))).device
        r = config.r
        self.r[name], self.alpha[name], self.scaling[name] = r, config.alpha, config.scaling()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_gate[name] = nn.Parameter(torch.randn(r, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        config._layers[key] = (self, name)

    def remove(self, name: str) -> None:
        for table in (self.lora_A, self.lora_B, self.lora_gate, self.lora_dropout):
            if name in table:
                del table[name]
        for table in (self.r, self.alpha, self.scaling):
            table.pop(name, None)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a, b, gate = self.lora_A[name], self.lora_B[name], self.lora_gate[name]
        hidden = a(self.lora_dropout[name](x.to(a.weight.dtype))) * gate
        return result + b(hidden) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b, gate = self.lora_A[name].weight, self.lora_B[name].weight, self.lora_gate[name]
        return (b.float() * gate.float()) @ a.float() * self.scaling[name]

    def kept(self, name: str) -> torch.Tensor:
        return self.lora_gate[name].detach().ne(0).nonzero().view(-1)

    def kept_rank(self, name: str) -> int:
        return int(self.lora_gate[name].detach().ne(0).sum())

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The pruned LoRA tensors (none for a module whose gates are all zero)."""
        keep = self.kept(name)
        if keep.numel() == 0:
            return {}
        gate = self.lora_gate[name].detach()[keep]
        return {"lora_A.weight": self.lora_A[name].weight.detach()[keep],
                "lora_B.weight": self.lora_B[name].weight.detach()[:, keep] * gate}

    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        raise UserError("a SoRA adapter is saved as plain LoRA; load it as one (load_adapter reads it so)", where=where)


@torch.no_grad()
def soft_threshold(gate: torch.Tensor, threshold: float) -> None:
    """In place: g <- sign(g) * max(|g| - threshold, 0)."""
    gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_(min=0))


class SoraHooks(TrainingHooks):
    """The loop's call for SoRA: the proximal gate step after each optimizer step."""

    def __init__(self, adapter_model, name: str, total_steps: int | None):
        self.config: SoraConfig = adapter_model.configs[name]
        self.name, self.total_steps = name, total_steps
        self.layers = {key: adapter_model.model.get_submodule(key) for key in adapter_model.targets[name]}

    def gates(self) -> list[torch.Tensor]:
        return [layer.lora_gate[self.name] for layer in self.layers.values()]

    def after_optimizer_step(self, step: int, lr: float) -> dict[str, Any]:
        lam = self.config.lambda_at(step, self.total_steps)
        for gate in self.gates():
            soft_threshold(gate, lr * lam)
        gates = torch.cat([g.detach().view(-1) for g in self.gates()])
        return {"lambda": lam, "l1": float(gates.abs().sum()) * lam,
                "gates_zero": float((gates == 0).float().mean())}

    def finish(self) -> list[str]:
        ranks = {key: layer.kept_rank(self.name) for key, layer in self.layers.items()}
        total = self.config.r * len(ranks)
        lines = [f"SoRA ranks kept: {sum(ranks.values())} of {total}"]
        lines += [f"  {key}: {r} of {self.config.r}" for key, r in ranks.items()]
        return lines


register(Method(name="sora", peft_type="SORA", config_cls=SoraConfig, layer_cls=SoraLayer))
