"""PEFT's on-disk adapter format, both ways.

A folder holds ``adapter_config.json`` (PEFT's config fields: ``peft_type``, ``r``,
``lora_alpha``, ``target_modules``, ``use_rslora``, ``use_dora``, ... or VeRA's) and
``adapter_model.safetensors`` whose keys are the model's module names with PEFT's prefix and the
adapter name removed::

    base_model.model.<module>.lora_A.weight            [r, in]
    base_model.model.<module>.lora_B.weight            [out, r]
    base_model.model.<module>.lora_magnitude_vector    [out]       (DoRA)
    base_model.model.<module>.vera_lambda_b / vera_lambda_d        (VeRA)
    base_model.vera_A, base_model.vera_B                           (VeRA, save_projection)
    base_model.model.<modules_to_save module>.weight               (full copies)

``target_modules`` is written as the list of adapted module names (shortened to name suffixes
as PEFT does when there are 20 or more), or the regex string when the config used one. Reading
accepts every field PEFT writes; a field naming a feature loraforge lacks is an error if it is
set. Missing or unexpected tensors and wrong shapes are errors naming the key. Older PEFT
folders with ``adapter_model.bin`` load too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loraforge.adapters.base import AdapterConfig, method_of_peft_type
from loraforge.adapters.inject import ModulesToSave, condense_target_names
from loraforge.errors import UserError
from loraforge.files import apply_umask, save_tensors

if TYPE_CHECKING:
    from loraforge.adapters.model import AdapterModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def adapter_tensors(adapter_model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's keys (live tensors, not copies)."""
    model = adapter_model.model
    tensors: dict[str, torch.Tensor] = {}
    for key in adapter_model.targets[name]:
        for suffix, tensor in model.get_submodule(key).peft_tensors(name).items():
            tensors[f"{PREFIX}{key}.{suffix}"] = tensor
    if name in adapter_model.shared:
        tensors.update(adapter_model.shared[name].peft_tensors(adapter_model.configs[name]))
    for key, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
            for pname, tensor in wrapper.modules_to_save[name].state_dict().items():
                tensors[f"{PREFIX}{key}.{pname}"] = tensor
    return tensors


def peft_config_dict(adapter_model: AdapterModel, name: str) -> dict[str, Any]:
    config = adapter_model.configs[name]
    model = adapter_model.model
    if isinstance(config.targets, str) and config.targets.lower() != "all-linear":
        target_modules: str | list[str] = config.targets
    elif isinstance(config.targets, list) and len(config.targets) < 20:
        target_modules = sorted(config.targets)
    else:
        target_modules = condense_target_names(adapter_model.targets[name], model)
    data = config.to_peft(target_modules)
    model_config = getattr(model, "config", None)
    data["base_model_name_or_path"] = getattr(model, "name_or_path", None) or getattr(model_config, "_name_or_path", None) or None
    data["revision"] = None
    return dict(sorted(data.items()))


def save_adapter(adapter_model: AdapterModel, name: str, directory: str | Path,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write adapter ``name`` in PEFT's format; ``tensors``: its PEFT-keyed tensors when the
    caller has them already (e.g. gathered whole from FSDP shards), else read from the model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(adapter_model, name) if tensors is None else tensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_tensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(peft_config_dict(adapter_model, name), indent=2) + "\n")
    apply_umask(directory / CONFIG_NAME)


def read_adapter(directory: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """(config, tensors, weights path) of an adapter folder."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise UserError("adapter folder not found", where=str(directory))
    if not config_path.is_file():
        raise UserError(f"no {CONFIG_NAME} in the adapter folder", where=str(directory))
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON: {err.msg}", where=f"{config_path}:{err.lineno}") from None
    except (UnicodeDecodeError, OSError) as err:
        raise UserError(f"cannot read the adapter config ({err}); expected a JSON file", where=str(config_path)) from None
    if not isinstance(data, dict) or "peft_type" not in data:
        raise UserError("expected a JSON object with a 'peft_type' key", where=str(config_path))
    method = method_of_peft_type(str(data["peft_type"]), str(config_path))
    config = method.config_cls.from_peft(data, str(config_path))
    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        from loraforge.models.validate import load_safetensors

        tensors = load_safetensors(weights)
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        weights = directory / LEGACY_WEIGHTS_NAME
        tensors = _load_legacy(weights)
    else:
        raise UserError(f"no {WEIGHTS_NAME} in the adapter folder", where=str(directory))
    return config, tensors, str(weights)


def _load_legacy(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an ``adapter_model.bin`` (tensors only: ``weights_only``)."""
    import pickle

    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"truncated or corrupt PyTorch weights file ({str(err).splitlines()[0]}); expected a "
                        "complete adapter_model.bin of tensors (re-save it)", where=str(path)) from None
    if not isinstance(tensors, dict):
        raise UserError("expected a dict of tensors", where=str(path))
    return tensors


@torch.no_grad()
def load_tensors(adapter_model: AdapterModel, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` (PEFT keys) into adapter ``name``; every expected key must be present
    with its shape and no other key may be."""
    model = adapter_model.model
    expected = adapter_tensors(adapter_model, name)
    optional: set[str] = set()
    if name in adapter_model.shared:  # VeRA projections saved although save_projection is false
        optional = {"base_model.vera_A", "base_model.vera_B"} - expected.keys()
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if unexpected:
        raise UserError(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); the adapter "
                        f"does not fit this model or config", where=where)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UserError(f"missing key {missing[0]!r} ({len(missing)} missing in all)", where=where)
    for key in adapter_model.targets[name]:
        layer = model.get_submodule(key)
        prefix = f"{PREFIX}{key}."
        layer.load_peft_tensors(name, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                where=f"{where}: {prefix[:-1]}")
    if name in adapter_model.shared:
        adapter_model.shared[name].load_peft_tensors(tensors, where)
    for key, wrapper in model.named_modules():
        if isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
            module = wrapper.modules_to_save[name]
            for pname, tensor in module.state_dict().items():
                value = tensors[f"{PREFIX}{key}.{pname}"]
                if value.shape != tensor.shape:
                    raise UserError(f"shape {tuple(value.shape)} does not match the model's {tuple(tensor.shape)}",
                                    where=f"{where}: {PREFIX}{key}.{pname}")
                tensor.copy_(value)
