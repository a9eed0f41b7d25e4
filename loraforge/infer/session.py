"""Loading what inference runs: a base model (any source ``load_model`` reads) and, optionally,
an unmerged adapter on top of it.

The adapter stays unmerged, so a 4-bit base keeps its 4-bit layers and ``--compare`` can switch
the adapter off (``AdapterModel.disable_adapter``). An adapter folder written by ``loraforge
train`` also holds the run's ``config.yaml``; its ``data.template`` is the chat template the
adapter was trained with, which generation and chat then use by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import UserError


@dataclass
class InferenceSession:
    """``model`` is what to call (the AdapterModel when an adapter is loaded, else the base)."""

    model: Any
    tokenizer: Any
    adapter: Any = None  # the AdapterModel, or None
    trained_template: str | None = None  # data.template of the adapter's training run, if known


def load_for_inference(source: str | Path, adapter: str | Path | None = None, *, quantize: str | None = None,
                       compute_dtype=None, device: str | None = None) -> InferenceSession:
    """Load ``source`` (quantized on the fly with ``quantize``) and attach the adapter folder,
    read first: a broken adapter file fails before the (slow) model load."""
    from loraforge.adapters.io import read_adapter
    from loraforge.models import load_model

    contents = read_adapter(adapter) if adapter is not None else None
    model, tokenizer = load_model(source, quantize=quantize, compute_dtype=compute_dtype, device=device)
    if contents is None:
        return InferenceSession(model, tokenizer)
    adapter_model = attach_adapter(model, contents, adapter, str(source))
    return InferenceSession(adapter_model, tokenizer, adapter_model, trained_template(adapter))


def attach_adapter(model, contents: tuple, adapter: str | Path, source: str, name: str = "default"):
    """Attach ``contents = read_adapter(adapter)`` as adapter ``name`` (on an AdapterModel, beside
    the others), with a clearer message when the adapter was made for another base."""
    import json

    from loraforge.adapters.model import attach_read_adapter

    try:
        return attach_read_adapter(model, contents, name=name)
    except UserError as err:
        try:
            base = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
            base = base.get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base = None
        made_for = f" (it names {base!r} as its base)" if base else ""
        raise UserError(f"{err.message}; this adapter does not fit the model {source}{made_for}: "
                        "load it on the base model it was trained on", where=err.where) from None


def training_config(adapter: str | Path) -> dict | None:
    """The ``config.yaml`` that ``loraforge train`` writes beside the adapter, as plain data
    (None when there is none, e.g. an adapter trained with PEFT)."""
    import yaml

    file = Path(adapter) / "config.yaml"
    if not file.is_file():
        return None
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def trained_template(adapter: str | Path) -> str | None:
    """``data.template`` of the adapter's training run, if known."""
    config = training_config(adapter) or {}
    data = config.get("data")
    template = data.get("template") if isinstance(data, dict) else None
    return template if isinstance(template, str) else None
