"""A lean decoding loop for the Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, OLMo 2,
Gemma 2 and 3): the same modules, fewer operations around them.

At batch 1 a decoding step of a small model on a CPU spends more time in the framework around
the layers than in the layers' arithmetic: transformers' ``generate`` rebuilds masks, cache
positions and keyword plumbing every step, grows its cache with ``torch.cat`` and runs each
attention through a dispatch layer. This loop computes the same decoder with the model's own
modules (embeddings, projections, whatever adapter layers sit in them, the MLP, the rotary
embedding, the head; transformers' plain float32 RMSNorms as one fused ``F.rms_norm``) and only
the arithmetic between them written out:

    h <- h + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = input_layernorm(h)
    h <- h + mlp(post_attention_layernorm(h))

with ``attn = softmax(q k^T * head_dim^-1/2 + mask) v`` (grouped-query heads share their key and
value head), keys and values written in place into a preallocated cache of the run's full length
(prompt + ``max_new_tokens``), and the head applied to the last position only. What differs
between the families is read off their :class:`~loraforge.kernels.arch_specs.ArchSpec`: Qwen3's
``q`` and ``k`` first pass the per-head RMSNorms ``q_norm`` / ``k_norm`` (``qk_norm == "head"``);
Phi-3's fused ``qkv_proj`` is split ``[q | k | v]`` and its RoPE turns only the first
``partial_rotary_factor`` of each head (as wide as the rotary tables); the sliding window is read
where transformers reads it (``sliding_window``). Granite scales the embeddings by
``embedding_multiplier``, each branch before its residual add by ``residual_multiplier`` and the
logits by ``1 / logits_scaling`` (its attention's ``scaling`` is ``attention_multiplier``). OLMo 2
normalises the whole ``q`` and ``k`` projections (``qk_norm == "all"``) and its layers norm each
branch's output instead of its input (``norm_placement == "post"``):

    h <- h + post_attention_layernorm(o_proj(attn(h))),  h <- h + post_feedforward_layernorm(mlp(h))

Gemma 2 and 3 norm both (``"sandwich"``: ``input_layernorm`` before attention,
``pre_feedforward_layernorm`` before the MLP), scale their embeddings inside their embedding
module, soft-cap the logits (``cap * tanh(z / cap)``) and attend with ``scaling =
query_pre_attn_scalar^-1/2``; Gemma 3's sliding and full layers each take their own RoPE tables.
Gemma 2's capped attention scores (``attn_logit_softcapping``, on by default) are not what a fused
attention computes, so such a model goes through ``generate``.
Left padding works as in :mod:`loraforge.infer.generate`: positions are ``cumsum(mask) - 1`` and
padded keys are masked. The token choice is transformers' own: the same ``GenerationConfig``, the
same logits processors built from it (temperature, top-k, top-p), argmax or one
``torch.multinomial`` draw per step, finished rows padded with ``pad_id``; so greedy tokens equal
``generate``'s and the logits agree to floating-point rounding (tested, with and without adapters).

The products of float32 ``nn.Linear`` weights -- plain projections, an adapter layer's base (its
adapters then added by :meth:`~loraforge.adapters.base.AdapterLayer.add_adapters`) and the head
-- go through :func:`~loraforge.kernels.cpu_gemv.small_linear` at a step's few rows (one read of
each weight instead of MKL's slower small-row GEMM), so the gated MLP is written out here too
(``down(act(gate(x)) * up(x))``, transformers' order); 4-bit bases run their own kernel inside
their module. A hooked or patched MLP runs its own forward.

A model that is anything else (another architecture, a sliding window shorter than the run,
forward hooks such as prefix tuning's, a patched attention or layer forward) goes through
``generate``; ``LORAFORGE_KERNELS=reference`` forces that path too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loraforge.adapters.base import AdapterLayer
from loraforge.kernels.arch_specs import spec_for
from loraforge.kernels.cpu_gemv import small_linear
from loraforge.kernels.dispatch import unhooked

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "gemma2", "gemma3_text")
PLAIN_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
                  "Olmo2RMSNorm")


def causal_lm(model):
    """The transformers model inside ``model`` (an AdapterModel unwrapped)."""
    from loraforge.adapters.model import AdapterModel

    return model.model if isinstance(model, AdapterModel) else model


def lean_base(model, total_length: int):
    """The transformers causal LM to decode leanly (an AdapterModel unwrapped), or None when the
    lean loop would not compute exactly what ``model.generate`` computes."""
    from loraforge.kernels.dispatch import mode

    if mode() == "reference":
        return None
    base = causal_lm(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in LEAN_MODEL_TYPES or base.training:
        return None
    decoder = getattr(base, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(base, "lm_head") or not hasattr(decoder, "rotary_emb"):
        return None
    bypassed = [base, decoder, *layers, *(layer.self_attn for layer in layers)]
    if not unhooked(*bypassed):
        return None
    spec = spec_for(config.model_type)
    if spec.attn_softcap and getattr(config, "attn_logit_softcapping", None) is not None:
        return None  # Gemma 2's capped attention scores: no fused attention computes them
    if getattr(config, "use_bidirectional_attention", False):
        return None
    where = spec.sliding_window  # where transformers reads the window
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers] if where == "module" else []
    if where == "config":
        windows.append(getattr(config, "sliding_window", None))
    if any(w is not None and total_length > w for w in windows):
        return None
    return base


class KVCache:
    """Keys and values of every layer, ``(batch, kv_heads, length, head_dim)`` each, filled in
    place (allocated at a layer's first write, in the dtype its projections produce); ``valid[b,
    j]`` says whether column ``j`` holds a real (not padding) token."""

    def __init__(self, base, batch: int, length: int, valid_prompt: torch.Tensor):
        self.shape = (batch, base.config.num_key_value_heads, length, base.model.layers[0].self_attn.head_dim)
        self.keys: list[torch.Tensor | None] = [None] * len(base.model.layers)
        self.values: list[torch.Tensor | None] = [None] * len(base.model.layers)
        self.valid = torch.ones((batch, length), dtype=torch.bool, device=valid_prompt.device)
        self.valid[:, :valid_prompt.shape[1]] = valid_prompt
        self.padded = not bool(valid_prompt.all())
        self.filled = 0

    def layer(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[i] is None:
            self.keys[i] = like.new_empty(self.shape)
            self.values[i] = like.new_empty(self.shape)
        return self.keys[i], self.values[i]


def rope_tables(decoder, h: torch.Tensor, positions: torch.Tensor, *layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and a signed ``sin`` (``[-sin_1 | sin_2]`` over the two halves of ``head_dim``),
    (batch, 1, width, head_dim) each, from the model's own rotary embedding (Gemma 3: the one
    of ``layer_type``)."""
    cos, sin = decoder.rotary_emb(h, positions, *layer_type)
    half = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, out: torch.Tensor | None = None):
    """RoPE as transformers applies it, ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) =
    [-x_2 | x_1]``, written as ``x * cos + roll(x) * [-sin_1 | sin_2]`` (the same products: a
    negation is exact), optionally into ``out``. Tables narrower than ``x`` (partial rotary) turn
    its first ``cos.shape[-1]`` values and pass the rest through."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return torch.add(x * cos, torch.roll(x, d // 2, -1) * signed_sin, out=out)
    if out is None:
        return torch.cat((rotate(x[..., :d], cos, signed_sin), x[..., d:]), dim=-1)
    rotate(x[..., :d], cos, signed_sin, out=out[..., :d])
    out[..., d:] = x[..., d:]
    return out


def norm(module, h: torch.Tensor) -> torch.Tensor:
    """``module(h)`` for an RMSNorm; transformers' own Llama-family RMSNorm in float32 as one
    fused ``F.rms_norm`` (``w * h * rsqrt(mean(h^2) + eps)``, the same formula in one pass)."""
    if (h.dtype == torch.float32 and type(module).__name__ in PLAIN_RMSNORMS and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks):
        return F.rms_norm(h, module.weight.shape, module.weight, module.variance_epsilon)
    return module(h)


def attention_mask(cache: KVCache, width: int, end: int) -> torch.Tensor | None:
    """The boolean mask for ``width`` new queries ending at cache column ``end`` (None when there is
    no padding: plain causal). A padding query sees itself, so that no row is all masked."""
    if not cache.padded:
        return None
    keys = cache.valid[:, None, None, :end]
    if width == 1:
        return keys
    rows = torch.arange(end - width, end, device=keys.device)[:, None]
    cols = torch.arange(end, device=keys.device)[None, :]
    return (keys & (cols <= rows)) | (cols == rows)


def step(base, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run ``ids`` (batch, width) at ``positions`` through the decoder, appending their keys and
    values to ``cache``; the float32 logits of the last position, (batch, vocab)."""
    decoder, config = base.model, base.config
    spec = spec_for(config.model_type)
    batch, width = ids.shape
    start, end = cache.filled, cache.filled + width
    h = decoder.embed_tokens(ids)  # Gemma's embedding module scales by sqrt(hidden_size) itself
    embedding_multiplier = getattr(config, "embedding_multiplier", None)  # Granite
    if embedding_multiplier is not None:
        h = h * embedding_multiplier
    branch = _branch_scale(getattr(config, "residual_multiplier", None))  # Granite
    if spec.rope_by_layer_type:
        tables = {kind: rope_tables(decoder, h, positions, kind) for kind in set(config.layer_types)}
        rope = [tables[kind] for kind in config.layer_types]
    else:
        rope = [rope_tables(decoder, h, positions)] * len(decoder.layers)
    mask = attention_mask(cache, width, end)
    causal = mask is None and width > 1
    fused_qkv = spec.qkv == ("qkv_proj",)
    head_dim = decoder.layers[0].self_attn.head_dim
    widths = [config.num_attention_heads * head_dim, *[config.num_key_value_heads * head_dim] * 2]
    for i, layer in enumerate(decoder.layers):
        attn, (cos, sin) = layer.self_attn, rope[i]
        n = h if spec.norm_placement == "post" else norm(layer.input_layernorm, h)
        if fused_qkv:
            q, k, v = project(attn.qkv_proj, n).split(widths, dim=-1)
        else:
            q, k, v = project(attn.q_proj, n), project(attn.k_proj, n), project(attn.v_proj, n)
        if spec.qk_norm == "all":
            q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
        q, k, v = (t.view(batch, width, -1, head_dim) for t in (q, k, v))
        if spec.qk_norm == "head":
            q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        keys, values = cache.layer(i, k)
        rotate(k, cos, sin, out=keys[:, :, start:end])
        values[:, :, start:end] = v
        o = F.scaled_dot_product_attention(rotate(q, cos, sin), keys[:, :, :end], values[:, :, :end],
                                           attn_mask=mask, is_causal=causal, scale=attn.scaling,
                                           enable_gqa=keys.shape[1] != q.shape[1])
        o = project(attn.o_proj, o.transpose(1, 2).reshape(batch, width, -1))
        if spec.norm_placement == "pre":
            h = h + branch(o)
            h = h + branch(mlp(layer.mlp, norm(layer.post_attention_layernorm, h)))
        else:  # the branch outputs are normed (and, in the sandwich, the MLP's input too)
            h = h + norm(layer.post_attention_layernorm, o)
            m = norm(layer.pre_feedforward_layernorm, h) if spec.norm_placement == "sandwich" else h
            h = h + norm(layer.post_feedforward_layernorm, mlp(layer.mlp, m))
    cache.filled = end
    logits = small_linear(base.lm_head, norm(decoder.norm, h[:, -1:]))[:, -1]  # a float32 head: one read of it
    divisor, softcap = spec.logit_transforms(config)  # Granite's logits_scaling, Gemma's final soft cap
    if divisor != 1.0:
        logits = logits / divisor
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def project(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a projection, the product of a float32 ``nn.Linear`` (plain, or the base of
    an unhooked adapter layer) at a step's few rows through :func:`small_linear` (one read of the
    weight; a 4-bit base runs its own kernel)."""
    if isinstance(module, AdapterLayer) and unhooked(module):
        return module.add_adapters(x, small_linear(module.base_layer, x))
    return small_linear(module, x)


def mlp(module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP ``down(act(gate(x)) * up(x))`` (Phi-3: ``[gate | up] = gate_up(x)``) as
    transformers computes it, its projections through :func:`project`; an MLP of another shape,
    or a hooked or patched one, through its own forward."""
    act = getattr(module, "act_fn", None) or getattr(module, "activation_fn", None)  # Phi-3's name
    down = getattr(module, "down_proj", None)
    if act is None or down is None or not unhooked(module):
        return module(x)
    if hasattr(module, "gate_up_proj"):
        gate, up = project(module.gate_up_proj, x).chunk(2, dim=-1)
    elif hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
        gate, up = project(module.gate_proj, x), project(module.up_proj, x)
    else:
        return module(x)
    return project(down, act(gate) * up)


