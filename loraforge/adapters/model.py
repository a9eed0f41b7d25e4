"""``attach`` and :class:`AdapterModel`: a model with named adapters, used like a PEFT model.

    model = AutoModelForCausalLM.from_pretrained(...)         # or loraforge.models.load_model
    am = attach(model, LoraConfig(r=16, alpha=16))              # base frozen, adapter trainable
    loss = am(**batch).loss; loss.backward(); ...               # any training loop
    am.save_pretrained("out")                                   # PEFT's on-disk format
    am = load_adapter(fresh_model, "out")                       # ours or PEFT-written folders
    merged = am.merge_and_unload()                              # plain transformers model

Several adapters can live on one model (``add_adapter`` / ``set_adapter`` / ``delete_adapter``;
``set_adapter([])`` runs none). Only the active adapters that were added as trainable have
``requires_grad``. ``merge`` folds the active adapters into the base weights (a 4-bit base
becomes a dense layer in its compute dtype, never re-quantized) and ``unmerge`` restores the base.

A method that wraps no layer (prefix tuning, ``Method.make_encoder``) keeps its module in
``shared`` and acts through one forward pre-hook on the model, which hands each forward's
arguments to the active adapter's ``prepare_inputs`` (one such adapter is active at a time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.adapters.base import AdapterConfig, AdapterLayer, Method, method_of_config
from loraforge.adapters.inject import ModulesToSave, count_parameters, freeze_base, inject
from loraforge.errors import UserError


class AdapterModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.targets: dict[str, list[str]] = {}
        self.shared = nn.ModuleDict()  # per adapter: state shared by all its layers (VeRA)
        self.active_adapters: list[str] = []
        self.trainable_adapters: set[str] = set()
        self.method: Method | None = None
        self._input_hook: Any = None  # the forward pre-hook of a make_encoder method
        freeze_base(model)

    # ----- adapters -----------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, trainable: bool = True) -> None:
        """Add adapter ``name`` (not activated; see :meth:`set_adapter`)."""
        method = method_of_config(config)
        if name in self.configs:
            raise UserError(f"an adapter named {name!r} exists already", where="adapter name")
        if not name or "." in name:
            raise UserError(f"adapter name {name!r} must be non-empty and hold no '.'", where="adapter name")
        if self.method is not None and method.layer_cls is not self.method.layer_cls:
            raise UserError(f"this model holds {self.method.name} adapters; a {method.name} adapter cannot join them",
                            where="adapter method")
        if self.merged_adapters():
            raise UserError("adapters are merged; unmerge() before adding one")
        if method.make_encoder is not None:
            with self.disable_adapter():  # an encoder may run the model (prefix init: words) on its own
                targets, shared = [], method.make_encoder(config, self.model)
            if self._input_hook is None:
                self._input_hook = self.model.register_forward_pre_hook(self._prepare_inputs, with_kwargs=True)
        else:
            targets, shared = inject(self.model, config, name, method)
        self.method = method
        self.configs[name], self.targets[name] = config, targets
        if shared is not None:
            self.shared[name] = shared
        if trainable:
            self.trainable_adapters.add(name)
        self._update_modules()

    def set_adapter(self, names: str | list[str]) -> None:
        """Activate ``names`` (one name, a list run in order, or [] for none)."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in self.configs:
                raise UserError(f"no adapter named {name!r}; adapters: {', '.join(self.configs) or 'none'}",
                                where="adapter name")
        if len(names) > 1 and self.method is not None and self.method.make_encoder is not None:
            raise UserError(f"{self.method.name} adapters act one at a time; activate one of {', '.join(names)}",
                            where="adapter name")
        self.unmerge()
        self.active_adapters = names
        self._update_modules()

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise UserError(f"no adapter named {name!r}; adapters: {', '.join(self.configs) or 'none'}",
                            where="adapter name")
        self.unmerge()
        for key in self.targets.pop(name):
            layer = self.model.get_submodule(key)
            layer.remove(name)
            if not layer.adapter_names():
                _replace(self.model, key, layer.base_layer)
        for key, wrapper in list(self._modules_to_save()):
            if name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
            if not len(wrapper.modules_to_save):
                _replace(self.model, key, wrapper.original_module)
        del self.configs[name]
        if name in self.shared:
            del self.shared[name]
        self.trainable_adapters.discard(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        if not self.configs:
            self.method = None
            if self._input_hook is not None:
                self._input_hook.remove()
                self._input_hook = None
        self._update_modules()

    def _layers(self) -> Iterator[AdapterLayer]:
        return (m for m in self.model.modules() if isinstance(m, AdapterLayer))

    def _modules_to_save(self) -> Iterator[tuple[str, ModulesToSave]]:
        return ((k, m) for k, m in self.model.named_modules() if isinstance(m, ModulesToSave))

    def _update_modules(self) -> None:
        """Push the active list into every layer and set requires_grad on adapter parameters."""
        for layer in self._layers():
            layer.active_adapters = list(self.active_adapters)
            for name in layer.adapter_names():
                train = name in self.active_adapters and name in self.trainable_adapters
                for param in layer.adapter_parameters(name):
                    param.requires_grad_(train)
        for _, wrapper in self._modules_to_save():
            wrapper.active = next((n for n in self.active_adapters if n in wrapper.modules_to_save), None)
            for name, module in wrapper.modules_to_save.items():
                module.requires_grad_(name == wrapper.active and name in self.trainable_adapters)
        for name, encoder in self._encoders().items():
            encoder.requires_grad_(name in self.active_adapters and name in self.trainable_adapters)

    def _encoders(self) -> dict[str, nn.Module]:
        """The modules of a make_encoder method's adapters (prefix tuning), by adapter name."""
        if self.method is None or self.method.make_encoder is None:
            return {}
        return dict(self.shared.items())

    def _prepare_inputs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        """The model's forward pre-hook: the active encoder's changes to the arguments, if any."""
        encoders = self._encoders()
        active = [encoders[n] for n in self.active_adapters if n in encoders and not encoders[n].disabled]
        return active[0].prepare_inputs(args, kwargs) if active else None

    # ----- merging and disabling -------------------------------------------------------------
    def merged_adapters(self) -> list[str]:
        names: list[str] = []
        for layer in self._layers():
            names += [n for n in layer.merged_adapters if n not in names]
        return names

    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters ``names`` (default: the active ones) into the base weights."""
        if not self.mergeable():
            raise UserError(self.method.merge_refusal, where="merge")
        names = list(self.active_adapters if names is None else names)
        untie_adapted_head(self.model)  # merging into a head tied to the embeddings would move them
        for layer in self._layers():
            layer.merge(names)

    def mergeable(self) -> bool:
        """Whether the adapters' method has a merge rule (bottleneck adapters have none)."""
        return self.method is None or self.method.merge_refusal is None

    def unmerge(self) -> None:
        for layer in self._layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain model (adapter layers removed, the
        active ``modules_to_save`` copies in place). This AdapterModel is empty afterwards."""
        self.merge()
        for key, module in list(self.model.named_modules()):
            if isinstance(module, AdapterLayer):
                _replace(self.model, key, module.base_layer)
            elif isinstance(module, ModulesToSave):
                keep = module.modules_to_save[module.active] if module.active else module.original_module
                _replace(self.model, key, keep)
        self.configs.clear()
        self.targets.clear()
        self.active_adapters = []
        self.method = None
        return self.model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are unmerged for it)."""
        merged = {id(layer): list(layer.merged_adapters) for layer in self._layers()}
        self.unmerge()
        wrappers = [m for m in self.model.modules() if isinstance(m, (AdapterLayer, ModulesToSave))]
        wrappers += list(self._encoders().values())
        for module in wrappers:
            module.disabled = True
        try:
            yield
        finally:
            for module in wrappers:
                module.disabled = False
            for layer in self._layers():
                if merged.get(id(layer)):
                    layer.merge(merged[id(layer)])

    # ----- parameters, saving, running ---------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable, total = count_parameters(self)  # the model and shared state (a prefix)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, directory: str | Path, adapter_names: list[str] | None = None) -> None:
        """Write each adapter in PEFT's format: ``default`` into ``directory``, others into
        ``directory/<name>`` (PEFT's layout)."""
        from loraforge.adapters.io import save_adapter

        for name in adapter_names or list(self.configs):
            save_adapter(self, name, Path(directory) if name == "default" else Path(directory) / name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


def _replace(model: nn.Module, key: str, module: nn.Module) -> None:
    parent, _, child = key.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attach(model: nn.Module, config: AdapterConfig, name: str = "default") -> AdapterModel:
    """Freeze ``model``, add a trainable adapter ``name`` from ``config`` and activate it.
    On an AdapterModel this adds (and activates) another adapter."""
    adapter_model = model if isinstance(model, AdapterModel) else AdapterModel(model)
    adapter_model.add_adapter(name, config)
    adapter_model.set_adapter(name)
    return adapter_model


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path, name: str = "default",
                 is_trainable: bool = False) -> AdapterModel:
    """Load an adapter folder (ours or PEFT's). On a plain model the adapter is activated; on an
    AdapterModel it is added beside the others (activate it with ``set_adapter``)."""
    from loraforge.adapters.io import read_adapter

    return attach_read_adapter(model, read_adapter(directory), name, is_trainable)


def attach_read_adapter(model: nn.Module, contents: tuple, name: str = "default",
                        is_trainable: bool = False) -> AdapterModel:
    """:func:`load_adapter` from ``contents = read_adapter(directory)`` (read before the model
    loads, so that a broken adapter file fails fast)."""
    from loraforge.adapters.io import load_tensors

    config, tensors, where = contents
    fresh = not isinstance(model, AdapterModel)
    adapter_model = AdapterModel(model) if fresh else model
    adapter_model.add_adapter(name, config, trainable=is_trainable)
    try:
        load_tensors(adapter_model, name, tensors, where)
    except UserError:
        adapter_model.delete_adapter(name)
        raise
    if fresh:
        adapter_model.set_adapter(name)
    return adapter_model


def untie_adapted_head(model: nn.Module) -> None:
    """Give a wrapped (adapted) output head its own weight if it shares the input embeddings'."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    inner = getattr(head, "base_layer", None) or getattr(head, "original_module", None)
    if inner is None or embed is None or getattr(inner, "weight", None) is not embed.weight:
        return
    inner.weight = nn.Parameter(inner.weight.detach().clone(), requires_grad=False)
    for copy in getattr(head, "modules_to_save", {}).values():
        if copy.weight is embed.weight:
            copy.weight = nn.Parameter(copy.weight.detach().clone(), requires_grad=False)
    set_tied(model, False)


def set_tied(model: nn.Module, value: bool) -> None:
    """Set ``tie_word_embeddings`` in the model's config (and its text config)."""
    config = model.config
    config.tie_word_embeddings = value
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        text.tie_word_embeddings = value
