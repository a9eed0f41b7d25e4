"""GGUF export fidelity in llama.cpp: for each exportable architecture and storage type, how far
llama.cpp's logits on our file are from transformers' on the same weights (rounded through the
storage type), and whether our Q8_0 / Q4_0 tensors are byte-identical to llama.cpp's own quantizer
run on our F32 file. Tiny random 2-layer models over the byte-level BPE test tokenizer; llama.cpp
runs in its own venv (see tests/helpers_gguf.py). Accuracy, not speed: nothing here is timed. For gpt2 the
q8_0/q4_0 reference rounds Conv1D weights along their stored [in, out] rows, not the file's, so its
error column overstates llama.cpp's (the byte comparison with llama-quantize is exact).

    .venv/bin/python benchmarks/gguf_llamacpp.py [--archs llama,qwen2] [--types f32,q4_0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TEXT = "hello world, the quick brown fox jumps over the lazy dog"


def main() -> None:
    from gguf import GGUFReader
    from helpers_gguf import ARCH_OVERRIDES, arch_model, llamacpp, llamacpp_python
    from helpers_infer import bpe_tokenizer
    from test_infer_gguf import _stored_like

    from loraforge.infer.export_gguf import write_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default=",".join(ARCH_OVERRIDES))
    parser.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0")
    args = parser.parse_args()
    if llamacpp_python() is None:
        sys.exit("llama-cpp-python not found: make .venv-llamacpp (or set LORAFORGE_LLAMACPP_PYTHON)")
    tok = bpe_tokenizer()
    prompt = tok.encode(TEXT)
    print(f"{'arch':<12} {'type':<5} {'max|dlogit|':>11} {'rel err':>9} {'argmax':>7} {'= llama-quantize':>17}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for arch in args.archs.split(","):
            model = arch_model(arch, tok)
            source = write_gguf(copy.deepcopy(model), tok, tmp / f"{arch}-f32.gguf", "f32")
            for kind in args.types.split(","):
                path = write_gguf(copy.deepcopy(model), tok, tmp / f"{arch}-{kind}.gguf", kind)
                with torch.no_grad():
                    want = _stored_like(copy.deepcopy(model), kind)(input_ids=torch.tensor([prompt])).logits[0].numpy()
                try:
                    got = llamacpp({"op": "run", "gguf": str(path), "prompts": [prompt], "new_tokens": 1},
                                   tmp)["arrays"]["logits_0"]
                    diff = np.abs(got - want).max()
                    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
                    agree = (got.argmax(-1) == want.argmax(-1)).mean()
                    run = f"{diff:>11.2e} {rel:>9.2e} {agree:>7.0%}"
                except AssertionError as err:
                    run = f"{'failed: ' + ('illegal instruction' if 'illegal' in str(err) else 'see log'):>29}"
                same = "-"
                if kind in ("q8_0", "q4_0"):
                    theirs = tmp / f"{arch}-{kind}-llama.gguf"
                    llamacpp({"op": "quantize", "src": str(source), "dst": str(theirs), "ftype": kind}, tmp)
                    a = {t.name: t for t in GGUFReader(path).tensors}
                    b = {t.name: t for t in GGUFReader(theirs).tensors}
                    same = "yes" if a.keys() == b.keys() and all(
                        a[n].tensor_type == b[n].tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))
                        for n in a) else "NO"
                print(f"{arch:<12} {kind:<5} {run} {same:>17}", flush=True)


if __name__ == "__main__":
    main()