def _branch_scale(multiplier: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a branch's output is multiplied by before its residual add (Granite: ``t * m``)."""
    if multiplier is None:
        return lambda t: t
    return lambda t: t * multiplier


@torch.no_grad()
def lean_generate(base, ids: torch.Tensor, mask: torch.Tensor, generation_config, *, streamer=None,
                  should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """New tokens (batch, <= max_new_tokens) for left-padded ``ids`` / ``mask``, chosen as
    ``generate`` chooses them under ``generation_config``."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    gc = generation_config
    processors = LogitsProcessorList()
    if gc.do_sample:  # transformers' order; each only when it changes something
        if gc.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(gc.temperature))
        if gc.top_k:
            processors.append(TopKLogitsWarper(top_k=gc.top_k, min_tokens_to_keep=1))
        if gc.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=gc.top_p, min_tokens_to_keep=1))
    stop = torch.tensor(list(gc.eos_token_id or []), dtype=torch.long, device=ids.device)
    batch, width = ids.shape
    cache = KVCache(base, batch, width + gc.max_new_tokens, mask.bool())
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    if streamer is not None:
        streamer.put(ids.cpu())
    tokens = []
    logits = step(base, ids, positions, cache)
    for n in range(gc.max_new_tokens):
        scores = processors(ids, logits)  # none of them reads the ids
        if gc.do_sample:
            token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(scores, dim=-1)
        token = torch.where(unfinished, token, gc.pad_token_id)
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if stop.numel():
            unfinished &= ~torch.isin(token, stop)
        if n + 1 == gc.max_new_tokens or not bool(unfinished.any()) or (should_stop is not None and should_stop()):
            break
        positions = positions[:, -1:] + 1
        logits = step(base, token[:, None], positions, cache)
    if streamer is not None:
        streamer.end()
    return torch.stack(tokens, dim=1)
