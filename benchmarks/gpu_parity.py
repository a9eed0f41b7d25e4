"""The CUDA cases of the kernel tests: every Triton kernel compiled for the GPU against its PyTorch
reference on the same CUDA tensors, forward and backward, plus a whole 4-bit Llama with a LoRA
adapter under ``apply_kernels`` against the same model on the references (``LORAFORGE_KERNELS=
reference``). The unit tests run these kernels only in Triton's interpreter on CPU; this is the
first place they meet a real compiler and device. One table, one row per case: the relative error
(``||a - b|| / ||b||``), its bound and PASS/FAIL; exit status 1 when any case fails.

    python benchmarks/gpu_parity.py            # needs a CUDA device
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS: list[tuple[str, float, float]] = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    ROWS.append((name, rel(ours, ref), bound))


def fwd_bwd(fn, *inputs):
    """(output, input gradients) of ``fn`` under a fixed random output gradient."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    g = torch.Generator(device=out.device).manual_seed(1)
    out.backward(torch.randn(out.shape, device=out.device, generator=g, dtype=out.dtype))
    return out.detach(), [x.grad for x in xs]


def case_quant(dev):
    from loraforge.kernels.dequant import dequantize_4bit_reference, dequantize_4bit_triton, packed_from_layer
    from loraforge.kernels.gemv4bit import gemv_4bit_reference, gemv_4bit_triton
    from loraforge.quant.linear import QuantLinear

    for double in (True, False):
        for out_f, in_f in [(4096, 4096), (14336, 4096), (1000, 1088)]:
            lin = torch.nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.bfloat16)
            layer = QuantLinear.from_linear(lin, "nf4", blocksize=64, double_quant=double,
                                            compute_dtype=torch.bfloat16)
            w = packed_from_layer(layer)
            tag = f"{out_f}x{in_f}{' dq' if double else ''}"
            for dt in (torch.float32, torch.bfloat16):  # the same bits: one float32 product, one cast
                ours, ref = dequantize_4bit_triton(w, dt), dequantize_4bit_reference(w, dt)
                ROWS.append((f"dequant nf4 {tag} {str(dt).removeprefix('torch.')} (bit-exact)",
                             0.0 if torch.equal(ours, ref) else max(rel(ours, ref), 1e-30), 0.0))
            for rows in (1, 4, 16):
                x = torch.randn(rows, in_f, device=dev, dtype=torch.bfloat16)
                check(f"gemv 4-bit {tag} M={rows} bf16", gemv_4bit_triton(x, w), gemv_4bit_reference(x, w), 1e-2)
            x = torch.randn(3, in_f, device=dev)
            check(f"gemv 4-bit {tag} M=3 fp32", gemv_4bit_triton(x, w), gemv_4bit_reference(x, w), 1e-5)


def case_elementwise(dev):
    from loraforge.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
    from loraforge.kernels.rope import RoPEFunction, rope_reference
    from loraforge.kernels.swiglu import SwiGLUFunction, swiglu_reference

    for dt, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        name = str(dt).removeprefix("torch.")
        x = torch.randn(4096, 4096, device=dev, dtype=dt)
        w = torch.randn(4096, device=dev, dtype=dt)
        (y1, g1), (y2, g2) = (fwd_bwd(lambda a, b: f(a, b, 1e-5), x, w)
                              for f in (RMSNormFunction.apply, rmsnorm_reference))
        check(f"RMSNorm fwd {name}", y1, y2, bound)
        check(f"RMSNorm dx {name}", g1[0], g2[0], bound)
        check(f"RMSNorm dw {name}", g1[1], g2[1], bound)
        g, u = torch.randn(2, 2048, 14336, device=dev, dtype=dt).unbind(0)
        (y1, d1), (y2, d2) = (fwd_bwd(f, g, u) for f in (SwiGLUFunction.apply, swiglu_reference))
        check(f"SwiGLU fwd {name}", y1, y2, bound)
        check(f"SwiGLU dg, du {name}", torch.cat(d1), torch.cat(d2), bound)
        q = torch.randn(2, 32, 1024, 128, device=dev, dtype=dt)
        pos = torch.arange(1024, device=dev, dtype=torch.float32)[:, None] / 10000 ** (
            torch.arange(0, 128, 2, device=dev) / 128)
        emb = torch.cat([pos, pos], -1)[None].expand(2, -1, -1)
        cos, sin = emb.cos().to(dt), emb.sin().to(dt)
        (y1, d1), (y2, d2) = (fwd_bwd(lambda a: f(a, cos, sin), q) for f in (RoPEFunction.apply, rope_reference))
        check(f"RoPE fwd {name}", y1, y2, bound)
        check(f"RoPE dx {name}", d1[0], d2[0], bound)


def case_cross_entropy(dev):
    from loraforge.kernels.cross_entropy import cross_entropy_reference, linear_cross_entropy

    for dt, bound in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        name = str(dt).removeprefix("torch.")
        h = torch.randn(2048, 4096, device=dev, dtype=dt)
        w = torch.randn(128256, 4096, device=dev, dtype=dt) * 0.02
        labels = torch.randint(0, 128256, (2048,), device=dev)
        labels[::3] = -100
        for fn_name, fn in (("ours", linear_cross_entropy), ("ref", cross_entropy_reference)):
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss = fn(hh, ww, labels)
            loss.backward()
            if fn_name == "ours":
                ours = (loss.detach(), hh.grad, ww.grad)
            else:
                ref = (loss.detach(), hh.grad, ww.grad)
        check(f"linear cross-entropy loss {name}", ours[0], ref[0], bound)
        check(f"linear cross-entropy dh {name}", ours[1], ref[1], bound)
        check(f"linear cross-entropy dW {name}", ours[2], ref[2], bound)


def case_model(dev):
    """The patched model (fused LoRA blocks over NF4, norms, RoPE, chunked loss) vs references."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraforge.adapters import attach
    from loraforge.adapters.lora import LoraConfig
    from loraforge.kernels import apply_kernels
    from loraforge.quant.replace import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    quantize_model(model, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    model = attach(model, LoraConfig(r=16, alpha=16, dropout=0.0, targets="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    apply_kernels(model)
    ids = torch.randint(0, 32000, (2, 512), device=dev)
    results = {}
    for mode in ("auto", "reference"):
        os.environ["LORAFORGE_KERNELS"] = mode
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results[mode] = (loss.detach().float(), grads)
    os.environ.pop("LORAFORGE_KERNELS")
    check("4-bit Llama + LoRA, kernels vs reference: loss", results["auto"][0], results["reference"][0], 1e-2)
    check("4-bit Llama + LoRA, kernels vs reference: LoRA grads", results["auto"][1], results["reference"][1], 5e-2)


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/gpu_parity.py needs a CUDA device; this machine has none.")
        return 0
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for case in (case_quant, case_elementwise, case_cross_entropy, case_model):
        try:
            case(dev)
        except Exception as exc:  # one broken kernel must not hide the others
            ROWS.append((f"{case.__name__}: {type(exc).__name__}: {str(exc)[:120]}", float("inf"), 0.0))
        torch.cuda.empty_cache()
    print("\n| CUDA case | rel. error | bound | |")
    print("|---|---|---|---|")
    failed = 0
    for name, err, bound in ROWS:
        ok = err <= bound
        failed += not ok
        print(f"| {name} | {err:.2e} | {bound:.0e} | {'PASS' if ok else 'FAIL'} |")
    print(f"\n{len(ROWS) - failed}/{len(ROWS)} CUDA cases pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
