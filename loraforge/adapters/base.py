"""The adapter-layer base and the method registry.

An adapter method (LoRA, VeRA, AdaLoRA, ...) adds a trainable update to frozen linear layers:
``y = base(x) + delta(x)``. This module holds what every method shares:

- :class:`AdapterLayer` wraps one base layer (an ``nn.Linear`` or a quantized linear, see
  :func:`is_quantized_linear`) and keeps several named adapters, the list of active ones, the
  merged state and a disable switch. A method subclasses it and fills in five hooks: ``add``,
  ``remove``, ``adapter_output``, ``delta_weight`` and ``peft_tensors`` / ``load_peft_tensors``.
- :class:`AdapterConfig` is the base of every method's config (targets and the other placement
  fields that ``inject.py`` reads), with the conversion to and from PEFT's ``adapter_config.json``.
- :data:`REGISTRY` maps a method name to a :class:`Method`: its config class, its layer class,
  the ``peft_type`` written on disk, and, for methods with state shared by all layers (VeRA's
  projections), a factory for that shared module. A new method registers itself from its own
  file with :func:`register`; ``inject.py``, ``model.py`` and ``io.py`` know methods only
  through this table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from loraforge.errors import UserError


def is_quantized_linear(module: nn.Module) -> bool:
    """A frozen quantized linear layer (``loraforge.quant.linear.QuantLinear`` or alike): it has
    ``in_features``, ``out_features``, ``bias`` and ``dequantize(dtype) -> Tensor [out, in]``."""
    return (
        not isinstance(module, nn.Linear)
        and callable(getattr(module, "dequantize", None))
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def is_linear(module: nn.Module) -> bool:
    """A layer an adapter can wrap: ``nn.Linear`` or a quantized linear."""
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def dense_weight(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``[out, in]`` of a linear or quantized linear layer as a detached ``dtype``
    tensor (dequantized for a quantized layer; for a dense layer already in ``dtype`` it shares
    the layer's storage, so callers must not modify it in place)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().to(dtype)
    return layer.dequantize(dtype)


class AdapterLayer(nn.Module):
    """One base linear layer plus any number of named adapters of a single method.

    ``forward`` computes ``base(x)`` and lets every active adapter update it in turn
    (``result = adapter_output(name, x, result)``); nothing is added while adapters are merged
    into the base or the layer is disabled. Merging computes in float32 from the dense weight; a
    quantized base is replaced by a dense ``nn.Linear`` (in the base's compute dtype, float32 if
    it has none) holding the merged weight, and the quantized layer is kept aside so that
    ``unmerge`` restores it exactly. A dense base is updated in place and unmerged by the
    inverse update.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"cannot wrap {type(base_layer).__name__}: not a linear layer")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # the quantized base while a dense merged copy replaces it; kept out of the module tree
        # (no parameters, no state dict) with object.__setattr__
        object.__setattr__(self, "_quantized_base", None)

    # ----- hooks a method fills in -------------------------------------------------------
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def add(self, name: str, config: AdapterConfig, key: str, shared: nn.Module | None) -> None:
        """Create adapter ``name`` for module ``key`` (its name in the model)."""
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Return ``result`` (the output so far) updated by adapter ``name`` for input ``x``."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """The float32 ``[out, in]`` update of adapter ``name`` for merging."""
        raise NotImplementedError

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors keyed by PEFT's on-disk suffix (e.g. ``lora_A.weight``)."""
        raise NotImplementedError

    @torch.no_grad()
    def load_peft_tensors(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Copy ``tensors`` (keyed as :meth:`peft_tensors`) into adapter ``name``, each shape checked."""
        for suffix, param in self.peft_tensors(name).items():
            if tensors[suffix].shape != param.shape:
                raise UserError(f"shape {tuple(tensors[suffix].shape)} does not match the model's "
                                f"{tuple(param.shape)}", where=f"{where}.{suffix}")
            param.copy_(tensors[suffix])

    def merge_weight(self, name: str, weight: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
        """The weight after merging ``name`` into ``weight``; ``base_weight`` is the unmerged
        base weight (methods like DoRA need it). Default: ``weight + delta``."""
        return weight + self.delta_weight(name)

    def unmerge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merge_weight`. Default: ``weight - delta``."""
        return weight - self.delta_weight(name)

    # ----- shared machinery --------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_names()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of adapter ``name``: entry ``name`` of every ModuleDict / ParameterDict
        child except the base layer (the layout all methods use)."""
        params: list[nn.Parameter] = []
        for child in self.children():
            if child is self.base_layer or not isinstance(child, (nn.ModuleDict, nn.ParameterDict)):
                continue
            if name in child:
                item = child[name]
                params += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        return params

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.add_adapters(x, self.base_layer(x, *args, **kwargs))

    def add_adapters(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """This layer's output for input ``x``, given its base layer's output ``result`` (what
        :meth:`forward` does after the base; a caller that computes the base product its own way,
        such as the decoding loop, hands it in)."""
        if self.disabled or self.merged_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if self.has_adapter(name):
                result = self.adapter_output(name, x, result)
        return result.to(out_dtype)

    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        """Merge adapters ``names`` (held by this layer) into the base weight."""
        names = [n for n in names if self.has_adapter(n)]
        if not names:
            return
        if self.merged_adapters:  # merge on top of an unmerged base so that norms (DoRA) see W0
            names = self.merged_adapters + [n for n in names if n not in self.merged_adapters]
            self.unmerge()
        base = self.base_layer
        base_weight = dense_weight(base)
        weight = base_weight
        for name in names:
            weight = self.merge_weight(name, weight, base_weight)
        if is_quantized_linear(base):
            dtype = getattr(base, "compute_dtype", None) or torch.float32
            dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                              dtype=dtype, device=weight.device)
            dense.weight.data.copy_(weight)
            if base.bias is not None:
                dense.bias.data.copy_(base.bias.detach())
            dense.requires_grad_(False)
            object.__setattr__(self, "_quantized_base", base)
            self.base_layer = dense
        else:
            base.weight.data.copy_(weight.to(base.weight.dtype))
        self.merged_adapters = names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight again."""
        if not self.merged_adapters:
            return
        if self._quantized_base is not None:
            device = self.base_layer.weight.device
            self.base_layer = self._quantized_base.to(device)
            object.__setattr__(self, "_quantized_base", None)
        else:
            weight = dense_weight(self.base_layer)
            for name in reversed(self.merged_adapters):
                weight = self.unmerge_weight(name, weight)
            self.base_layer.weight.data.copy_(weight.to(self.base_layer.weight.dtype))
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active_adapters}, merged={self.merged_adapters}"


