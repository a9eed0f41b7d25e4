"""AdaLoRA (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning", arXiv:2303.10512), exactly as PEFT's ``tuners/adalora`` implements it.

The update is in SVD form, one rank-1 "triplet" (P_i, lambda_i, Q_i) per rank::

    y = W x + b + B diag(E) A dropout(x) * alpha / (r_init + 1e-5)
    A (= Q): r x in,  E (= Lambda): r x 1,  B (= P): out x r

with E = 0 and A, B ~ N(0, 0.02) at the start, and ``r_init`` the initial rank, which the scale
keeps even after ranks are pruned (PEFT's ``ranknum``). Training adds the orthogonal regulariser

    R = mean over the adapted layers' A and B of ||A A^T - I||_F and ||B^T B - I||_F,
    loss += orth_reg_weight * R          (PEFT's default weight 0.5; the paper's code 0.1)

and after every optimizer step the :class:`RankAllocator` prunes triplets:

- importance of every entry p of A, E, B: I = |p * dL/dp|, smoothed (sensitivity) and its
  uncertainty:  Ibar = beta1 Ibar + (1 - beta1) I,  U = beta2 U + (1 - beta2) |I - Ibar|,
  entry score s = Ibar * U (beta1 = beta2 = 0.85);
- triplet i of a layer scores  S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki);
- the total budget b(t) (the number of triplets kept over all layers) follows the cubic schedule
  b(t) = b_init for t <= t_init; b_target for t > T - t_final; otherwise
  b(t) = int((b_init - b_target) (1 - (t - t_init) / (T - t_final - t_init))^3 + b_target),
  with b_init = r_init x layers and b_target = target_r x layers;
- every ``delta_t`` steps of the decreasing phase, E_i is zeroed for every triplet whose score is
  at most the (b_init - b(t))-th smallest score of all triplets (one global threshold); at
  t = T - t_final the final mask is taken at b_target and kept applied on every later step.

Saving writes PEFT's AdaLoRA format: ``lora_A`` / ``lora_E`` / ``lora_B`` tensors trimmed to the
kept triplets and ``rank_pattern`` {"<module>.lora_E": [kept?] * r_init} in the config, which
PEFT uses to rebuild the trimmed shapes (its ``ranknum`` stays r_init, so outputs are unchanged).

Differences from PEFT, on purpose: the loop drives the allocator (PEFT users must call
``update_and_allocate`` themselves); a budget step that masks nothing (b(t) = b_init inside the
decreasing phase, common with few layers) is skipped, where PEFT's ``kthvalue(k=0)`` raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    reject_unsupported,
)
from loraforge.adapters.lora import PEFT_LORA_DEFAULTS
from loraforge.adapters.method_hooks import TrainingHooks
from loraforge.errors import UserError

RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclass(kw_only=True)
class AdaloraConfig(AdapterConfig):
    """AdaLoRA settings (PEFT's defaults). ``total_step`` is the run's number of optimizer steps,
    set by the training loop; ``rank_pattern`` maps a module name to its kept-triplet mask (filled
    by the rank allocator, read from a saved adapter)."""

    method = "adalora"
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        where = f"{self.method} config"
        for key in ("init_r", "target_r", "delta_t"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{key} must be a positive integer, got {value!r}", where=f"{where}: {key}")
        for key in ("tinit", "tfinal"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"{key} must be an integer >= 0, got {value!r}", where=f"{where}: {key}")
        if self.target_r > self.init_r:
            raise UserError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})",
                            where=f"{where}: target_r")
        for key in ("beta1", "beta2"):
            if not 0.0 < float(getattr(self, key)) < 1.0:
                raise UserError(f"{key} must lie strictly between 0 and 1, got {getattr(self, key)!r}",
                                where=f"{where}: {key}")
        if self.orth_reg_weight < 0:
            raise UserError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}", where=f"{where}: orth_reg_weight")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}", where=f"{where}: dropout")
        if self.total_step is not None:
            self.check_schedule(self.total_step)
        for key, mask in self.rank_pattern.items():
            if not isinstance(mask, list) or len(mask) != self.init_r or not all(isinstance(m, bool) for m in mask):
                raise UserError(f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} true/false values",
                                where=f"{where}: rank_pattern")

    def check_schedule(self, total_step: int) -> None:
        if self.tinit >= total_step - self.tfinal:
            raise UserError(f"tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no step of the {total_step} "
                            "for the budget to decrease; lower them or train longer",
                            where=f"{self.method} config: tinit")

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        # PEFT refuses total_step None on load; an adapter saved before training gets the shortest valid one
        total_step = self.total_step if self.total_step is not None else self.tinit + self.tfinal + 1
        return {
            "peft_type": "ADALORA",
            "task_type": "CAUSAL_LM",
            "r": 8,  # PEFT ignores r for AdaLoRA (init_r is the rank) and warns when it is not 8
            "init_r": self.init_r,
            "target_r": self.target_r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.delta_t,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": total_step,
            "rank_pattern": {f"{key}.lora_E": list(mask) for key, mask in self.rank_pattern.items()} or None,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "alpha_pattern": {},
            **placement_to_peft(self, target_modules),
            **PEFT_LORA_DEFAULTS,
            "inference_mode": True,
        }

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdaloraConfig:
        reject_unsupported(data, {**PEFT_LORA_DEFAULTS, "use_rslora": False, "use_dora": False,
                                  "alpha_pattern": None}, where)
        pattern = {}
        for key, mask in (data.get("rank_pattern") or {}).items():
            pattern[key.removesuffix(".lora_E")] = [bool(m) for m in mask]
        return cls(
            init_r=int(data.get("init_r", 12)),
            target_r=int(data.get("target_r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0)),
            tinit=int(data.get("tinit", 0)),
            tfinal=int(data.get("tfinal", 0)),
            delta_t=int(data.get("deltaT", 1)),
            beta1=float(data.get("beta1", 0.85)),
            beta2=float(data.get("beta2", 0.85)),
            orth_reg_weight=float(data.get("orth_reg_weight", 0.5)),
            total_step=data.get("total_step"),
            rank_pattern=pattern,
            **placement_from_peft(data, where),
        )

    def training_hooks(self, adapter_model, name: str, total_steps: int | None) -> AdaloraHooks:
        """Start the rank allocator for a run of ``total_steps`` optimizer steps."""
        if total_steps is None:
            raise UserError("AdaLoRA needs the run's number of steps for its budget schedule", where="train.steps")
        self.check_schedule(total_steps)
        self.total_step = total_steps
        return AdaloraHooks(adapter_model, name)


class AdaloraLayer(AdapterLayer):
    """A linear layer with AdaLoRA adapters; parameter names as PEFT's (``lora_A.<name>``, ...)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.ranknum: dict[str, int] = {}  # r_init, never changed
        self.alpha: dict[str, float] = {}
        self.config: dict[str, AdaloraConfig] = {}
        self.key = ""
        self.trimmed: set[str] = set()  # adapters created from a saved rank_pattern (already trimmed)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, config: AdaloraConfig, key: str, shared: nn.Module | None = None) -> None:
        device = next(self.base_layer.parameters(), next(self.base_layer.buffers(), torch.empty(0))).device
        mask = config.rank_pattern.get(key)
        r = sum(mask) if mask is not None else config.init_r
        if mask is not None:
            self.trimmed.add(name)
        self.key, self.config[name] = key, config
        self.ranknum[name], self.alpha[name] = config.init_r, config.alpha
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, device=device))
        with torch.no_grad():
            nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def remove(self, name: str) -> None:
        for table in (self.lora_A, self.lora_E, self.lora_B, self.lora_dropout):
            if name in table:
                del table[name]
        for table in (self.ranknum, self.alpha, self.config):
            table.pop(name, None)
        self.trimmed.discard(name)

    def scaling(self, name: str) -> float:
        return self.alpha[name] / (self.ranknum[name] + RANKNUM_EPS)

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_a, lora_e, lora_b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.dtype))
        return result + (x @ (lora_a * lora_e).T @ lora_b.T) * self.scaling(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, e, b = (t.float() for t in (self.lora_A[name], self.lora_E[name], self.lora_B[name]))
        return (b @ (a * e)) * self.scaling(name)

    def kept(self, name: str) -> torch.Tensor | None:
        """Indices of the triplets a save keeps (None: all), from the config's rank pattern."""
        mask = self.config[name].rank_pattern.get(self.key)
        if mask is None or name in self.trimmed:
            return None
        return torch.tensor(mask, dtype=torch.bool).nonzero().view(-1).to(self.lora_A[name].device)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        keep = self.kept(name)
        if keep is not None:
            a, e, b = a[keep], e[keep], b[:, keep]
        return {"lora_A": a, "lora_E": e, "lora_B": b}

    @torch.no_grad()
    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        params = {"lora_A": self.lora_A[name], "lora_E": self.lora_E[name], "lora_B": self.lora_B[name]}
        if self.kept(name) is not None:
            raise UserError("cannot load into an adapter whose rank mask is set (it would be trimmed twice)", where=where)
        for suffix, param in params.items():
            value = tensors[suffix]
            if value.shape != param.shape:
                raise UserError(f"shape {tuple(value.shape)} does not match the model's {tuple(param.shape)} "
                                f"(init_r={self.ranknum[name]}, rank_pattern keeps {param.shape[0] if suffix != 'lora_B' else param.shape[1]})",
                                where=f"{where}.{suffix}")
            param.copy_(value)


# ----- the regulariser and the rank allocator ---------------------------------------------------

def orthogonal_regularizer(layers: list[AdaloraLayer], name: str) -> torch.Tensor:
    """mean over the layers' A and B of ||A A^T - I||_F and ||B^T B - I||_F (PEFT's order of terms)."""
    terms = []
    for layer in layers:
        for param, gram in ((layer.lora_A[name], lambda p: p @ p.T), (layer.lora_B[name], lambda p: p.T @ p)):
            cov = gram(param)
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    return torch.stack(terms).mean()


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based masking for adapter ``name`` of ``layers``
    (module name -> layer). See the module docstring for the formulas."""

    def __init__(self, layers: dict[str, AdaloraLayer], name: str, config: AdaloraConfig):
        self.layers, self.name, self.config = layers, name, config
        self.init_budget = sum(layer.lora_A[name].shape[0] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.reset_importance()

    def reset_importance(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(budget b(step), whether this step masks)."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % c.delta_t == 0

    def _params(self, layer: AdaloraLayer) -> dict[str, nn.Parameter]:
        return {"A": layer.lora_A[self.name], "E": layer.lora_E[self.name], "B": layer.lora_B[self.name]}

    @torch.no_grad()
    def update_importance(self) -> None:
        """Fold |p * grad| of every A, E, B entry into the sensitivity and uncertainty EMAs."""
        b1, b2 = self.config.beta1, self.config.beta2
        for key, layer in self.layers.items():
            for part, p in self._params(layer).items():
                importance = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                sens = self.sensitivity.get((key, part), torch.zeros_like(p))
                unc = self.uncertainty.get((key, part), torch.zeros_like(p))
                sens = b1 * sens + (1 - b1) * importance
                self.uncertainty[(key, part)] = b2 * unc + (1 - b2) * (importance - sens).abs()
                self.sensitivity[(key, part)] = sens

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per layer, the score of each triplet: s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)."""
        scores = {}
        for key in self.layers:
            s = {part: self.sensitivity[(key, part)] * self.uncertainty[(key, part)] for part in "AEB"}
            scores[key] = s["E"].view(-1) + (s["A"].mean(dim=1) + s["B"].mean(dim=0))
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero E of the triplets scoring at most the (b_init - budget)-th smallest score; returns
        and stores (in the config) the kept-triplet mask of every layer."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k > 0:
            threshold = torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), k).values.item()
        else:
            threshold = -float("inf")
        pattern = {}
        for key, layer in self.layers.items():
            keep = scores[key] > threshold
            layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[key] = keep.tolist()
        self.config.rank_pattern = pattern
        return pattern

    @torch.no_grad()
    def apply_pattern(self) -> None:
        """Zero E of the triplets the stored rank pattern drops (the final phase, every step)."""
        for key, layer in self.layers.items():
            keep = torch.tensor(self.config.rank_pattern[key], device=layer.lora_E[self.name].device)
            layer.lora_E[self.name].masked_fill_(~keep.view(-1, 1), 0.0)

    def step(self, step: int) -> int:
        """One optimizer step's work (PEFT's ``update_and_allocate``); returns the budget."""
        end = self.config.total_step - self.config.tfinal
        budget, masks = self.budget(step)
        if step < end:
            self.update_importance()
            if masks:
                self.mask_to_budget(budget)
        elif step == end:
            self.mask_to_budget(budget)
            self.reset_importance()
        else:
            self.apply_pattern()
        return budget

    def ranks(self) -> dict[str, int]:
        """Triplets kept per module (all of them before the first mask)."""
        return {key: (sum(self.config.rank_pattern[key]) if key in self.config.rank_pattern
                      else layer.lora_A[self.name].shape[0]) for key, layer in self.layers.items()}


