"""From a validated :class:`Config` to the objects the loop trains: the (quantized) base model and
tokenizer, the adapter config for the chosen method, and the tokenized data sets.

The adapter methods are known only through :mod:`loraforge.adapters`' registry (method name ->
(config class, layer class)); the config's shared keys and the method's own sub-section are passed
to the method's config class by name, and a key the user changed that the method does not take is
an error (e.g. ``rslora: true`` with ``method: vera``). ``init: loftq`` swaps in LoftQ's config (a
LoRA config that also quantizes the base) and loads the base in full precision for it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loraforge.errors import UserError
from loraforge.train.config import (
    AdapterSection,
    Config,
    QuantizationConfig,
    loftq_quantization,
    resolved_alpha,
    resolved_rank,
)

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- adapters
def _registry() -> dict[str, Any]:
    import loraforge.adapters  # noqa: F401  (importing the package registers the built-in methods)
    from loraforge.adapters.base import REGISTRY

    return REGISTRY


def registered_methods() -> list[str]:
    """The adapter methods of the registry, and ``full`` (full fine-tuning, no adapter)."""
    return sorted([*_registry(), "full"])


def adapter_config(section: AdapterSection, quantization: QuantizationConfig | None = None,
                   echo: Callable[[str], None] | None = None) -> Any:
    """The registered method's config object (LoraConfig, DoraConfig, VeraConfig, ...).

    Shared keys pass by name; the method's own sub-section (``adapter.vera``, ``adapter.adalora``,
    ``adapter.sora``; ``adapter.loftq`` with ``init: loftq``) passes as ``key``, ``<section>_key`` or
    ``key_``, whichever the config class has. A key the user changed from its default that the
    method's config does not take is an error, never dropped silently.

    ``init: loftq`` gives LoftQ's config (``adapter.loftq.*`` -> its ``loftq_*`` fields; bits and
    quantizer from ``quantization.type`` unless given; block size and double quantization from the
    quantization section; ``echo`` prints the per-layer errors).

    ``method: full`` gives :class:`~loraforge.train.full.FullConfig`: it takes no adapter key.
    """
    if section.method == "full":
        return full_config(section)
    loftq = section.init == "loftq"
    method = _registry()["loftq" if loftq else section.method]
    accepted = {f.name for f in dataclasses.fields(method.config_cls)}
    defaults = AdapterSection()
    kwargs: dict[str, Any] = {}

    def refuse(key: str) -> UserError:
        hint = NOT_APPLICABLE.get((section.method, key), "")
        return UserError(f"does not apply to adapter method {section.method!r}{hint}", where=f"adapter.{key}")

    def offer(key: str, value: Any, default: Any, candidates: list[str]) -> None:
        if (section.method, key) in NOT_APPLICABLE:
            if value != default:
                raise refuse(key)
            return
        for name in candidates:
            if name in accepted:
                kwargs[name] = value
                return
        if value != default:
            raise refuse(key)

    for key, value, given in (("r", resolved_rank(section), section.r), ("alpha", resolved_alpha(section), section.alpha)):
        if key in accepted:
            kwargs[key] = value
        elif given is not None:
            raise refuse(key)
    for f in dataclasses.fields(section):
        if f.name in ("method", "r", "alpha", *SUBSECTIONS):
            continue
        offer(f.name, getattr(section, f.name), getattr(defaults, f.name), [f.name])
    for sub_name in SUBSECTIONS:
        active = sub_name == section.method or (sub_name == "loftq" and section.init == "loftq")
        sub, sub_default = getattr(section, sub_name), getattr(defaults, sub_name)
        for f in dataclasses.fields(sub):
            key = f.metadata.get("key", f.name)
            value, default = getattr(sub, f.name), getattr(sub_default, f.name)
            if active:
                offer(f"{sub_name}.{key}", value, default, [key, f"{sub_name}_{key}", f"{key}_"])
            elif value != default:
                raise UserError(f"is set but adapter.method is {section.method!r}"
                                f"{' and adapter.init is not loftq' if sub_name == 'loftq' else ''}",
                                where=f"adapter.{sub_name}.{key}")
    if loftq:
        if quantization is None:
            raise UserError("init: loftq initialises against a quantized base; set quantization.type",
                            where="adapter.init")
        quantizer, bits = loftq_quantization(section, quantization)
        kwargs.update(loftq_quantizer=quantizer, loftq_bits=bits, blocksize=quantization.blocksize,
                      double_quant=quantization.double_quant, echo=echo)
    return method.config_cls(**kwargs)


def full_config(section: AdapterSection):
    """Full fine-tuning's config; any adapter key changed from its default is an error (it trains
    every weight: there is no rank, target or init to choose)."""
    from loraforge.train.full import FullConfig

    changed = _changed_keys(section, AdapterSection())
    if changed:
        key, value = changed[0]
        raise UserError(f"does not apply to adapter method 'full' (it trains every weight of the model; "
                        f"got {value!r})", where=f"adapter.{key}")
    return FullConfig()


def _changed_keys(section: Any, defaults: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every field of ``section`` (recursing into sub-sections) that
    differs from ``defaults``, ``method`` aside."""
    changed = []
    for f in dataclasses.fields(section):
        value, default = getattr(section, f.name), getattr(defaults, f.name)
        key = prefix + f.metadata.get("key", f.name)
        if f.name == "method" and not prefix:
            continue
        if dataclasses.is_dataclass(value):
            changed += _changed_keys(value, default, key + ".")
        elif value != default:
            changed.append((key, value))
    return changed


