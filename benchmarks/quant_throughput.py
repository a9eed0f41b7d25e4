"""Quantize / dequantize throughput of loraforge's blockwise 4-bit code beside bitsandbytes', on the
same tensors in the same run, plus bits per parameter.

    .venv/bin/python benchmarks/quant_throughput.py [--sizes 1024x1024 4096x4096] [--repeats 5]

Quantize = blockwise absmax + NF4 codes + packing + double quantization of the scales (bnb:
``quantize_4bit(compress_statistics=True)``); dequantize = packed codes -> dense weight in the
input dtype (bnb: ``dequantize_4bit``). Throughput in millions of parameters per second and in
GB/s of the dense tensor read (quantize) or written (dequantize). Runs on CPU, and on CUDA too
when available (loraforge's pure-PyTorch path there; the Triton kernels are separate).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from loraforge.quant import QuantLinear
from loraforge.quant.blockwise import pack_4bit, quantize_blockwise, zero_code
from loraforge.quant.codebooks import NF4
from loraforge.quant.double_quant import compress_absmax


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_quantize(w: torch.Tensor):
    code = NF4.to(w.device)
    codes, absmax = quantize_blockwise(w, code, 64)
    return pack_4bit(codes, zero_code(code)), compress_absmax(absmax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "4096x4096"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        bnbF = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, NF4, block 64, double quantization")
    header = f"{'device':6} {'shape':>10} {'dtype':>8} {'op':>10} | {'loraforge ms':>12} {'Mparam/s':>9} {'GB/s':>6} | {'bnb ms':>8} {'Mparam/s':>9} {'GB/s':>6} | {'speed-up':>8}"
    print(header)
    print("-" * len(header))
    for device in devices:
        for size in args.sizes:
            rows, cols = map(int, size.split("x"))
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                torch.manual_seed(0)
                w = torch.randn(rows, cols, device=device).to(dtype)
                n, dense_bytes = w.numel(), w.numel() * w.element_size()
                layer = QuantLinear.from_linear(nn.Linear(cols, rows, bias=False, device=device, dtype=dtype))
                ops = {
                    "quantize": (lambda: ours_quantize(w), None),
                    "dequantize": (lambda: layer.dequantize(dtype), None),
                }
                if bnbF is not None:
                    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                    ops["quantize"] = (ops["quantize"][0], lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
                    ops["dequantize"] = (ops["dequantize"][0], lambda: bnbF.dequantize_4bit(packed, state))
                for op, (mine, theirs) in ops.items():
                    t_ours = timed(mine, args.repeats, device)
                    line = f"{device:6} {size:>10} {dtype_name:>8} {op:>10} | {t_ours * 1e3:12.2f} {n / t_ours / 1e6:9.1f} {dense_bytes / t_ours / 1e9:6.2f} |"
                    if theirs is not None:
                        t_bnb = timed(theirs, args.repeats, device)
                        line += f" {t_bnb * 1e3:8.2f} {n / t_bnb / 1e6:9.1f} {dense_bytes / t_bnb / 1e9:6.2f} | {t_bnb / t_ours:7.2f}x"
                    print(line)
    print()
    linear = nn.Linear(4096, 4096, bias=False)
    for dq in (False, True):
        bits = QuantLinear.from_linear(linear, "nf4", 64, dq).bits_per_parameter()
        print(f"bits per parameter, 4096x4096 NF4 block 64, double quant {dq!s:5}: {bits:.4f}")
    for name in ("nf3", "nf2"):
        bits = QuantLinear.from_linear(linear, name, 64, True).bits_per_parameter()
        print(f"bits per parameter, 4096x4096 {name.upper()} block 64, double quant True : {bits:.4f}")


if __name__ == "__main__":
    main()