class AdaloraHooks(TrainingHooks):
    """The loop's calls for AdaLoRA: the orthogonal regulariser and the rank allocator."""

    def __init__(self, adapter_model, name: str):
        config = adapter_model.configs[name]
        layers = {key: adapter_model.model.get_submodule(key) for key in adapter_model.targets[name]}
        if any(name in layer.trimmed for layer in layers.values()):
            raise UserError("this AdaLoRA adapter was saved after rank pruning (it has a rank_pattern); "
                            "continuing its rank allocation is not supported: train a new adapter",
                            where="adapter")
        self.name, self.config = name, config
        self.allocator = RankAllocator(layers, name, config)

    def extra_loss(self) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        return self.config.orth_reg_weight * orthogonal_regularizer(list(self.allocator.layers.values()), self.name)

    def after_optimizer_step(self, step: int, lr: float) -> dict[str, Any]:
        budget = self.allocator.step(step)
        return {"budget": budget, "rank": sum(self.allocator.ranks().values())}

    def finish(self) -> list[str]:
        ranks = self.allocator.ranks()
        lines = [(f"AdaLoRA ranks kept: {sum(ranks.values())} of {self.allocator.init_budget} "
                  f"(target {self.allocator.target_budget})")]
        lines += [f"  {key}: {r}" for key, r in ranks.items()]
        return lines

    def state_dict(self) -> dict[str, Any]:
        a = self.allocator
        return {"sensitivity": {f"{k}|{p}": v for (k, p), v in a.sensitivity.items()},
                "uncertainty": {f"{k}|{p}": v for (k, p), v in a.uncertainty.items()},
                "rank_pattern": dict(self.config.rank_pattern), "total_step": self.config.total_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a = self.allocator
        a.sensitivity = {tuple(k.split("|")): v for k, v in state["sensitivity"].items()}
        a.uncertainty = {tuple(k.split("|")): v for k, v in state["uncertainty"].items()}
        self.config.rank_pattern = dict(state["rank_pattern"])
        self.config.total_step = state["total_step"]


register(Method(name="adalora", peft_type="ADALORA", config_cls=AdaloraConfig, layer_cls=AdaloraLayer))
