"""Placing adapters: which modules a config targets, wrapping them, and ``modules_to_save``.

Matching follows PEFT's ``check_target_module_exists`` for a module named ``key``:

1. excluded if ``exclude`` matches (a regex string: full match; a list: ``key`` equals an entry
   or ends with ``"." + entry``), or if it lies inside a ``modules_to_save`` module;
2. ``targets`` as a regex string: full match; ``"all-linear"``: every linear layer except the
   output head (``model.get_output_embeddings()``) and except layers inside adapters;
   a list: ``key`` equals an entry or ends with ``"." + entry``;
3. ``layers_to_transform`` keeps modules whose layer index (the first ``.<name>.<number>.`` in
   the key, or the number after ``layers_pattern``) is listed.

A matched module that is not linear, or no match at all, is a :class:`UserError` naming the
targets and some module names. The base model is frozen; only adapter parameters (and
``modules_to_save`` copies) are trainable.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from loraforge.adapters.base import AdapterConfig, AdapterLayer, Method, is_linear, is_quantized_linear
from loraforge.errors import UserError


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen ``original_module`` plus one trainable copy per
    adapter in ``modules_to_save`` (PEFT's layout); the active adapter's copy runs."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(True)
        self.modules_to_save[name] = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)


def _wrapper_prefixes(model: nn.Module) -> list[str]:
    return [key + "." for key, module in model.named_modules() if isinstance(module, (AdapterLayer, ModulesToSave))]


def all_linear_names(model: nn.Module) -> list[str]:
    """Every linear layer (or adapter-wrapped linear) except the output head and adapter internals."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside = _wrapper_prefixes(model)
    names = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(p) for p in inside):
            continue
        if isinstance(module, ModulesToSave):
            continue
        if module is head or (isinstance(module, AdapterLayer) and module.base_layer is head):
            continue
        if is_linear(module) or isinstance(module, AdapterLayer):
            names.append(key)
    return names


def _layer_index(key: str, layers_pattern: str | list[str] | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def _name_matches(key: str, names: str | list[str]) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith("." + name) for name in names)


def is_excluded(config: AdapterConfig, key: str) -> bool:
    if config.exclude and _name_matches(key, config.exclude):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save)


def matches(config: AdapterConfig, key: str, all_linear: list[str]) -> bool:
    """Whether ``config`` targets the module named ``key`` (see the module docstring)."""
    if is_excluded(config, key):
        return False
    targets = config.targets
    if isinstance(targets, str) and targets.lower() == "all-linear":
        found = key in all_linear
    elif isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    else:
        found = key in targets or any(key.endswith("." + t) for t in targets)
    if found and config.layers_to_transform is not None:
        index = _layer_index(key, config.layers_pattern)
        wanted = config.layers_to_transform
        found = index is not None and (index in wanted if isinstance(wanted, list) else index == wanted)
    return found


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config`` adapts, in model order; a UserError when none or a non-linear one."""
    inside = _wrapper_prefixes(model)
    all_linear = all_linear_names(model)
    found = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(p) for p in inside) or not matches(config, key, all_linear):
            continue
        if not (is_linear(module) or isinstance(module, AdapterLayer)):
            raise UserError(f"target {key!r} is a {type(module).__name__}, not a linear layer; "
                            "adapters wrap nn.Linear and 4-bit linear layers", where=f"{config.method} config: targets")
        found.append(key)
    if not found:
        sample = ", ".join(all_linear[:6]) or "(the model has no linear layers)"
        raise UserError(f"targets {config.targets!r} match no linear layer of the model"
                        f"{' (after exclude / layers_to_transform)' if config.exclude or config.layers_to_transform is not None else ''}; "
                        f"its linear layers are named like: {sample}", where=f"{config.method} config: targets")
    return found


def _set_submodule(model: nn.Module, key: str, module: nn.Module) -> None:
    parent_name, _, child = key.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, config: AdapterConfig, name: str, method: Method) -> tuple[list[str], nn.Module | None]:
    """Add adapter ``name`` to every targeted module of ``model`` (wrapping it on first use)
    and set up ``modules_to_save``. Returns the targeted names and the method's shared module."""
    targets = find_targets(model, config)
    modules = {key: model.get_submodule(key) for key in targets}
    for key, module in modules.items():
        if isinstance(module, AdapterLayer) and not isinstance(module, method.layer_cls):
            raise UserError(f"{key!r} already holds {type(module).__name__} adapters; one model holds "
                            f"adapters of one method family", where=f"{config.method} config")
    bases = {k: (m.base_layer if isinstance(m, AdapterLayer) else m) for k, m in modules.items()}
    shared = method.make_shared(config, bases) if method.make_shared else None
    for key, module in modules.items():
        if not isinstance(module, AdapterLayer):
            module = method.layer_cls(module).train(module.training)
            _set_submodule(model, key, module)
        module.add(name, config, key, shared)
    for key in _modules_to_save_keys(model, config):
        wrapper = model.get_submodule(key)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper).train(wrapper.training)
            _set_submodule(model, key, wrapper)
        wrapper.add(name)
    return targets, shared


def _modules_to_save_keys(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    inside = _wrapper_prefixes(model)
    keys = [key for key, module in model.named_modules()
            if key and not any(key.startswith(p) for p in inside)
            and any(key.endswith(m) for m in config.modules_to_save)]
    if not keys:
        raise UserError(f"modules_to_save {config.modules_to_save!r} match no module of the model",
                        where=f"{config.method} config: modules_to_save")
    return keys


def condense_target_names(targets: list[str], model: nn.Module) -> list[str]:
    """The ``target_modules`` list to write: the targeted names, shortened as PEFT does when
    there are 20 or more to the fewest name suffixes that match them and no other module."""
    if len(targets) < 20:
        return sorted(targets)
    chosen = set(targets)
    others = {key for key, _ in model.named_modules() if key and key not in chosen}
    other_suffixes = {".".join(k.split(".")[i:]) for k in others for i in range(len(k.split(".")))}
    needed: set[str] = set()
    for key in sorted(targets):
        if any(key == s or key.endswith("." + s) for s in needed):
            continue
        parts = key.split(".")
        for i in range(len(parts) - 1, -1, -1):  # shortest suffix first
            suffix = ".".join(parts[i:])
            if suffix not in other_suffixes:
                needed.add(suffix)
                break
    return sorted(needed)


def freeze_base(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a quantized weight counts as its out x in elements."""
    quantized = [m for m in model.modules() if is_quantized_linear(m)]
    skip = {id(p) for m in quantized for p in m.parameters()}
    total = sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0) for m in quantized)
    trainable = 0
    for param in model.parameters():
        if id(param) in skip:
            continue
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
