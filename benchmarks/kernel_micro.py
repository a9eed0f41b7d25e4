"""Kernel micro-benchmarks on Llama-3-8B shapes (H=4096, I=14336, V=128256): loraforge's Triton
kernels against bitsandbytes (where installed) and PyTorch eager, medians of
``triton.testing.do_bench``; a side-by-side table per kernel.

- NF4 dequantization (double-quantized scales) to bf16: ms and GB/s moved (packed codes + scales
  read, bf16 written), next to bitsandbytes' ``dequantize_4bit`` and a device copy of the bf16
  weight (the bandwidth ceiling, read + write).
- 4-bit gemv (batch 1, 4, 16): ms and effective weight-stream GB/s, next to bitsandbytes'
  ``matmul_4bit`` (its gemv at batch 1) and a bf16 ``F.linear``.
- RMSNorm, SwiGLU and RoPE forward + backward against eager PyTorch; chunked linear +
  cross-entropy against full logits + ``F.cross_entropy`` (time and peak memory).

On a machine without CUDA it says so and, with ``--cpu-smoke``, runs each kernel's dispatch path
(the PyTorch references) once on tiny shapes to check that the script works; those timings
mean nothing and are not printed as results.

    python benchmarks/kernel_micro.py                    # on a CUDA machine
    python benchmarks/kernel_micro.py --only dequant,gemv
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

WEIGHTS = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _quantized(out_f, in_f, device):
    from loraforge.kernels.dequant import packed_from_layer
    from loraforge.quant.linear import QuantLinear

    lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(lin, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    return lin.weight.detach(), layer, packed_from_layer(layer)


def _bnb(weight):
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:
        return None
    return bnb_f, *bnb_f.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")


def bench_dequant():
    from loraforge.kernels.dequant import dequantize_4bit

    print("\n| weight out x in | loraforge ms (GB/s) | bitsandbytes ms (GB/s) | bf16 copy ms (GB/s) |")
    print("|---|---|---|---|")
    for out_f, in_f in WEIGHTS:
        w16, layer, packed = _quantized(out_f, in_f, "cuda")
        n = out_f * in_f
        moved = n / 2 + n / 64 + n * 2  # codes + uint8 scales read, bf16 written
        buf = torch.empty(out_f, in_f, dtype=torch.bfloat16, device="cuda")
        ours = _bench(lambda: dequantize_4bit(packed, torch.bfloat16, out=buf))
        assert torch.equal(buf, layer.dequantize(torch.bfloat16))
        copy = _bench(lambda: buf.copy_(w16))
        cells = [f"{ours:.4f} ({moved / ours / 1e6:,.0f})"]
        bnb = _bnb(w16)
        if bnb:
            f, q, state = bnb
            t = _bench(lambda: f.dequantize_4bit(q, state))
            cells.append(f"{t:.4f} ({moved / t / 1e6:,.0f})")
        else:
            cells.append("not installed")
        cells.append(f"{copy:.4f} ({4 * n / copy / 1e6:,.0f})")
        print(f"| {out_f} x {in_f} | " + " | ".join(cells) + " |")


def bench_gemv():
    from loraforge.kernels.gemv4bit import gemv_4bit

    print("\n| weight out x in | rows | loraforge ms (weight GB/s) | bitsandbytes ms | bf16 F.linear ms |")
    print("|---|---|---|---|---|")
    for out_f, in_f in WEIGHTS:
        w16, layer, packed = _quantized(out_f, in_f, "cuda")
        weight_bytes = out_f * in_f * (0.5 + 1 / 64)
        bnb = _bnb(w16)
        for rows in (1, 4, 16):
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ layer.dequantize(torch.float32).t()
            err = ((gemv_4bit(x, packed).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, err
            ours = _bench(lambda: gemv_4bit(x, packed))
            cell = "not installed"
            if bnb:
                import bitsandbytes as bnb_mod

                f, q, state = bnb
                cell = f"{_bench(lambda: bnb_mod.matmul_4bit(x, q.t(), quant_state=state)):.4f}"
            dense = _bench(lambda: F.linear(x, w16))
            print(f"| {out_f} x {in_f} | {rows} | {ours:.4f} ({weight_bytes / ours / 1e6:,.0f}) | {cell} | {dense:.4f} |")


def bench_elementwise(tokens=8192, H=4096, I=14336, heads=32, head_dim=128):
    from loraforge.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
    from loraforge.kernels.rope import RoPEFunction, rope_reference
    from loraforge.kernels.swiglu import SwiGLUFunction, swiglu_reference

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, H, device=dev, dtype=dt, requires_grad=True)
    w = torch.ones(H, device=dev, dtype=dt)
    g = torch.randn(tokens, I, device=dev, dtype=dt, requires_grad=True)
    u = torch.randn(tokens, I, device=dev, dtype=dt, requires_grad=True)
    q = torch.randn(1, heads, tokens, head_dim, device=dev, dtype=dt, requires_grad=True)
    cos = torch.randn(1, tokens, head_dim, device=dev, dtype=dt)
    sin = torch.randn(1, tokens, head_dim, device=dev, dtype=dt)
    cases = {
        "RMSNorm": (lambda: RMSNormFunction.apply(x, w, 1e-5), lambda: rmsnorm_reference(x, w, 1e-5)),
        "SwiGLU": (lambda: SwiGLUFunction.apply(g, u), lambda: swiglu_reference(g, u)),
        "RoPE (q)": (lambda: RoPEFunction.apply(q, cos, sin), lambda: rope_reference(q, cos, sin)),
    }
    print(f"\n| op ({tokens} tokens, bf16) | loraforge fwd+bwd ms | eager fwd+bwd ms |")
    print("|---|---|---|")
    for name, (ours, eager) in cases.items():
        def step(fn):
            out = fn()
            out.backward(torch.ones_like(out))
        print(f"| {name} | {_bench(lambda: step(ours)):.3f} | {_bench(lambda: step(eager)):.3f} |")


def bench_cross_entropy(tokens=8192, H=4096, V=128256):
    from loraforge.kernels.cross_entropy import cross_entropy_reference, linear_cross_entropy

    dev, dt = "cuda", torch.bfloat16
    h = torch.randn(tokens, H, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(V, H, device=dev, dtype=dt) * 0.02
    labels = torch.randint(0, V, (tokens,), device=dev)
    half = labels.clone()
    half[: tokens // 2] = -100
    print(f"\n| cross-entropy ({tokens} tokens, V={V}, bf16) | ms fwd+bwd | peak GiB over inputs |")
    print("|---|---|---|")
    for name, fn, lab in [("loraforge chunked", linear_cross_entropy, labels),
                          ("loraforge chunked, half ignored", linear_cross_entropy, half),
                          ("full logits + F.cross_entropy", cross_entropy_reference, labels)]:
        def step():
            fn(h, w, lab).backward()
        ms = _bench(step)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        print(f"| {name} | {ms:.2f} | {(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} |")


def cpu_smoke():
    """Run every dispatch path once on tiny CPU shapes (correctness of the script, not speed)."""
    from loraforge.kernels.cross_entropy import linear_cross_entropy
    from loraforge.kernels.dequant import dequantize_4bit
    from loraforge.kernels.gemv4bit import gemv_4bit
    from loraforge.kernels.rmsnorm import rmsnorm
    from loraforge.kernels.swiglu import swiglu

    _, layer, packed = _quantized(64, 128, "cpu")
    assert torch.equal(dequantize_4bit(packed, torch.float32), layer.dequantize(torch.float32))
    x = torch.randn(2, 128)
    assert torch.allclose(gemv_4bit(x, packed), x @ layer.dequantize(torch.float32).t(), atol=1e-4)
    rmsnorm(x, torch.ones(128), 1e-5)
    swiglu(x, x)
    linear_cross_entropy(x, torch.randn(50, 128), torch.tensor([1, -100]))
    print("CPU smoke run of the reference paths: ok (no timings: they would not describe the kernels)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="dequant,gemv,elementwise,cross_entropy")
    ap.add_argument("--cpu-smoke", action="store_true", help="without CUDA: run the reference paths on tiny shapes")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_micro.py measures Triton kernels on a CUDA GPU; this machine has none.")
        if a.cpu_smoke:
            cpu_smoke()
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    for name in a.only.split(","):
        {"dequant": bench_dequant, "gemv": bench_gemv, "elementwise": bench_elementwise,
         "cross_entropy": bench_cross_entropy}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