# ----- configs -------------------------------------------------------------------------------

@dataclass(kw_only=True)
class AdapterConfig:
    """Placement fields shared by every method (read by ``inject.py``).

    ``targets``: ``"all-linear"`` (every linear layer but the output head), a list of module names
    (a name matches a module whose name equals it or ends with ``"." + name``) or a regex string
    (full match on the module name). ``exclude``: same forms, exact/suffix or regex.
    ``layers_to_transform``: layer indices (the first number in the module name after a
    ``layers_pattern`` such as ``"layers"``); only with a list of targets. ``modules_to_save``:
    modules (name suffixes) trained as full copies, e.g. ``["lm_head"]``.
    """

    method: ClassVar[str] = ""
    targets: str | list[str] = "all-linear"
    exclude: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        where = f"{self.method} config"
        if isinstance(self.targets, (list, tuple, set)):
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise UserError(f"targets must be a non-empty list of module names, got {self.targets!r}",
                                where=f"{where}: targets")
        elif not isinstance(self.targets, str) or not self.targets:
            raise UserError(f"targets must be 'all-linear', a list of module names or a regex, got {self.targets!r}",
                            where=f"{where}: targets")
        if isinstance(self.exclude, (tuple, set)):
            self.exclude = list(self.exclude)
        for key, value in (("targets", self.targets), ("exclude", self.exclude)):
            if isinstance(value, str) and value.lower() != "all-linear":
                try:
                    re.compile(value)
                except re.error as err:
                    raise UserError(f"invalid regex {value!r}: {err}", where=f"{where}: {key}") from None
        if self.layers_to_transform is not None:
            if isinstance(self.targets, str) and self.targets.lower() != "all-linear":
                raise UserError("layers_to_transform cannot be combined with a regex in targets "
                                "(put the layer numbers into the regex instead)", where=f"{where}: layers_to_transform")
            values = self.layers_to_transform if isinstance(self.layers_to_transform, list) else [self.layers_to_transform]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise UserError(f"layers_to_transform must be layer indices, got {self.layers_to_transform!r}",
                                where=f"{where}: layers_to_transform")
        if self.layers_pattern and self.layers_to_transform is None:
            raise UserError("layers_pattern needs layers_to_transform", where=f"{where}: layers_pattern")
        self.modules_to_save = list(self.modules_to_save or [])

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    # PEFT's adapter_config.json, both ways (each method writes its own fields)
    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig:
        raise NotImplementedError


