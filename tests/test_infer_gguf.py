"""GGUF export: files written by ``loraforge merge --format gguf`` load in transformers' GGUF
loader (which undoes llama.cpp's Q/K permutation and rebuilds the tokenizer from the metadata)
and compute what the merged model computes with its weights stored in the file's type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_infer import bpe_tokenizer, logits, make_adapter, save_base, tiny_model

from loraforge.cli import main


def _stored_like(model, gguf_type: str):
    """``model`` with every 2-D weight rounded through the GGUF storage type (norms stay f32;
    under q4_0 the output head is Q8_0, llama-quantize's type for it at these widths)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    head = model.get_output_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 2 or gguf_type == "f32":
                continue
            w = p.detach().float().numpy()
            if gguf_type == "f16":
                r = w.astype(np.float16).astype(np.float32)
            else:
                qtype = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q8_0 if p is head else Q.Q4_0}[gguf_type]
                r = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(r)))
    return model


def _load_gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32), None


def _load_gguf(path):
    from transformers import AutoTokenizer

    return _load_gguf_model(path)[0], AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_gguf_matches_merged_model(tmp_path, gguf_type):
    tok = bpe_tokenizer()
    base = save_base(tiny_model(tok, tie_word_embeddings=gguf_type == "f16"), tok, tmp_path / "base")
    from loraforge.models import load_model

    model, _ = load_model(base, compute_dtype=torch.float32)
    am = make_adapter(model, "lora")
    am.save_pretrained(tmp_path / "adapter")
    merged = am.merge_and_unload()
    text = "hello world, the quick brown fox jumps over the lazy dog"
    ids = torch.tensor([tok.encode(text)])
    out = tmp_path / "out"
    assert main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--format", "gguf", "--gguf-type", gguf_type]) == 0
    assert (out / "Modelfile").read_text() == "FROM ./model.gguf\n"
    loaded, loaded_tok = _load_gguf(out / "model.gguf")
    assert loaded.config.tie_word_embeddings == (gguf_type == "f16")
    want = logits(_stored_like(merged, gguf_type), ids)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=2e-5)
    # the tokenizer metadata rebuilds the same tokenizer, chat template included
    assert loaded_tok.encode(text) == ids[0].tolist()
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.eos_token == tok.eos_token


