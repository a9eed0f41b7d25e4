"""GGUF files, read once through transformers' GGUF loader and cached as a model folder.

transformers dequantizes every GGUF tensor to float32 in Python (about 20 s for the 98 MB
SmolLM2-135M Q4_1 file on 2 cores) and builds the tokenizer from the GGUF metadata (about 5 s).
The result is written to ``<cache>/gguf/<sha256 of the file>/`` as an ordinary Hugging Face
folder: ``model.safetensors`` (float32, tied tensors stored once, so ``tie_word_embeddings``
re-ties them on load), ``config.json`` (without the ``gguf`` quantization entry),
``generation_config.json``, the fast tokenizer (``tokenizer.json`` + its config + chat template)
and ``source.json`` (what it was made from). Later loads read that folder: a few seconds; an
entry whose weights fail the safetensors check (a damaged cache) is converted again.
The conversion shows its steps (tokenizer, tensors, writing) with a live bar when stderr is a
terminal.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

from loraforge.errors import UserError
from loraforge.models.cache import atomic_directory, cache_root, file_digest
from loraforge.models.quiet import quiet_transformers
from loraforge.models.validate import check_gguf, check_safetensors
from loraforge.progress import progress

_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")


def gguf_cache_entry(path: Path) -> Path:
    """Where the converted form of the GGUF file ``path`` lives (it may not exist yet)."""
    return cache_root() / "gguf" / file_digest(path)


def cached_gguf_folder(path: Path) -> Path:
    """The cached model folder for the GGUF file ``path``, converting it on first use."""
    entry = gguf_cache_entry(path)
    if _complete(entry):
        return entry
    check_gguf(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(entry.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise UserError(
            "the model cache is not writable; set LORAFORGE_CACHE to a writable folder", where=str(entry.parent)
        )
    again = " again (the cached copy was damaged)" if entry.exists() else " (first load only)"
    print(f"loraforge: converting {path.name} to safetensors{again}", file=sys.stderr)
    with atomic_directory(entry, overwrite=entry.exists()) as tmp:
        convert_gguf(path, tmp)
        (tmp / "source.json").write_text(
            json.dumps({"gguf": str(path.resolve()), "sha256": entry.name}, indent=1) + "\n", encoding="utf-8"
        )
    return entry


def _complete(entry: Path) -> bool:
    """The cache entry holds every file and its weights pass the safetensors check (a cache
    damaged on disk is converted again rather than reported as the user's file)."""
    if not all((entry / name).is_file() for name in _REQUIRED):
        return False
    try:
        check_safetensors(entry / "model.safetensors")
    except (UserError, OSError):
        return False
    return True


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantize the GGUF file ``path`` with transformers and save it as a model folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress("reading the tokenizer", 3, unit="steps") as advance:
        with quiet_transformers(capture_stderr=True):
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            advance(1, description="dequantizing the tensors")
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        advance(1, description="writing safetensors")
        _save_folder(model, tokenizer, out)
        advance(1)


def _save_folder(model, tokenizer, out: Path) -> None:
    """The converted model as a Hugging Face folder (tied tensors stored once)."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    del config.quantization_config  # the weights below are plain float32, no longer GGUF
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): stored once
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