SUBSECTIONS = ("loftq", "adalora", "sora", "vera", "bottleneck", "prefix")
# why a shared key does not apply to a method (AdaLoRA's own rank_pattern holds the allocator's
# kept-triplet masks, not ranks, so the shared key must not reach it)
NOT_APPLICABLE = {
    ("adalora", "r"): " (its ranks are adapter.adalora.init_r at the start and target_r on average at the end)",
    ("adalora", "rank_pattern"): " (AdaLoRA allocates each module's rank itself, from adapter.adalora.init_r "
                                 "down to target_r on average)",
    **{("prefix", key): " (prefix tuning adds key/value prefixes to every attention layer and wraps no module)"
       for key in ("targets", "exclude", "layers_to_transform", "modules_to_save")},
}


def adapter_key_applies(method: str, key: str) -> bool:
    """Whether ``adapter.<key>`` (a shared key or a method's sub-section) is taken by ``method``."""
    if method == "full":
        return False
    if key in SUBSECTIONS:
        return key in (method, "loftq")  # adapter.loftq goes with init: loftq, whatever the method
    if (method, key) in NOT_APPLICABLE:
        return False
    registry = _registry()
    if method not in registry:
        return True  # validation names the unknown method
    return key in {f.name for f in dataclasses.fields(registry[method].config_cls)}


def attach_adapter(model, config: Config, echo: Callable[[str], None] | None = None):
    """Attach the configured adapter (name ``default``). With ``init: loftq`` the model must be
    full precision: LoftQ quantizes its targets while initialising the adapter, and the other
    linear layers but the output head plainly (``loftq_attach``), echoing the errors. With
    ``method: full`` the model itself is made trainable (:class:`~loraforge.train.full.FullModel`)."""
    from loraforge import adapters

    if config.adapter.method == "full":
        from loraforge.train.full import FullModel

        return FullModel(model)
    adapter_cfg = adapter_config(config.adapter, config.quantization, echo)
    if config.adapter.init == "loftq":
        from loraforge.adapters.loftq import loftq_attach

        return loftq_attach(model, adapter_cfg)
    return adapters.attach(model, adapter_cfg)


# --------------------------------------------------------------------------- model
def load_base(config: Config, device: str | None, dtype: torch.dtype | None = None):
    """(model, tokenizer): the base model, quantized per ``config.quantization`` (full precision
    with ``init: loftq``, which quantizes it when the adapter is attached). ``dtype``: the dtype
    of its unquantized weights and of the 4-bit matmuls (None: the checkpoint's; see
    :class:`~loraforge.train.precision.Precision`); LoftQ's base stays full precision."""
    from loraforge import models

    q = config.quantization
    if config.adapter.init == "loftq":
        return models.load_model(config.model, device=device)
    if q is None:
        return models.load_model(config.model, compute_dtype=dtype, device=device)
    return models.load_model(
        config.model, quantize=q.type, blocksize=q.blocksize, double_quant=q.double_quant,
        compute_dtype=dtype, device=device, llm_int8_threshold=q.llm_int8_threshold,
    )


# --------------------------------------------------------------------------- data
def check_data_file(config: Config, key: str) -> str:
    """The data file of ``key`` (``data.train`` / ``data.eval``); a missing one is an error naming
    the key, the path as written and the folder it was looked for in."""
    from pathlib import Path

    path = getattr(config.data, key.split(".", 1)[1])
    if path is None:
        raise UserError("expected a file path", where=key)
    if not Path(path).is_file():
        written, folder = config.written_paths.get(key, (path, str(Path.cwd())))
        what = "is a folder, not a data file" if Path(path).is_dir() else "not found"
        raise UserError(f"data file {written!r} {what} (looked for in {folder})", where=key)
    return path


def read_choice_items(config: Config) -> list:
    """The ``data.eval_choice`` rows (MMLU layout, see ``loraforge.infer.choice``), or []."""
    if not config.data.eval_choice:
        return []
    from loraforge.infer.choice import read_choice_rows

    return read_choice_rows(check_data_file(config, "data.eval_choice"))


def read_records(config: Config) -> tuple[list[dict], list[dict]]:
    """(train records, eval records), eval split off with the seed when ``eval_fraction`` > 0.
    Reading validates the files (format errors name file and line) before anything is written."""
    from loraforge import data

    d = config.data
    train = data.load_records(check_data_file(config, "data.train"))
    evals: list[dict] = []
    if d.eval:
        evals = data.load_records(check_data_file(config, "data.eval"))
    elif d.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(config.train.seed).shuffle(order)
        n_eval = max(1, math.ceil(d.eval_fraction * len(train)))
        if n_eval >= len(train):
            raise UserError(f"eval_fraction {d.eval_fraction} leaves no training rows out of {len(train)}",
                            where="data.eval_fraction")
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, evals


def tokenize(records: list[dict], tokenizer, config: Config, source: str, *, pack: bool = True):
    """(examples, stats) via the data pipeline; packed into rows of max_length when
    ``data.packing`` is on (and ``pack``: the dry run shows the examples before packing)."""
    from loraforge import data

    d = config.data
    examples, stats = data.build_dataset(
        records, tokenizer, format=d.format, template=d.template, max_length=d.max_length,
        train_on_prompt=d.train_on_prompt, source=source,
    )
    if not examples:
        raise UserError("no usable examples after tokenization", where=source)
    if d.packing and pack:
        examples = pack_examples(examples, config)
    return examples, stats


def pack_examples(examples: list[dict], config: Config) -> list[dict]:
    from loraforge import data

    return data.pack(examples, config.data.max_length)
