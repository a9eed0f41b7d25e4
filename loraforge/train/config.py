"""The training configuration: a YAML file plus dotted ``key=value`` overrides, validated into
dataclasses before anything is loaded or written.

Schema (public names, see ``shared/design/interface.md``)::

    model: smollm2-135m-instruct        # HF folder | .gguf file | bnb-4bit folder | alias
    quantization: {type: nf4, double_quant: true, blocksize: 64}   # or null; or {type: llm_int8, llm_int8_threshold: 6.0}
    adapter: {method: lora, r: 16, alpha: 16, dropout: 0.0, targets: all-linear, ...
              loftq: {...}, adalora: {...}, sora: {...}, vera: {...}, bottleneck: {...}, prefix: {...}}
    # method: adalora | sora is one line (the loop drives their rank allocation / gate step);
    # method: bottleneck adds Houlsby / Pfeiffer adapters (adapter.bottleneck: placement,
    # reduction_factor | bottleneck_size, non_linearity, residual; adapter.dropout on its input);
    # method: prefix adds key/value prefixes to every attention layer (adapter.prefix:
    # num_virtual_tokens, projection, projection_hidden, init; no targets, r, alpha or dropout);
    # method: full trains every weight of a 16/32-bit base (quantization: null; no other adapter key)
    # init: loftq quantizes the base itself, with bits and code book from quantization.type
    # (nf2 -> NF2) unless adapter.loftq.bits / quantizer say otherwise (they must agree)
    data: {train, eval, eval_fraction, eval_choice, format, template, max_length, train_on_prompt, packing}
    train: {steps | epochs, batch_size, grad_accum, lr, schedule, warmup_steps, optimizer,
            max_grad_norm, weight_decay, seed, gradient_checkpointing, dtype, kernels, eval_every,
            save_every, keep_last, distributed}   # distributed: ddp | fsdp (torchrun, > 1 process)
    output_dir: runs/demo
    resume: false
    overwrite: false

Every mistake is a :class:`~loraforge.errors.UserError` naming the YAML file and line (or the
override) and the key: unknown keys get a did-you-mean, a key put in the wrong section names the
section it belongs to (``adapter.lr`` -> "did you mean train.lr?"), wrong types and out-of-range
values say what was expected. YAML 1.1 reads ``2e-4`` as a string; float fields accept it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from loraforge.errors import UserError, check_choice, did_you_mean

METHODS = ("lora", "dora", "vera", "adalora", "sora", "bottleneck", "prefix", "full")
INITS = ("default", "gaussian", "pissa", "loftq")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")  # train.dtype (loraforge/train/precision.py)


# --------------------------------------------------------------------------- schema
@dataclass
class QuantizationConfig:
    type: str = "nf4"  # nf4 | fp4 | nf2 | ... (blockwise code books) | llm_int8 (LLM.int8 rows)
    double_quant: bool = True  # blockwise types only
    blocksize: int = 64  # blockwise types only
    # llm_int8 only: the outlier threshold (transformers' name; 0: no decomposition); None: 6.0, or
    # the one an 8-bit checkpoint records
    llm_int8_threshold: Union[float, None] = None


BLOCKWISE_ONLY = ("double_quant", "blocksize")


@dataclass
class LoftqConfig:
    bits: Union[int, None] = None  # None: from quantization.type (nf2 -> 2)
    iterations: int = 1
    quantizer: Union[str, None] = None  # None: from quantization.type (nf -> nf, int -> uniform)
    mixed_4bit_layers: int = 0


@dataclass
class AdaloraConfig:
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5


@dataclass
class SoraConfig:
    lambda_: float = field(default=1e-3, metadata={"key": "lambda"})
    lambda_schedule: Union[str, None] = None


@dataclass
class VeraSection:
    d_initial: float = 0.1
    projection_prng_key: int = 0
    save_projection: bool = True


@dataclass
class BottleneckSection:
    placement: str = "houlsby"  # houlsby: after attention and MLP; pfeiffer: after the MLP
    reduction_factor: Union[int, None] = None  # None: 16, unless bottleneck_size is given
    bottleneck_size: Union[int, None] = None
    non_linearity: Union[str, None] = None  # None: swish (houlsby), relu (pfeiffer)
    residual: bool = True


@dataclass
class PrefixSection:
    num_virtual_tokens: int = 20
    projection: bool = False  # Li & Liang's reparameterisation MLP (folded away in the saved folder)
    projection_hidden: Union[int, None] = None  # None: the key/value width (PEFT's default)
    init: str = "random"  # random: PEFT's N(0, 1); words: the model's keys/values of random real tokens


@dataclass
class AdapterSection:
    method: str = "lora"
    r: Union[int, None] = None  # None: 16 for the LoRA family, 256 for VeRA
    alpha: Union[float, None] = None  # None: equal to r (scale 1); AdaLoRA: 8, PEFT's default
    dropout: float = 0.0
    targets: Union[str, list[str]] = "all-linear"
    exclude: Union[str, list[str], None] = None
    rslora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: Union[int, list[int], None] = None
    loftq: LoftqConfig = field(default_factory=LoftqConfig)
    adalora: AdaloraConfig = field(default_factory=AdaloraConfig)
    sora: SoraConfig = field(default_factory=SoraConfig)
    vera: VeraSection = field(default_factory=VeraSection)
    bottleneck: BottleneckSection = field(default_factory=BottleneckSection)
    prefix: PrefixSection = field(default_factory=PrefixSection)


@dataclass
class DataSection:
    train: Union[str, None] = None
    eval: Union[str, None] = None
    eval_fraction: float = 0.0
    eval_choice: Union[str, None] = None  # MMLU-layout rows: choice accuracy logged beside eval loss
    format: str = "auto"
    template: str = "auto"
    max_length: int = 512
    train_on_prompt: bool = False
    packing: bool = False


@dataclass
class TrainSection:
    steps: Union[int, None] = None
    epochs: Union[int, None] = None  # neither set: 1 epoch
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    gradient_checkpointing: Union[bool, str] = "auto"  # auto: on when activations would not fit (train/checkpointing.py)
    dtype: str = "auto"  # auto | bf16 | fp32: bf16 autocast where the device multiplies bf16 natively (train/precision.py)
    kernels: bool = True  # fused kernels (model types of loraforge.kernels.arch_specs), false: transformers' forward
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    distributed: Union[str, None] = None  # ddp | fsdp with several processes (torchrun); None: ddp


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"
    quantization: Union[QuantizationConfig, None] = field(default_factory=QuantizationConfig)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output_dir: str = "runs/train"
    resume: bool = False
    overwrite: bool = False  # replace the files of an earlier run in output_dir
    source: Union[str, None] = None  # the YAML file it came from (not a key)
    # (not a key) path keys -> (the path as written, the folder it was resolved against)
    written_paths: dict[str, tuple[str, str]] = field(default_factory=dict)


NOT_KEYS = {"source", "written_paths"}
# Keys holding paths: relative ones in a config file resolve against the file's folder, relative
# ones on the command line against the current directory. ``model`` only when that path exists
# (otherwise it is an alias or a hub-style name).
PATH_KEYS = ("data.train", "data.eval", "data.eval_choice", "output_dir", "model")


def to_dict(config: Any) -> Any:
    """The config as plain YAML-ready data, with the public key names."""
    if dataclasses.is_dataclass(config):
        return {
            _key(f): to_dict(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.name not in NOT_KEYS
        }
    if isinstance(config, list):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------- loading
def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                user_file: bool = True) -> Config:
    """Read ``path`` (None: an empty config), apply ``key=value`` overrides, validate.

    ``user_file=False`` marks the file as defaults the user did not write (the embedded demo's):
    its adapter keys that do not apply to an ``adapter.method`` chosen on the command line are
    dropped instead of refused, so ``loraforge train adapter.method=vera`` just works. Keys the
    user wrote (a file of their own, or an override) that do not apply stay errors.
    """
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = None
    if path is not None:
        source = str(path)
        raw, lines = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, lines, item)
    if not user_file:
        _drop_inapplicable_defaults(raw, lines)
    written = _resolve_paths(raw, lines, Path(path).resolve().parent if path is not None else None)
    config = _build(Config, raw, "", _Where(source, lines))
    config.source = source
    config.written_paths = written
    _check_config(config, _Where(source, lines))
    return config


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value


def _resolve_paths(raw: dict[str, Any], lines: dict[str, int], folder: Path | None) -> dict[str, tuple[str, str]]:
    """Resolve the file's relative path keys against its folder (in place); returns each path key
    given -> (as written, folder it resolves against) for messages about missing files."""
    written = {}
    for key in PATH_KEYS:
        value = _get(raw, key)
        if not isinstance(value, str) or not value:
            continue
        from_file = folder is not None and lines.get(key, -1) != -1
        base = folder if from_file else Path.cwd()
        written[key] = (value, str(base))
        if not from_file or Path(value).expanduser().is_absolute():
            continue
        candidate = folder / value
        if key != "model" or candidate.exists():
            _set(raw, key, str(candidate))
    return written


def _drop_inapplicable_defaults(raw: dict[str, Any], lines: dict[str, int]) -> None:
    """When the user chose ``adapter.method`` on the command line, remove the defaults file's
    adapter keys that method does not take, and its ``r`` / ``alpha`` (tuned for the file's
    method: the chosen one gets its own defaults, e.g. VeRA's r = 256); for ``full`` also its
    quantization, unless given on the command line."""
    adapter = raw.get("adapter")
    if lines.get("adapter.method") != -1 or not isinstance(adapter, dict):
        return
    method = adapter.get("method")
    if not isinstance(method, str):
        return
    from loraforge.train.build import adapter_key_applies

    for key in list(adapter):
        from_file = lines.get(f"adapter.{key}", -1) != -1
        if from_file and key != "method" and (key in ("r", "alpha") or not adapter_key_applies(method, key)):
            del adapter[key]
    if method == "full" and lines.get("quantization") != -1:
        raw["quantization"] = None  # the file's 4-bit base cannot be fully fine-tuned


class _Where:
    """Turns a dotted key into 'file:line (key)' or 'override key=...' for messages."""

    def __init__(self, source: str | None, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        if line == -1:
            return f"command-line override {key}"
        if self.source and line:
            return f"{self.source}:{line} ({key})"
        if self.source:
            return f"{self.source} ({key})"
        return key


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    if not path.is_file():
        raise UserError("config file not found", where=str(path))
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"not valid YAML: {getattr(err, 'problem', err)}", where=where) from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise UserError("expected a YAML mapping of sections (model:, adapter:, ...)", where=str(path))
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines, path)
    return raw, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path) -> None:
    """Record the line of every mapping key; a key given twice is an error (YAML keeps the last)."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key_node, value_node in node.value:
        dotted = f"{prefix}{key_node.value}"
        line = key_node.start_mark.line + 1
        if dotted in seen:
            raise UserError(f"key {dotted!r} is given twice", where=f"{path}:{line}")
        seen.add(dotted)
        lines[dotted] = line
        _collect_lines(value_node, dotted + ".", lines, path)


def _apply_override(raw: dict[str, Any], lines: dict[str, int], item: str) -> None:
    """``train.lr=1e-4`` -> raw["train"]["lr"] = 1e-4 (the value parsed as YAML)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(
            f"expected key=value with a dotted key (e.g. train.lr=1e-4), got {item!r}",
            where="command line",
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"value is not valid YAML: {err}", where=f"command-line override {key}") from None
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
        lines[".".join(parts[: i + 1])] = lines.get(".".join(parts[: i + 1]), -1)
    node[parts[-1]] = value
    lines[key] = -1


# --------------------------------------------------------------------------- validation
def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (for did-you-mean across sections)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in NOT_KEYS:
            continue
        dotted = prefix + _key(f)
        out.append(dotted)
        sub = _dataclass_of(hints[f.name])
        if sub is not None:
            out.extend(_all_keys(sub, dotted + "."))
    return out


def _dataclass_of(tp: Any) -> type | None:
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def _unknown_key(key: str, dotted: str, section_keys: list[str], where: _Where) -> UserError:
    everywhere = _all_keys(Config)
    elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == key and k != dotted]
    if elsewhere:
        hint = f' (did you mean {" or ".join(elsewhere)}?)'
        what = f"key {key!r} does not belong here"
    else:
        hint = did_you_mean(key, section_keys) or did_you_mean(dotted, everywhere)
        what = f"unknown key {key!r}"
    section = dotted.rsplit(".", 1)[0] + ":" if "." in dotted else "the top level"
    return UserError(
        f"{what} in {section}{hint}; expected one of: {', '.join(section_keys)}", where=where(dotted)
    )


def _build(cls: type, raw: Any, prefix: str, where: _Where) -> Any:
    section = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping for {section}, got {_describe(raw)}", where=where(prefix.rstrip(".")))
    fields = {_key(f): f for f in dataclasses.fields(cls) if f.name not in NOT_KEYS}
    for key in raw:
        if key not in fields:
            raise _unknown_key(str(key), prefix + str(key), list(fields), where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, f in fields.items():
        if key in raw:
            kwargs[f.name] = _convert(raw[key], hints[f.name], prefix + key, where)
    return cls(**kwargs)


def _describe(value: Any) -> str:
    return "nothing (null)" if value is None else f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, dotted: str, where: _Where) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted."""
    options = typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"expected {_type_name(tp)}, got nothing (null)", where=where(dotted))
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert_one(value, option, dotted, where)
        except _Mismatch:
            errors.append(option)
    raise UserError(f"expected {_type_name(tp)}, got {_describe(value)}", where=where(dotted))


class _Mismatch(Exception):
    pass


def _convert_one(value: Any, tp: Any, dotted: str, where: _Where) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, dotted + ".", where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Mismatch
        return [_convert_one(v, item, dotted, where) for v in value]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Mismatch
        return {str(k): _convert_one(v, item, dotted, where) for k, v in value.items()}
    raise TypeError(f"unsupported schema type {tp}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]


def _check_config(c: Config, where: _Where) -> None:
    """Ranges and cross-field rules that types alone cannot express."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(message, where=where(key))

    def choice(value: str, choices: tuple[str, ...], key: str, what: str) -> None:
        check_choice(value, choices, what, where=where(key))

    need(bool(c.model), "model", "expected a model: an HF folder, a .gguf file or an alias")
    need(bool(c.output_dir), "output_dir", "expected an output folder")
    if c.quantization is not None:
        q = c.quantization
        need(bool(q.type), "quantization.type", "expected a quantization type such as nf4")
        need(q.blocksize >= 32 and q.blocksize & (q.blocksize - 1) == 0 and q.blocksize <= 4096,
             "quantization.blocksize", f"expected a power of two in 32..4096, got {q.blocksize}")
        # Settings of the other kind are refused unless they hold the default (a dumped config has them all).
        int8 = q.type == "llm_int8"
        for key in BLOCKWISE_ONLY:
            need(not int8 or getattr(q, key) == getattr(QuantizationConfig, key), f"quantization.{key}",
                 f"{key} does not apply to llm_int8 (int8 rows with one absmax each, no blocks, no nested "
                 "scales): remove it")
        need(int8 or q.llm_int8_threshold is None, "quantization.llm_int8_threshold",
             f"llm_int8_threshold applies to type llm_int8, not {q.type}: remove it or set quantization.type: llm_int8")
        need(q.llm_int8_threshold is None or (math.isfinite(q.llm_int8_threshold) and q.llm_int8_threshold >= 0),
             "quantization.llm_int8_threshold",
             f"expected a finite number >= 0 (0: no outlier decomposition), got {q.llm_int8_threshold}")

    a = c.adapter
    if a.method == "full" and c.quantization is not None:
        raise UserError(f"full fine-tuning trains every weight, which a {c.quantization.type} base holds as "
                        "quantized codes, not trainable weights: set quantization: null (a 16/32-bit base), or "
                        "train an adapter (e.g. adapter.method: lora) on the quantized base",
                        where=where("quantization.type" if "quantization.type" in where.lines else "adapter.method"))
    need(a.method != "loftq", "adapter.method",
         "loftq is an initialisation of a LoRA adapter, not a method: use adapter.init: loftq "
         "(with adapter.method: lora)")
    choice(a.method, METHODS, "adapter.method", "adapter method")
    choice(a.init, INITS, "adapter.init", "adapter init")
    need(a.r is None or a.r > 0, "adapter.r", f"expected a rank r > 0, got {a.r}")
    need(a.alpha is None or a.alpha > 0, "adapter.alpha", f"expected alpha > 0, got {a.alpha}")
    need(0.0 <= a.dropout < 1.0, "adapter.dropout", f"expected 0 <= dropout < 1, got {a.dropout}")
    for name, r in a.rank_pattern.items():
        need(r > 0, "adapter.rank_pattern", f"expected ranks > 0, got {name}: {r}")
    need(a.loftq.bits in (None, 2, 3, 4, 8), "adapter.loftq.bits", f"expected 2, 3, 4 or 8, got {a.loftq.bits}")
    need(a.loftq.iterations >= 1, "adapter.loftq.iterations", "expected at least 1 iteration")
    if a.loftq.quantizer is not None:
        from loraforge.adapters.loftq import QUANTIZERS

        choice(a.loftq.quantizer, QUANTIZERS, "adapter.loftq.quantizer", "LoftQ quantizer")
    need(a.loftq.mixed_4bit_layers >= 0, "adapter.loftq.mixed_4bit_layers", "expected >= 0")
    ad = a.adalora
    need(ad.init_r > 0 and ad.target_r > 0, "adapter.adalora.init_r", "expected ranks > 0")
    need(ad.target_r <= ad.init_r, "adapter.adalora.target_r",
         f"expected target_r <= init_r, got {ad.target_r} > {ad.init_r}")
    need(ad.delta_t >= 1, "adapter.adalora.delta_t", "expected delta_t >= 1")
    for key in ("beta1", "beta2"):
        need(0.0 <= getattr(ad, key) < 1.0, f"adapter.adalora.{key}", "expected a value in [0, 1)")
    need(a.sora.lambda_ >= 0, "adapter.sora.lambda", "expected lambda >= 0")
    need(a.vera.d_initial >= 0, "adapter.vera.d_initial", "expected a number >= 0")
    bn = a.bottleneck
    from loraforge.adapters.bottleneck import PLACEMENTS

    choice(bn.placement, tuple(PLACEMENTS), "adapter.bottleneck.placement", "bottleneck placement")
    for key in ("reduction_factor", "bottleneck_size"):
        need(getattr(bn, key) is None or getattr(bn, key) > 0, f"adapter.bottleneck.{key}",
             f"expected a positive integer, got {getattr(bn, key)}")
    need(bn.reduction_factor is None or bn.bottleneck_size is None, "adapter.bottleneck.bottleneck_size",
         "give adapter.bottleneck.reduction_factor or bottleneck_size, not both")
    pf = a.prefix
    need(pf.num_virtual_tokens > 0, "adapter.prefix.num_virtual_tokens",
         f"expected a positive number of virtual tokens, got {pf.num_virtual_tokens}")
    need(pf.projection_hidden is None or pf.projection_hidden > 0, "adapter.prefix.projection_hidden",
         f"expected a positive integer, got {pf.projection_hidden}")
    need(pf.projection_hidden is None or pf.projection, "adapter.prefix.projection_hidden",
         "projection_hidden sizes the reparameterisation MLP; set adapter.prefix.projection: true too")
    from loraforge.adapters.prefix import INITS as PREFIX_INITS

    choice(pf.init, PREFIX_INITS, "adapter.prefix.init", "prefix init")
    need(pf.init != "words" or not pf.projection, "adapter.prefix.init",
         "init: words sets the prefix to real tokens' keys and values, which the projection's output cannot be "
         "set to: use adapter.prefix.projection: false with it")
    if a.init == "loftq" and c.quantization is None:
        raise UserError("init: loftq initialises against a quantized base; set quantization.type "
                        "(e.g. nf4, nf2 or int4)", where=where("adapter.init"))
    need(a.init != "loftq" or a.method == "lora", "adapter.init",
         f"init: loftq initialises a LoRA adapter; it does not apply to adapter method {a.method!r}")

    d = c.data
    from loraforge.data.formats import FORMATS

    choice(d.format, FORMATS, "data.format", "data format")
    need(d.max_length > 0, "data.max_length", f"expected max_length > 0, got {d.max_length}")
    need(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction",
         f"expected 0 <= eval_fraction < 1, got {d.eval_fraction}")
    need(not (d.eval and d.eval_fraction), "data.eval_fraction",
         "give either data.eval (a file) or data.eval_fraction, not both")
    need(d.train is not None, "data.train", "expected a training data file (data.train)")

    t = c.train
    need(t.steps is None or t.epochs is None, "train.epochs",
         "give either train.steps or train.epochs, not both")
    need(t.steps is None or t.steps > 0, "train.steps", f"expected steps > 0, got {t.steps}")
    need(t.epochs is None or t.epochs > 0, "train.epochs", f"expected epochs > 0, got {t.epochs}")
    need(t.batch_size > 0, "train.batch_size", f"expected batch_size > 0, got {t.batch_size}")
    need(t.grad_accum > 0, "train.grad_accum", f"expected grad_accum > 0, got {t.grad_accum}")
    need(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"expected a learning rate > 0, got {t.lr}")
    choice(t.schedule, SCHEDULES, "train.schedule", "schedule")
    need(t.warmup_steps >= 0, "train.warmup_steps", "expected warmup_steps >= 0")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "expected max_grad_norm >= 0 (0 disables clipping)")
    need(t.weight_decay >= 0, "train.weight_decay", "expected weight_decay >= 0")
    need(t.eval_every >= 0, "train.eval_every", "expected eval_every >= 0 (0: only at the end)")
    need(t.save_every >= 0, "train.save_every", "expected save_every >= 0 (0: only on interrupt)")
    need(t.keep_last >= 1, "train.keep_last", "expected keep_last >= 1")
    if isinstance(t.gradient_checkpointing, str):
        value = t.gradient_checkpointing
        need(value == "auto", "train.gradient_checkpointing",
             f"expected true, false or auto, got {value!r}{did_you_mean(value, ['auto'])}")
    choice(t.dtype, PRECISIONS, "train.dtype", "dtype")
    if t.distributed is not None:
        from loraforge.train.distributed import FSDP_METHODS, FSDP_REFUSALS, MODES

        choice(t.distributed, MODES, "train.distributed", "distributed mode")
        why = FSDP_REFUSALS.get(a.method, f"{a.method}'s step between optimizer steps reads whole (unsharded) tensors")
        need(t.distributed != "fsdp" or a.method in FSDP_METHODS, "train.distributed",
             f"fsdp trains {' and '.join(FSDP_METHODS)} adapters; {why}: use train.distributed: ddp")
        need(t.distributed != "fsdp" or t.optimizer == "adamw", "train.distributed",
             f"fsdp trains with optimizer adamw; {t.optimizer} is not built for sharded (DTensor) parameters: "
             "use train.distributed: ddp")
        need(t.distributed != "fsdp" or a.init != "loftq", "train.distributed",
             "init: loftq saves the quantized base it made, which fsdp holds in shards: use train.distributed: ddp")
        need(t.distributed != "fsdp" or c.quantization is None or c.quantization.type != "llm_int8",
             "train.distributed", "fsdp shards 4-bit bases; an llm_int8 base trains with train.distributed: ddp")
    if a.method == "adalora" and t.steps is not None:  # with epochs, checked once the data is read
        need(ad.tinit + ad.tfinal < t.steps, "adapter.adalora.tinit",
             f"tinit ({ad.tinit}) + tfinal ({ad.tfinal}) leave none of the {t.steps} steps for AdaLoRA's "
             "budget to decrease; lower them or train longer")
    from loraforge.train.optimizers import check_optimizer

    check_optimizer(t.optimizer, where("train.optimizer"))
    check_adapter(a, c.quantization, where)


def check_adapter(a: AdapterSection, quantization: QuantizationConfig | None, where: _Where) -> None:
    """The method must be registered (one the schema knows but whose implementation has not
    landed is an error, never ignored), and its config must accept the keys given."""
    from loraforge.train.build import adapter_config, registered_methods

    available = registered_methods()
    if a.method not in available:
        raise UserError(
            f"adapter method {a.method!r} is not available in this build of loraforge "
            f"(available: {', '.join(available) or 'none'})",
            where=where("adapter.method"),
        )
    try:
        adapter_config(a, quantization)
    except UserError as err:
        key = err.where if err.where and err.where.split(".")[0] in ("adapter", "quantization") else "adapter"
        raise UserError(err.message, where=where(key)) from None


def resolved_rank(a: AdapterSection) -> int:
    return a.r if a.r is not None else (256 if a.method == "vera" else 16)


ADALORA_DEFAULT_ALPHA = 8.0  # PEFT's AdaLoraConfig.lora_alpha (with init_r 12: scale 8 / 12)


def resolved_alpha(a: AdapterSection) -> float:
    if a.alpha is not None:
        return a.alpha
    return ADALORA_DEFAULT_ALPHA if a.method == "adalora" else float(resolved_rank(a))


def loftq_quantization(a: AdapterSection, quantization: QuantizationConfig | None) -> tuple[str, int]:
    """(quantizer, bits) of ``init: loftq``: ``adapter.loftq.quantizer`` / ``bits`` where given,
    else read from ``quantization.type`` (nf<k> -> ("nf", k), int<k> -> ("uniform", k)). LoftQ
    quantizes the base itself, so the two must name the same code book (the type of the layers
    outside ``loftq.mixed_4bit_layers``)."""
    qtype = quantization.type if quantization is not None else None
    match = re.fullmatch(r"(nf|int)(\d+)", qtype or "")
    if match is None:
        raise UserError(f"init: loftq quantizes with a NormalFloat (nf2, nf3, nf4) or uniform integer "
                        f"(int2, int4, ...) code book, got quantization.type {qtype!r}", where="quantization.type")
    quantizer = a.loftq.quantizer or ("nf" if match.group(1) == "nf" else "uniform")
    bits = a.loftq.bits or int(match.group(2))
    expected = f"{'nf' if quantizer == 'nf' else 'int'}{bits}"
    if quantizer in ("nf", "uniform") and expected != qtype:
        raise UserError(f"adapter.loftq (quantizer {quantizer}, {bits} bits) quantizes to {expected}, but "
                        f"quantization.type is {qtype}; make them agree (or leave adapter.loftq.bits and "
                        "quantizer out: they follow quantization.type)", where="quantization.type")
    return quantizer, bits
