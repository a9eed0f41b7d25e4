"""Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv:2101.00190).

Every attention layer l gets ``P = num_virtual_tokens`` trainable key and value vectors that sit
in front of the sequence's own keys and values; the model stays frozen. With ``K_l, V_l`` the
sequence's keys and values (RoPE applied) and ``P_k^l, P_v^l`` the prefix (no RoPE: a prefix has
no position)::

    head_l(x) = softmax(Q_l [P_k^l; K_l]^T / sqrt(d) + M) [P_v^l; V_l]

where the mask M lets every token see the whole prefix. The prefix of all layers is one matrix
P_theta of shape [P, 2 * L * d_kv] (d_kv = key/value heads x head size, so grouped-query
attention gets prefixes of its key/value heads only): row i holds, per layer l, key 2l and value
2l + 1. Li & Liang found optimising P_theta directly unstable and reparameterise it through an
MLP from a smaller matrix P'_theta [P, d_kv] (``projection: true``)::

    P_theta[i, :] = W_2 tanh(W_1 P'_theta[i, :] + b_1) + b_2,   W_1: h x d_kv, W_2: (2 L d_kv) x h

with h = ``projection_hidden`` (default d_kv). After training only P_theta is kept: the saved
folder holds it with the projection folded away, as PEFT saves it.

Implementation, as PEFT's PREFIX_TUNING (peft_model.py, ``get_prompt`` and
``PeftModelForCausalLM.forward``): the prefix enters as the attention cache the model already
reads, so no layer is replaced. Before every forward of the model (a pre-hook, see
:meth:`PrefixEncoder.prepare_inputs`):

- ``cache``: none given (training, evaluation, generation without a cache) -> a read-only cache
  holding the prefix (each layer returns [prefix; new] and keeps nothing, so recomputing a layer
  for gradient checkpointing sees the same state, and the decoder layers are told to keep the
  cache when checkpointing); an empty one (the start of ``generate``) -> a
  ``DynamicCache`` holding the prefix, which generation then extends; a non-empty one -> already
  begins with the prefix (a decoding step);
- ``attention_mask``: P ones in front of a 2-D mask; P visible (0 / True) columns in front of a
  4-D mask, so every document of a packed row sees the prefix;
- ``position_ids``: + P, as PEFT does, so token t has RoPE position P + t and a packed document
  computes what it would alone (without position ids the model counts from the cache's length,
  P, the same).

Initialisation (``prefix_init``): ``random``, PEFT's: P_theta (or P'_theta) ~ N(0, 1)
(``nn.Embedding``), the MLP as ``nn.Linear``; ``words``, Li & Liang's advice (sec. 7.4: real
words beat random): P_theta is the frozen model's own keys and values of P vocabulary tokens
drawn at random (positions 0..P-1), so the prefixed model starts exactly as the model prompted
with those tokens (no projection: the MLP's output cannot be set to given activations). There is
no merge rule: the prefix is attention state, not a weight change.

On disk (PEFT's format, both ways): ``adapter_config.json`` with ``peft_type: "PREFIX_TUNING"``,
``task_type: "CAUSAL_LM"``, ``num_virtual_tokens``, ``token_dim`` (d_kv), ``num_attention_heads``
(key/value heads), ``num_layers``, ``encoder_hidden_size`` (h), ``prefix_projection``,
``num_transformer_submodules: 1``, ``inference_mode: true``; ``adapter_model.safetensors`` holds
``prompt_embeddings`` [P, 2 L d_kv] (P_theta, the projection applied). A loaded folder holds
P_theta directly (``folded``), whatever ``prefix_projection`` says.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraforge.adapters.base import AdapterConfig, Method, register
from loraforge.errors import UserError, check_choice

NO_MERGE = ("prefix tuning cannot be merged: its prefix is extra key/value attention state in every layer, not a "
            "change of any weight; load the adapter with the base at run time instead (e.g. loraforge generate "
            "MODEL --adapter DIR)")
INITS = ("random", "words")
PLACEMENT_KEYS = ("targets", "exclude", "layers_to_transform", "layers_pattern", "modules_to_save")


@dataclass(kw_only=True)
class PrefixConfig(AdapterConfig):
    """``num_layers``, ``token_dim`` and ``num_attention_heads`` are the model's (layers, key/value
    width d_kv, key/value heads), filled in when the adapter is attached; a loaded folder's must
    match the model. ``folded``: P_theta is held directly (a loaded folder)."""

    method = "prefix"
    targets: str | list[str] | None = None
    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden: int | None = None  # None: d_kv (PEFT's encoder_hidden_size default)
    prefix_init: str = "random"  # random (PEFT's N(0, 1)) | words (activations of real tokens)
    folded: bool = False
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None

    def validate(self) -> None:
        where = "prefix config"
        if isinstance(self.targets, str) and self.targets.lower() == "all-linear":
            self.targets = None
        self.modules_to_save = list(self.modules_to_save or [])
        for key in PLACEMENT_KEYS:
            if getattr(self, key) not in (None, []):
                raise UserError(f"prefix tuning adds key/value prefixes to every attention layer and wraps no module; "
                                f"{key} does not apply", where=f"{where}: {key}")
        for key in ("num_virtual_tokens", "projection_hidden", "num_layers", "token_dim", "num_attention_heads"):
            value = getattr(self, key)
            positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
            if not positive and (value is not None or key == "num_virtual_tokens"):
                raise UserError(f"{key} must be a positive integer, got {value!r}", where=f"{where}: {key}")
        check_choice(self.prefix_init, INITS, "prefix init", where=f"{where}: init")
        if self.prefix_init == "words" and self.projection:
            raise UserError("init: words sets P_theta to real tokens' keys and values; the projection's output "
                            "cannot be set so: use projection: false with it", where=f"{where}: init")
        if self.projection_hidden is not None and not self.projection:
            raise UserError("projection_hidden sizes the reparameterisation MLP; set projection: true too",
                            where=f"{where}: projection_hidden")

    def to_peft(self, target_modules: str | list[str]) -> dict[str, Any]:
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": self.num_virtual_tokens,
                "token_dim": self.token_dim, "num_attention_heads": self.num_attention_heads,
                "num_layers": self.num_layers, "encoder_hidden_size": self.projection_hidden or self.token_dim,
                "prefix_projection": self.projection, "num_transformer_submodules": 1, "init_weights": None,
                "modules_to_save": None, "inference_mode": True}

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> PrefixConfig:
        task = data.get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise UserError(f"task_type {task!r} is not supported (loraforge loads causal LM prefixes)",
                            where=f"{where}: task_type")
        if data.get("num_transformer_submodules") not in (None, 1):
            raise UserError("num_transformer_submodules must be 1 (a decoder-only model)",
                            where=f"{where}: num_transformer_submodules")
        if data.get("modules_to_save"):
            raise UserError("modules_to_save is not supported with prefix tuning by loraforge",
                            where=f"{where}: modules_to_save")
        projection = bool(data.get("prefix_projection", False))
        hidden = data.get("encoder_hidden_size") if projection else None
        return cls(num_virtual_tokens=data.get("num_virtual_tokens"), projection=projection,
                   projection_hidden=hidden, folded=True, num_layers=data.get("num_layers"),
                   token_dim=data.get("token_dim"), num_attention_heads=data.get("num_attention_heads"))


@torch.no_grad()
def prefix_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of ``model``'s attention, read off the cache of a
    one-token forward: what the layers really store (grouped-query attention: the key/value heads,
    as PEFT's ``_prepare_prompt_learning_config`` reads them from the config; multi-query Falcon,
    whose config PEFT misreads, too)."""
    device = next(model.parameters()).device
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    out = model(input_ids=one, attention_mask=one, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise UserError(f"prefix tuning needs a decoder whose every layer caches keys and values; "
                        f"{type(model).__name__} does not", where="prefix config")
    shapes = {(layer.keys.shape[1], layer.keys.shape[3]) for layer in layers}
    if len(shapes) > 1:
        raise UserError(f"the model's layers cache keys of different shapes ({sorted(shapes)}); one prefix "
                        "shape for all layers is supported", where="prefix config")
    heads, head_dim = shapes.pop()
    return len(layers), heads, head_dim


class PrefixEncoder(nn.Module):
    """P_theta of one adapter (or P'_theta and its MLP) and the hook that feeds it to the model."""

    def __init__(self, config: PrefixConfig, model: nn.Module):
        super().__init__()
        layers, kv_heads, head_dim = prefix_shape(model)
        for key, value in (("num_layers", layers), ("token_dim", kv_heads * head_dim),
                           ("num_attention_heads", kv_heads)):
            saved = getattr(config, key)
            if saved is not None and saved != value:
                raise UserError(f"the prefix was made for a model with {key} = {saved}; this model has {value}",
                                where=f"prefix config: {key}")
            setattr(config, key, value)
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.tokens = config.num_virtual_tokens
        self.model_dtype = getattr(model, "dtype", None)
        self.disabled = False
        keep_cache_when_checkpointing(model)
        device = next(model.parameters()).device
        width = 2 * layers * kv_heads * head_dim
        if config.projection and not config.folded:
            hidden = config.projection_hidden or config.token_dim
            self.embedding = nn.Embedding(self.tokens, config.token_dim, device=device)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, hidden, device=device), nn.Tanh(),
                                           nn.Linear(hidden, width, device=device))
        else:
            self.embedding = nn.Embedding(self.tokens, width, device=device)
            self.transform = None
        self.init_ids: list[int] = []  # the tokens of init: words
        if config.prefix_init == "words" and not config.folded:
            self.init_ids, activations = word_activations(model, self.tokens)
            with torch.no_grad():
                self.embedding.weight.copy_(activations)

    def prompt_embeddings(self) -> torch.Tensor:
        """P_theta [P, 2 L d_kv] (the projection applied)."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def key_values(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, key/value heads, P, head size], in the model's dtype."""
        prefix = self.prompt_embeddings()
        if self.model_dtype is not None:
            prefix = prefix.to(self.model_dtype)
        prefix = prefix.view(self.tokens, 2 * self.layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        prefix = prefix.unsqueeze(1).expand(-1, batch, -1, -1, -1)
        return [(prefix[2 * layer], prefix[2 * layer + 1]) for layer in range(self.layers)]

    def prepare_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The model's forward arguments with the prefix in the cache and the mask and positions
        extended (see the module docstring)."""
        from transformers import DynamicCache

        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch = tokens.shape[0]
        cache = kwargs.pop("past_key_values", None)
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else cache
        if cache is None:
            cache = prefix_cache(self.key_values(batch))
        elif cache.get_seq_length() == 0:
            cache = DynamicCache(ddp_cache_data=self.key_values(batch))
        kwargs["cache"] = cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.tokens), mask], dim=1)
        elif mask is not None and mask.ndim == 4:
            visible = torch.ones if mask.dtype == torch.bool else torch.zeros
            front = visible((*mask.shape[:3], self.tokens), dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([front, mask], dim=-1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.tokens
        return args, kwargs

    def peft_tensors(self, config: PrefixConfig) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings()}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        if self.transform is not None:
            raise UserError("a saved prefix holds P_theta with the projection folded away; it loads into a prefix "
                            "without a projection (load_adapter does this)", where=where)
        value = tensors["prompt_embeddings"]
        expected = tuple(self.embedding.weight.shape)
        if tuple(value.shape) != expected:
            raise UserError(f"shape {tuple(value.shape)} does not match the model's {expected}",
                            where=f"{where}: prompt_embeddings")
        self.embedding.weight.copy_(value)


@torch.no_grad()
def word_activations(model: nn.Module, tokens: int) -> tuple[list[int], torch.Tensor]:
    """(ids, P_theta): ``tokens`` vocabulary ids drawn with torch's generator and the model's keys
    and values of them as one sequence, in P_theta's layout [P, 2 L d_kv] (float32)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    device = next(model.parameters()).device
    ids = torch.randint(config.vocab_size, (1, tokens)).to(device)
    cache = model(input_ids=ids, use_cache=True).cache
    stacked = torch.stack([t for layer in cache.layers for t in (layer.keys[0], layer.values[0])])
    return ids[0].tolist(), stacked.permute(2, 0, 1, 3).reshape(tokens, -1).float()


def keep_cache_when_checkpointing(model: nn.Module) -> None:
    """Let ``model``'s decoder layers keep the cache under transformers' gradient checkpointing
    (which otherwise drops it, and the prefix with it). Safe for the prefix: the cache of a
    training forward is read-only, so a layer recomputed in backward reads the same state."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


@functools.cache
def _prefix_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's prefix; ``update`` returns [prefix; new] and keeps nothing (read-only)."""

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixLayer


def prefix_cache(key_values: list[tuple[torch.Tensor, torch.Tensor]]):
    """A read-only cache holding the prefix: each layer returns [prefix; new] and keeps nothing."""
    from transformers.cache_utils import Cache, DynamicLayer

    layers = []
    for keys, values in key_values:
        layer = _prefix_layer_class()()
        DynamicLayer.update(layer, keys, values)  # store the prefix
        layers.append(layer)
    return Cache(layers=layers)


register(Method(name="prefix", peft_type="PREFIX_TUNING", config_cls=PrefixConfig, layer_cls=None,
                make_encoder=PrefixEncoder, merge_refusal=NO_MERGE))
