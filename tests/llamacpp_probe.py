"""Runs inside the llama.cpp venv (``make .venv-llamacpp``: llama-cpp-python, numpy, no torch):
the llama.cpp side of ``test_infer_gguf_llamacpp.py``. Not a test module; the tests call it as

    python llamacpp_probe.py REQUEST.json

REQUEST ``{"op": "run", "gguf": PATH, "prompts": [[ids]...], "new_tokens": N, "text": STR,
"out": PATH.npz}`` loads the file in llama.cpp (CPU, one thread, float32 KV cache so the cache
adds no rounding), evaluates each prompt, and greedily extends it by N tokens (argmax of the
logits after each step). The .npz holds ``logits_k`` (every position of prompt k and of its
continuation but the last token, float32) and ``tokens_k`` (the N greedy tokens); stdout gets a JSON line with the
architecture llama.cpp read, its vocabulary size and ``text`` tokenized by llama.cpp's tokenizer.

REQUEST ``{"op": "quantize", "src": PATH, "dst": PATH, "ftype": NAME}`` runs llama.cpp's own
``llama_model_quantize`` (what the ``llama-quantize`` tool calls) with its default parameters.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0


def run(request: dict) -> dict:
    llm = llama_cpp.Llama(request["gguf"], n_ctx=256, n_batch=256, n_threads=1, n_threads_batch=1,
                          logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=True)
    arrays = {}
    for k, prompt in enumerate(request["prompts"]):
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for i in range(request["new_tokens"]):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if i + 1 < request["new_tokens"]:
                llm.eval([tokens[-1]])
        arrays[f"logits_{k}"] = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        arrays[f"tokens_{k}"] = np.array(tokens, dtype=np.int64)
    np.savez(request["out"], **arrays)
    text = request.get("text")
    return {
        "arch": llm.metadata.get("general.architecture"),
        "n_vocab": llm.n_vocab(),
        "chat_template": llm.metadata.get("tokenizer.chat_template"),
        "text_ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else None,
    }


def quantize(request: dict) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{request['ftype'].upper()}")
    params.nthread = 1
    status = llama_cpp.llama_model_quantize(request["src"].encode(), request["dst"].encode(), ctypes.byref(params))
    return {"status": int(status)}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        req = json.load(f)
    print(json.dumps({"run": run, "quantize": quantize}[req["op"]](req)))
