"""The train form, read off the config schema (``loraforge.train.config``), and its values turned
into the very config ``loraforge train`` would run.

Each form field is one dotted key of the schema: its kind (text, integer, number, true/false, a
choice), its default and its choices come from the dataclasses and the tuples the validation
itself checks against (``METHODS``, ``FORMATS``, ...), so the form cannot drift from the YAML.
Form values become the same ``key=value`` overrides the command line takes (``form_overrides``)
and go through ``load_config`` and the checks ``loraforge train`` makes before it loads a model
(``read_inputs``: the output folder, the data file and its rows), so a bad value gets the CLI's
own message, which ``error_key`` ties to the field its key names. The resolved config is written
as YAML (``dump_yaml``); with every path made absolute, ``loraforge train THAT.yaml`` runs it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from loraforge.errors import UserError
from loraforge.train import config as schema

# The main keys, in the order the form shows them (the rest keep their schema defaults; a YAML
# file or the CLI reaches every key).
FORM_KEYS = (
    "model", "quantization.type",
    "data.train", "data.format", "data.template", "data.max_length", "data.train_on_prompt",
    "adapter.method", "adapter.r", "adapter.alpha", "adapter.dropout", "adapter.targets", "adapter.init",
    "train.steps", "train.epochs", "train.batch_size", "train.grad_accum", "train.lr", "train.schedule",
    "train.warmup_steps", "train.optimizer", "train.save_every", "train.seed",
    "output_dir", "overwrite",
)
NO_QUANTIZATION = "none"  # the choice that means ``quantization: null`` (a 16/32-bit base)
PATH_KEYS = ("model", "data.train", "output_dir")


def _choices() -> dict[str, tuple[str, ...]]:
    """The tuples each choice key is validated against, from the modules that own them."""
    from loraforge.data.formats import FORMATS
    from loraforge.data.templates import TEMPLATES
    from loraforge.quant.codebooks import QUANT_TYPES
    from loraforge.train.optimizers import available_optimizers

    return {
        "quantization.type": (NO_QUANTIZATION, *QUANT_TYPES),
        "data.format": FORMATS, "data.template": TEMPLATES,
        "adapter.method": schema.METHODS, "adapter.init": schema.INITS,
        "train.schedule": schema.SCHEDULES, "train.optimizer": available_optimizers(),
    }


@dataclass(frozen=True)
class Field:
    """One form field: ``kind`` is text | int | float | bool | choice; ``optional``: the key
    takes null (an empty field means the schema's default, which may itself depend on others)."""

    key: str
    kind: str
    default: Any
    optional: bool
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.key

    @property
    def elem_id(self) -> str:
        return "field-" + self.key.replace(".", "-")


def default_of(key: str) -> Any:
    return _field(key, ()).default


def form_fields() -> list[Field]:
    choices = _choices()
    return [_field(key, choices.get(key, ())) for key in FORM_KEYS]


def _field(key: str, choices: tuple[str, ...]) -> Field:
    cls, default = schema.Config, schema.Config()
    parts = key.split(".")
    tp: Any = None
    for part in parts:
        f = next(f for f in dataclasses.fields(cls) if schema._key(f) == part)
        tp = typing.get_type_hints(cls)[f.name]
        default = getattr(default, f.name) if default is not None else None
        cls = schema._dataclass_of(tp) or cls
    options = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    optional = type(None) in options
    if choices:
        kind = "choice"
    elif bool in options and len(options) == 1:
        kind = "bool"
    elif int in options:
        kind = "int"
    elif float in options:
        kind = "float"
    else:
        kind = "text"
    return Field(key, kind, default, optional, choices)


# --------------------------------------------------------------------------- values -> config
def form_overrides(values: dict[str, Any], cwd: Path | None = None) -> list[str]:
    """``key=value`` overrides (as ``loraforge train`` takes them) for the form's ``values``.

    Typed text is read as YAML, as the command line reads ``key=value``; an empty optional field
    is left out (the schema's default); an empty required field is given as null, so the schema
    says what it expects. Relative paths are made absolute against
    ``cwd`` (the server's folder), so the YAML written from them runs from anywhere; a ``model``
    only when that path exists (otherwise it is an alias)."""
    cwd = cwd or Path.cwd()
    fields = {f.key: f for f in form_fields()}
    out = []
    for key, value in values.items():
        f = fields[key]
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "":
            if not f.optional:
                out.append(f"{key}=")
            continue
        if key == "quantization.type" and value == NO_QUANTIZATION:
            out.append("quantization=null")
            continue
        if f.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if key in PATH_KEYS and isinstance(value, str):
            path = Path(value).expanduser()
            if not path.is_absolute() and (key != "model" or (cwd / path).exists()):
                value = str(cwd / path)
            out.append(f"{key}={_yaml_scalar(value)}")
        elif isinstance(value, str) and f.kind != "choice":
            out.append(f"{key}={value}")  # YAML as on the command line: adapter.targets=[q_proj, v_proj], train.lr=2e-4
        else:
            out.append(f"{key}={_yaml_scalar(value)}")
    return out


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


@dataclass
class Checked:
    """A form that passed every check ``loraforge train`` makes before loading the model."""

    config: schema.Config
    overrides: list[str]
    yaml_text: str  # the resolved config: what ``loraforge train THAT.yaml`` runs
    data_summary: str  # rows and format of data.train (detected when data.format is auto)


def check_form(values: dict[str, Any], *, extra: tuple[str, ...] = (), cwd: Path | None = None,
               check_output: bool = True) -> Checked:
    """Validate exactly as ``loraforge train`` does before the model loads; raises UserError.

    ``extra``: more overrides (``resume=true``); ``check_output=False`` skips the output folder
    check (showing the YAML of a folder that holds a run is fine; starting one there is not)."""
    from loraforge.data import detect_format
    from loraforge.train import build
    from loraforge.train.outputs import check_output_dir

    overrides = [*form_overrides(values, cwd), *extra]
    config = schema.load_config(None, overrides)
    if check_output:
        check_output_dir(config)
    train, evals = build.read_records(config)
    build.read_choice_items(config)
    fmt = config.data.format
    shown = f"{detect_format(train, str(config.data.train))} (detected)" if fmt == "auto" else fmt
    summary = f"{config.data.train}: {len(train)} rows, format {shown}"
    if evals:
        summary += f"; {len(evals)} held out for evaluation"
    return Checked(config, overrides, schema.dump_yaml(config), summary)


def error_key(err: UserError, config_paths: dict[str, str] | None = None) -> str | None:
    """The form key a UserError is about (None: not one of the form's), read from its ``where``:
    ``command-line override KEY``, ``file:line (KEY)``, a dotted key itself, or a path that is
    the value of a path key (``config_paths``: key -> resolved path; the output folder checks
    name the folder)."""
    where = err.where or ""
    match = re.fullmatch(r"command-line override (\S+)", where) or re.search(r"\((\S+)\)$", where)
    key = match.group(1) if match else where
    for path_key, path in (config_paths or {}).items():
        if path and (where == path or where.startswith((path + ":", path + "["))):
            key = path_key  # the output folder's checks name the folder; a data row its file and line
    while key and key not in FORM_KEYS:  # quantization -> quantization.type, adapter.x -> adapter.method
        below = [k for k in FORM_KEYS if k.startswith(key + ".")]
        if below:
            return below[0]
        key = key.rpartition(".")[0]
    return key or None


def form_paths(values: dict[str, Any], cwd: Path | None = None) -> dict[str, str]:
    """The path keys' values, resolved as ``form_overrides`` resolves them (for ``error_key``)."""
    cwd = cwd or Path.cwd()
    out = {}
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and value.strip():
            path = Path(value.strip()).expanduser()
            out[key] = str(path if path.is_absolute() else cwd / path)
    return out
