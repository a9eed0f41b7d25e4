"""The lean decoding loop (``loraforge.infer.decode``; Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite,
OLMo 2, Gemma 2 / 3) against transformers' ``generate`` and a full forward without cache: the same greedy
tokens, logits equal to fp32 rounding at every step, the same seeded samples; left padding,
grouped-query heads, 4-bit bases and adapters; and the cases it must hand back to ``generate``."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers_infer import make_adapter

from loraforge.adapters import attach
from loraforge.infer.decode import KVCache, causal_lm, lean_base, lean_generate, step
from loraforge.infer.generate import GenerationSettings, generate_ids, left_pad
from loraforge.kernels import cpu_gemv

pytestmark = pytest.mark.usefixtures("quiet_single_thread")

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1,
              bos_token_id=2, pad_token_id=0)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 500.0}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # per-head q/k norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}),  # fused qkv, half the head turns
    "granite": ("GraniteConfig", "GraniteForCausalLM",  # multipliers on the embeddings, branches, scores, logits
                {"embedding_multiplier": 3.0, "residual_multiplier": 0.6, "attention_multiplier": 0.3,
                 "logits_scaling": 2.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),  # norms on the branch outputs, q / k normed whole
    # sandwich norms, (1 + w) norms, GeGLU, scaled embeddings, query_pre_attn_scalar, soft-capped logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 8, "query_pre_attn_scalar": 12, "attn_logit_softcapping": None,
                "final_logit_softcapping": 5.0, "sliding_window": 64}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # + per-head q / k norms, a RoPE base per layer type
                    {"head_dim": 8, "query_pre_attn_scalar": 12, "final_logit_softcapping": 5.0, "sliding_window": 64,
                     "layer_types": ["sliding_attention", "full_attention"]}),
}
PROMPTS = [[5, 9, 17, 33, 4, 70], [8, 3], [41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


def _model(model_type: str, base: str = "plain", **overrides):
    config_name, model_name, arch = ARCHS[model_type]
    config = getattr(transformers, config_name)(**{**COMMON, **arch, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that the logits differ visibly
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.1)
            if "norm" in name:
                p.add_(1.0)
    if base in ("nf4+lora", "nf4+dora"):
        from loraforge.quant.replace import quantize_model

        quantize_model(model, quant_type="nf4", compute_dtype=torch.float32)
        model = make_adapter(model, base.split("+")[1])
    elif base == "lora":  # a float32 base with an adapter: what chat / serve run by default
        model = make_adapter(model, "lora")
    return model


def _hf(model, prompts, settings):
    ids, mask = left_pad(prompts, 0)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings.hf_config([], 0))
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("model_type", list(ARCHS))
@pytest.mark.parametrize("base", ["plain", "lora", "nf4+lora", "nf4+dora"])
def test_greedy_tokens_equal_generate_batched_and_alone(model_type, base):
    model = _model(model_type, base)
    settings = GenerationSettings(max_new_tokens=12)
    ids, mask = left_pad(PROMPTS, 0)
    lean = lean_base(model, ids.shape[1] + 12)
    assert lean is not None  # the loop under test is the one that runs
    got = lean_generate(lean, ids, mask, settings.hf_config([], 0))
    assert torch.equal(got, _hf(model, PROMPTS, settings))
    for row, prompt in enumerate(PROMPTS):  # padding changes nothing
        alone = lean_generate(lean, *left_pad([prompt], 0), settings.hf_config([], 0))
        assert torch.equal(alone[0], got[row])
    assert len({tuple(r) for r in got.tolist()}) == len(PROMPTS)  # a non-degenerate run


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_step_logits_equal_a_full_forward_at_every_position(model_type):
    """Prefill, then one token at a time into the cache: each step's logits are those of a full
    forward over the whole (left-padded) sequence without cache, to fp32 rounding."""
    model = _model(model_type, "nf4+lora")
    seq = [[5, 9, 17, 33, 4, 70, 12, 13, 14, 15], [0, 0, 0, 0, 8, 3, 61, 62, 63, 64]]  # row 2: 4 pads
    ids = torch.tensor(seq)
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits.float()
    lean = lean_base(model, ids.shape[1])
    prompt = 6
    cache = KVCache(lean, 2, ids.shape[1], mask[:, :prompt].bool())
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        got = [step(lean, ids[:, :prompt], positions[:, :prompt], cache)]
        for t in range(prompt, ids.shape[1]):
            got.append(step(lean, ids[:, t:t + 1], positions[:, t:t + 1], cache))
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, prompt - 1 + i], rtol=1e-5, atol=1e-5)


def test_seeded_samples_equal_generate():
    model = _model("llama", "nf4+lora")
    settings = GenerationSettings(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    hf = _hf(model, PROMPTS, settings)
    torch.manual_seed(7)
    ids, mask = left_pad(PROMPTS, 0)
    got = lean_generate(lean_base(model, 64), ids, mask, settings.hf_config([], 0))
    assert torch.equal(got, hf)
    greedy = _hf(model, PROMPTS, GenerationSettings(max_new_tokens=10))
    assert not torch.equal(got, greedy)  # sampling drew something other than the argmax


def test_stops_pad_finished_rows_and_the_run_ends_when_all_stopped():
    model = _model("llama")
    greedy = generate_ids(model, PROMPTS, GenerationSettings(max_new_tokens=12), stop_ids=[], pad_id=0)
    stop = greedy[0][2]
    settings = GenerationSettings(max_new_tokens=12)
    ids, mask = left_pad(PROMPTS, 0)
    config = settings.hf_config([stop], 0)
    lean = lean_generate(lean_base(model, 64), ids, mask, config)
    hf = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    assert torch.equal(lean, hf)
    assert (lean == 0).any()  # a finished row was padded while another went on
    assert generate_ids(model, PROMPTS, settings, stop_ids=[stop], pad_id=0)[0] == greedy[0][:greedy[0].index(stop)]
    asked = []
    out = generate_ids(model, PROMPTS[:1], settings, stop_ids=[], pad_id=0,
                       should_stop=lambda: asked.append(1) or len(asked) == 3)
    assert out == [greedy[0][:3]]


def test_streamer_sees_the_prompt_then_each_token():
    model = _model("llama")
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.tolist())

        def end(self):
            seen.append("end")

    out = generate_ids(model, PROMPTS[:1], GenerationSettings(max_new_tokens=4), stop_ids=[], pad_id=0,
                       streamer=Streamer())
    assert seen == [[PROMPTS[0]], *[[t] for t in out[0]], "end"]


def test_what_the_lean_loop_hands_back_to_generate(monkeypatch):
    from loraforge.adapters.prefix import PrefixConfig

    assert lean_base(_model("llama"), 64) is not None
    # a sliding window shorter than the run
    assert lean_base(_model("mistral", sliding_window=8), 8) is not None
    assert lean_base(_model("mistral", sliding_window=8), 9) is None
    assert lean_base(_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), 9) is None
    assert lean_base(_model("phi3", sliding_window=8), 9) is None
    # prefix tuning feeds the layers through a forward hook
    prefixed = attach(_model("llama"), PrefixConfig(num_virtual_tokens=3))
    assert lean_base(prefixed, 64) is None
    # Gemma 2's capped attention scores (its default), a window shorter than the run, another architecture
    assert lean_base(_model("gemma2", attn_logit_softcapping=50.0), 64) is None
    assert lean_base(_model("gemma3_text", sliding_window=8), 9) is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=96)).eval()
    assert lean_base(gpt2, 64) is None
    # training mode, and the reference switch
    assert lean_base(_model("llama").train(), 64) is None
    monkeypatch.setenv("LORAFORGE_KERNELS", "reference")
    assert lean_base(_model("llama"), 64) is None


def test_bfloat16_model_decodes_as_generate():
    """A bfloat16 model (the GPU compute dtype) keeps its dtype through the cache; greedy tokens
    equal generate's."""
    model = _model("llama").to(torch.bfloat16)
    settings = GenerationSettings(max_new_tokens=8)
    ids, mask = left_pad(PROMPTS, 0)
    got = lean_generate(lean_base(model, 64), ids, mask, settings.hf_config([], 0))
    assert torch.equal(got, _hf(model, PROMPTS, settings))


