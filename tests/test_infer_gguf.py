"""GGUF export: files written by ``loraforge merge --format gguf`` load in transformers' GGUF
loader (which undoes llama.cpp's Q/K permutation and rebuilds the tokenizer from the metadata)
and compute what the merged model computes with its weights stored in the file's type."""

from __future__ import annotations

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
    from transformers import GPT2Config

    from loraforge.errors import UserError
    from loraforge.infer.gguf_arch import gguf_layout

    with pytest.raises(UserError, match="does not support 'gpt2'"):
        gguf_layout(GPT2Config())


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