def test_qk_permutation_is_llama_cpp_layout():
    """Row j*2+p of a permuted head is row p*d/2+j of transformers' (rotate_half halves)."""
    from loraforge.infer.export_gguf import permute_qk

    heads, d = 2, 6
    w = np.arange(heads * d * 3, dtype=np.float32).reshape(heads * d, 3)
    out = permute_qk(w, heads)
    for h in range(heads):
        for j in range(d // 2):
            for p in range(2):
                np.testing.assert_array_equal(out[h * d + 2 * j + p], w[h * d + p * d // 2 + j])


def test_gguf_refuses_other_architectures():
    from transformers import FalconConfig

    from loraforge.errors import UserError
    from loraforge.infer.gguf_arch import gguf_layout

    with pytest.raises(UserError, match="does not support 'falcon'"):
        gguf_layout(FalconConfig())


def test_tokenizer_metadata_copied_from_a_gguf_source(tmp_path):
    """Exporting from a GGUF source copies its tokenizer.* keys verbatim (types included)."""
    from gguf import GGUFReader

    from loraforge.infer.export_gguf import write_gguf

    tok = bpe_tokenizer()
    first = write_gguf(tiny_model(tok), tok, tmp_path / "a.gguf", "f32")
    second = write_gguf(tiny_model(tok, seed=1), bpe_tokenizer(chat_template=False), tmp_path / "b.gguf", "f16",
                        source_gguf=first)
    a, b = GGUFReader(first), GGUFReader(second)
    keys = sorted(k for k in a.fields if k.startswith("tokenizer."))
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.merges" in keys
    assert keys == sorted(k for k in b.fields if k.startswith("tokenizer."))
    for key in keys:
        assert b.fields[key].types == a.fields[key].types
        assert b.fields[key].contents() == a.fields[key].contents()


@pytest.mark.slow
def test_smollm2_gguf_train_merge_gguf_round_trip(tmp_path, smollm2_gguf):
    """The shipped GGUF -> LoRA, two optimizer steps -> merged -> GGUF (tokenizer metadata copied
    from the source file) -> transformers' GGUF loader: same logits as the merged model."""
    from loraforge.adapters import LoraConfig, attach
    from loraforge.infer.export_gguf import write_gguf
    from loraforge.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    base_q = model.model.layers[3].self_attn.q_proj.weight.detach().clone()
    am = attach(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    opt = torch.optim.SGD([p for _, p in am.trainable_parameters()], lr=0.5)
    batch = torch.tensor([tok.encode("The capital of France is Paris.")])
    for _ in range(2):
        am(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = am.merge_and_unload()
    out = write_gguf(merged, tok, tmp_path / "smol.gguf", "f16", source_gguf=smollm2_gguf)
    loaded, _ = _load_gguf_model(out)
    ids = torch.tensor([tok.encode("What is the capital of France?")])
    want = logits(_stored_like(merged, "f16"), ids)
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=2e-3)
    q = loaded.model.layers[3].self_attn.q_proj.weight
    torch.testing.assert_close(q, merged.model.layers[3].self_attn.q_proj.weight, rtol=0, atol=0)
    assert (q - base_q).abs().max() > 1e-3  # the trained adapter is in the file


# --- every exportable architecture -------------------------------------------------------------

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "phi3", "gemma", "gemma2", "gemma3_text",
         "stablelm", "phi", "gpt_neox", "gpt2"]
# (GGUF tensor, HF key) of one norm weight where the first block's input norm is named otherwise
NORMS = {"olmo2": ("blk.0.post_attention_norm.weight", "model.layers.0.post_attention_layernorm.weight"),
         "gpt2": ("blk.0.attn_norm.weight", "transformer.h.0.ln_1.weight"),
         "gpt_neox": ("blk.0.attn_norm.weight", "gpt_neox.layers.0.input_layernorm.weight")}


@pytest.mark.parametrize("model_type", ARCHS)
def test_architecture_layout(tmp_path, model_type):
    """llama.cpp's architecture name, only tensor names its architecture lists, the metadata its
    loader reads, Gemma norms stored as 1 + w, Q/K permuted exactly for the interleaved-rope ones."""
    import gguf
    from gguf import GGUFReader
    from helpers_gguf import arch_model

    from loraforge.infer.export_gguf import write_gguf
    from loraforge.infer.gguf_arch import ARCHITECTURES

    tok = bpe_tokenizer()
    model = arch_model(model_type, tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reader = GGUFReader(write_gguf(model, tok, tmp_path / "m.gguf", "f32"))
    arch = ARCHITECTURES[model_type].arch
    assert reader.fields["general.architecture"].contents() == arch
    enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[enum]}
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        assert base.replace(".0.", ".{bid}.").replace(".1.", ".{bid}.") in allowed, name
    cfg = model.config
    assert reader.fields[f"{arch}.block_count"].contents() == cfg.num_hidden_layers
    assert reader.fields[f"{arch}.attention.key_length"].contents() == 16
    assert reader.fields[f"{arch}.attention.head_count_kv"].contents() == (4 if model_type.startswith("gpt") else 2)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    norm, hf_norm = NORMS.get(model_type, ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"))
    shift = np.float32(1.0 if model_type.startswith("gemma") else 0.0)
    np.testing.assert_array_equal(tensors[norm], state[hf_norm].numpy() + shift)
    if model_type in ("llama", "mistral", "granite"):
        from loraforge.infer.export_gguf import permute_qk

        np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"],
                                      permute_qk(state["model.layers.0.self_attn.k_proj.weight"].numpy(), 2))
    elif model_type == "phi3":
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"],
                                      state["model.layers.0.self_attn.qkv_proj.weight"].numpy())
        assert reader.fields["phi3.rope.dimension_count"].contents() == 8  # partial_rotary_factor 0.5
    elif model_type == "qwen2":
        np.testing.assert_array_equal(tensors["blk.1.attn_q.bias"], state["model.layers.1.self_attn.q_proj.bias"].numpy())
    elif model_type == "gpt2":  # Conv1D [in, out] -> GGUF's [out, in]; the tied head written as output
        np.testing.assert_array_equal(tensors["blk.1.ffn_up.weight"], state["transformer.h.1.mlp.c_fc.weight"].numpy().T)
        np.testing.assert_array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    elif model_type == "gpt_neox":  # per head (q, k, v) rows -> q | k | v
        qkv = state["gpt_neox.layers.0.attention.query_key_value.weight"].numpy().reshape(4, 3, 16, 64)
        np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"][64:128], qkv[:, 1].reshape(64, 64))
    elif model_type == "granite":
        assert reader.fields["granite.logit_scale"].contents() == pytest.approx(2.0)
    assert ("output.weight" in tensors) == (not cfg.tie_word_embeddings or model_type == "gpt2")


# transformers' GGUF loader reads these back (it lacks olmo2, granite and gemma, and ignores qwen3's
# head_dim); for phi3 and gemma2/3 it drops hyper-parameters llama.cpp reads (partial rope,
# soft-capping, query_pre_attn_scalar), so there the tensors are compared, not the logits.
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3_text"])
def test_transformers_reads_back_each_architecture(tmp_path, model_type):
    from helpers_gguf import arch_model

    from loraforge.infer.export_gguf import write_gguf

    tok = bpe_tokenizer()
    model = arch_model(model_type, tok)
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    loaded, _ = _load_gguf_model(path)
    theirs = loaded.state_dict()
    assert set(ours) <= set(theirs)
    for key, value in ours.items():  # gemma norms: (w + 1) - 1 in float32, hence the tolerance
        torch.testing.assert_close(theirs[key], value, rtol=0, atol=1e-7, msg=key)
    if model_type in ("llama", "mistral", "qwen2"):
        ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_q4_0_blocks_follow_llama_cpp_reference():
    """One Q4_0 block by hand, as ``quantize_row_q4_0_ref``: d = (signed max-magnitude value) / -8
    as f16, codes min(15, trunc(x / d + 8.5)), byte j = code[j] | code[j + 16] << 4."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from loraforge.infer.export_gguf import _encode

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 64)).astype(np.float32)
    x[1, 40] = -9.0  # a negative extreme: d > 0
    data, raw = _encode(x, "q4_0")
    assert raw == Q.Q4_0 and data.shape == (2, 2 * 18)
    for row in range(2):
        for b in range(2):
            block = x[row, 32 * b: 32 * b + 32]
            amax = block[np.argmax(np.abs(block))]
            d = np.float32(amax / np.float32(-8))
            inv = np.float32(1) / d
            codes = np.minimum(15, np.trunc(block * inv + np.float32(8.5))).astype(np.uint8)
            want = np.concatenate([np.frombuffer(np.float16(d).tobytes(), np.uint8),
                                   codes[:16] | (codes[16:] << 4)])
            np.testing.assert_array_equal(data[row, 18 * b: 18 * b + 18], want)
    np.testing.assert_array_equal(data, quantize(x, Q.Q4_0))


def test_gguf_refusals_come_before_the_load(tmp_path, monkeypatch):
    """Unsupported architectures, settings llama.cpp cannot express and tokenizers it cannot
    name are refused from config.json and the tokenizer alone: nothing is loaded or merged."""
    from helpers_gguf import arch_model
    from helpers_models import save_folder
    from transformers import FalconConfig, FalconForCausalLM

    import loraforge.infer.merge as merge

    monkeypatch.setattr(merge, "merge_adapter", lambda *a, **k: pytest.fail("loaded before refusing"))
    tok = bpe_tokenizer()
    cases = {
        "falcon": (save_base(FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                            vocab_size=len(tok))), tok, tmp_path / "falcon"),
                   "does not support 'falcon'"),
        "scale": (save_base(arch_model("gemma2", tok), tok, tmp_path / "gemma2"), None),
        "words": (save_folder(tiny_model(bpe_tokenizer()), tmp_path / "words"), "pre-tokenizer|byte-level BPE"),
    }
    config = json.loads((tmp_path / "gemma2" / "config.json").read_text())
    config["query_pre_attn_scalar"] = 32
    (tmp_path / "gemma2" / "config.json").write_text(json.dumps(config))
    cases["scale"] = (tmp_path / "gemma2", "query_pre_attn_scalar")
    for name, (folder, message) in cases.items():
        code = main(["merge", str(folder), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / f"{name}.gguf"),
                     "--format", "gguf"])
        assert code == 2, name
    from loraforge.errors import UserError
    from loraforge.infer.export_gguf import check_exportable_source

    for name, (folder, message) in cases.items():
        with pytest.raises(UserError, match=message):
            check_exportable_source(folder)


def test_pre_tokenizer_names_llama_cpp_knows():
    """The split rule of a byte-level BPE tokenizer -> llama.cpp's tokenizer.ggml.pre name."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from loraforge.errors import UserError
    from loraforge.infer.gguf_tokenizer import _LLAMA3, _QWEN2, check_tokenizer

    def tokenizer(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    split = lambda pattern: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    assert check_tokenizer(tokenizer(pre_tokenizers.ByteLevel())) == "gpt-2"
    assert check_tokenizer(tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                               pre_tokenizers.ByteLevel()]))) == "smollm"
    assert check_tokenizer(tokenizer(split(_LLAMA3))) == "llama-bpe"
    assert check_tokenizer(tokenizer(split(_QWEN2))) == "qwen2"
    with pytest.raises(UserError, match="no pre-tokenizer"):
        check_tokenizer(tokenizer(split(r"\s+")))
