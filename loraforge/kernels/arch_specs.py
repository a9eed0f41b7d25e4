"""What differs between the decoder families the fused kernels cover, as data: one
:class:`ArchSpec` per transformers ``model_type``. The fused forwards (``lora_attn``,
``lora_mlp``, ``rmsnorm``, the loss in ``patch``) read these fields instead of being copied per
model; each field names the transformers behaviour it reproduces.

- projections: ``qkv`` (``("q_proj", "k_proj", "v_proj")``, or Phi-3's fused ``("qkv_proj",)``
  split as ``[q | k | v]``) and ``gate_up`` (``("gate_proj", "up_proj")`` or Phi-3's
  ``("gate_up_proj",)`` split in halves ``[gate | up]``); biases on them are fine (Qwen2's q/k/v,
  Granite's ``mlp_bias``).
- ``qk_norm``: ``None``; ``"head"`` (Qwen3, Gemma 3: RMSNorm over each head's ``head_dim``
  after the projection) or ``"all"`` (OLMo 2: RMSNorm over the whole q / k projection).
- ``act_key``: the config attribute naming the MLP activation (``hidden_act``; Gemma's
  ``hidden_activation``); ``silu`` gives SwiGLU, ``gelu_pytorch_tanh`` GeGLU with tanh-GELU.
- ``norm``: the RMSNorm convention, ``"llama"`` (``w * n.to(x.dtype)``), ``"gemma"``
  (``(n * (1 + w)).to(x.dtype)``) or ``"olmo2"`` (``(w * n).to(x.dtype)``).
- ``sliding_window``: where the attention reads the window it passes to the attention function:
  ``"module"`` (``self.sliding_window``, per layer type: Qwen2/3, Gemma 2/3), ``"config"``
  (``config.sliding_window``: Mistral, Phi-3) or ``None`` (not passed).
- ``attn_softcap``: pass ``softcap=self.attn_logit_softcapping`` (Gemma 2).
- ``logit_softcap_key`` / ``logit_divisor_key``: config attributes of the head's
  ``cap * tanh(z / cap)`` (Gemma 2/3 ``final_logit_softcapping``) and ``z / d`` (Granite
  ``logits_scaling``).
- ``mlp_output_only_added``: the decoder layer only adds (a constant multiple of) the MLP
  output to its residual (not OLMo 2 / Gemma 2/3, whose post-feed-forward norm reads it), so a
  checkpoint re-run may skip the base ``down_proj`` (see ``lora_mlp``).
- ``norm_placement`` (read by the lean decoding loop, ``loraforge.infer.decode``): where the
  layer's RMSNorms sit, ``"pre"`` (``input_layernorm`` before attention,
  ``post_attention_layernorm`` before the MLP), ``"post"`` (OLMo 2: ``post_attention_layernorm``
  and ``post_feedforward_layernorm`` on the two branch outputs) or ``"sandwich"`` (Gemma 2/3: both,
  with ``pre_feedforward_layernorm`` before the MLP).
- ``rope_by_layer_type``: the rotary embedding takes the layer type (Gemma 3: sliding and full
  attention layers turn at different bases, ``rotary_emb(x, positions, layer_type)``).

What the decoder layer does around attention and MLP (post-norms, Granite's
``residual_multiplier`` and ``embedding_multiplier``, Gemma's scaled embeddings, Phi-3's residual
dropout) stays in transformers' own layer and model forwards, which call the fused modules.
"""

from __future__ import annotations

from dataclasses import dataclass

SEPARATE_QKV = ("q_proj", "k_proj", "v_proj")
SEPARATE_GATE_UP = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    qkv: tuple[str, ...] = SEPARATE_QKV
    gate_up: tuple[str, ...] = SEPARATE_GATE_UP
    qk_norm: str | None = None
    act_key: str = "hidden_act"
    norm: str = "llama"
    sliding_window: str | None = None
    attn_softcap: bool = False
    logit_softcap_key: str | None = None
    logit_divisor_key: str | None = None
    mlp_output_only_added: bool = True
    norm_placement: str = "pre"
    rope_by_layer_type: bool = False

    def logit_transforms(self, config) -> tuple[float, float | None]:
        """``(divisor, soft cap)`` of the head's logits under ``config`` (1.0 and None: none)."""
        divisor = getattr(config, self.logit_divisor_key) if self.logit_divisor_key else 1.0
        softcap = getattr(config, self.logit_softcap_key, None) if self.logit_softcap_key else None
        return divisor, softcap


SPECS: dict[str, ArchSpec] = {s.model_type: s for s in (
    ArchSpec("llama"),
    ArchSpec("mistral", sliding_window="config"),
    ArchSpec("qwen2", sliding_window="module"),
    ArchSpec("qwen3", qk_norm="head", sliding_window="module"),
    ArchSpec("gemma2", act_key="hidden_activation", norm="gemma", sliding_window="module", attn_softcap=True,
             logit_softcap_key="final_logit_softcapping", mlp_output_only_added=False, norm_placement="sandwich"),
    ArchSpec("gemma3_text", qk_norm="head", act_key="hidden_activation", norm="gemma", sliding_window="module",
             logit_softcap_key="final_logit_softcapping", mlp_output_only_added=False, norm_placement="sandwich",
             rope_by_layer_type=True),
    ArchSpec("phi3", qkv=("qkv_proj",), gate_up=("gate_up_proj",), sliding_window="config"),
    ArchSpec("olmo2", qk_norm="all", norm="olmo2", mlp_output_only_added=False, norm_placement="post"),
    ArchSpec("granite", logit_divisor_key="logits_scaling"),
)}

# activation names (transformers' ACT2FN keys) -> the gated activation the fused MLP computes
GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def spec_for(model_type: str | None) -> ArchSpec | None:
    return SPECS.get(model_type)