def placement_to_peft(config: AdapterConfig, target_modules: str | list[str]) -> dict[str, Any]:
    """The placement fields as PEFT writes them."""
    return {
        "target_modules": target_modules,
        "exclude_modules": sorted(config.exclude) if isinstance(config.exclude, list) else config.exclude,
        "layers_to_transform": config.layers_to_transform,
        "layers_pattern": config.layers_pattern,
        "modules_to_save": list(config.modules_to_save) or None,
    }


def placement_from_peft(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Our placement fields from a PEFT config dict."""
    targets = data.get("target_modules")
    if targets is None:
        raise UserError("target_modules is missing (PEFT's per-model default targets are not supported; "
                        "list the modules)", where=f"{where}: target_modules")
    return {
        "targets": targets,
        "exclude": data.get("exclude_modules"),
        "layers_to_transform": data.get("layers_to_transform"),
        "layers_pattern": data.get("layers_pattern"),
        "modules_to_save": data.get("modules_to_save") or [],
    }


def reject_unsupported(data: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    """Raise if a PEFT config field we do not implement holds a value other than its default
    (PEFT writes every field, so their presence is fine; a feature actually in use is not)."""
    for key, default in defaults.items():
        value = data.get(key, default)
        if value != default and not (default is None and value in ({}, [], "", False)):
            raise UserError(f"{key}={value!r} is not supported by loraforge (only {default!r})", where=f"{where}: {key}")


# ----- the registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One adapter method.

    ``make_shared(config, targets)`` (optional) builds the module of state shared by all adapted
    layers of one adapter (``targets`` maps module names to base layers); it must offer
    ``peft_tensors(config) -> dict`` (full on-disk keys) and ``load_peft_tensors(dict, where)``.
    ``merge_refusal``: for a method without a merge rule (bottleneck adapters), the message
    ``merge`` raises; None for the methods that merge.

    ``make_encoder(config, model)``: for a method that wraps no layer but acts on the model's
    inputs (prefix tuning: ``layer_cls`` None), builds the adapter's module. The AdapterModel
    keeps it in ``shared`` (saving and loading use its ``peft_tensors`` / ``load_peft_tensors``)
    and, while the adapter is active and not disabled, passes every forward's arguments of the
    model through its ``prepare_inputs(args, kwargs) -> (args, kwargs)``.
    """

    name: str
    peft_type: str
    config_cls: type[AdapterConfig]
    layer_cls: type[AdapterLayer] | None
    make_shared: Callable[[AdapterConfig, dict[str, nn.Module]], nn.Module] | None = None
    merge_refusal: str | None = None
    make_encoder: Callable[[AdapterConfig, nn.Module], nn.Module] | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def method_of_config(config: AdapterConfig) -> Method:
    for method in REGISTRY.values():
        if type(config) is method.config_cls:
            return method
    raise UserError(f"no adapter method is registered for {type(config).__name__}")


def method_of_peft_type(peft_type: str, where: str) -> Method:
    for method in REGISTRY.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({m.peft_type for m in REGISTRY.values()})
    raise UserError(f"unsupported peft_type {peft_type!r}; loraforge reads {', '.join(known)}", where=f"{where}: peft_type")