@pytest.mark.skipif(cpu_gemv.library() is None, reason="no C compiler: the CPU kernels cannot be built")
@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # separate and fused q/k/v and gate/up
@pytest.mark.parametrize("base", ["plain", "lora"])
def test_float32_projections_and_head_are_read_by_the_small_row_kernel(model_type, base, monkeypatch):
    """Every float32 projection (plain, or an adapter layer's base) and the head of every step go
    through ``linear_f32_cpu``; the greedy tokens are ``generate``'s."""
    model = _model(model_type, base)
    calls = []
    real = cpu_gemv.linear_f32_cpu
    monkeypatch.setattr(cpu_gemv, "linear_f32_cpu", lambda x, w, b=None: calls.append(w.data_ptr()) or real(x, w, b))
    settings = GenerationSettings(max_new_tokens=5)
    ids, mask = left_pad(PROMPTS, 0)  # 3 x 10 prompt rows: the prefill is within the row limit too
    got = lean_generate(lean_base(model, ids.shape[1] + 5), ids, mask, settings.hf_config([], 0))
    per_layer = 4 if model_type == "phi3" else 7  # qkv, o, gate_up, down / q, k, v, o, gate, up, down
    assert len(calls) == 5 * (2 * per_layer + 1) and calls.count(causal_lm(model).lm_head.weight.data_ptr()) == 5
    assert torch.equal(got, _hf(model, PROMPTS, settings))


def test_an_adapter_at_init_leaves_the_decoded_logits_bit_identical():
    """A zero adapter (LoRA's B = 0) on a float32 base changes nothing, bit for bit: the loop
    computes the base products of plain and adapted projections the same way."""
    from loraforge.adapters import LoraConfig

    plain = _model("llama")
    adapted = attach(_model("llama"), LoraConfig(r=4, alpha=8, targets="all-linear"))
    ids, mask = left_pad(PROMPTS, 0)
    out = []
    for model in (plain, adapted):
        lean = lean_base(model, ids.shape[1] + 3)
        cache = KVCache(lean, len(PROMPTS), ids.shape[1] + 3, mask.bool())
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            out.append(step(lean, ids, positions, cache))
    assert torch.equal(out[0], out[1])
