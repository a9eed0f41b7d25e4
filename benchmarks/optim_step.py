"""Optimizer step time and state memory: torch AdamW vs loraforge AdamW8bit vs bitsandbytes AdamW8bit.

Same parameters, same gradients, one process. The parameters are the LoRA adapters (r = 16, every
linear layer) of SmolLM2-135M on CPU and of Llama-3-8B on CUDA, or ``--shape full`` for one
4096 x 4096 matrix. Steps are interleaved across the arms (round-robin) and the median is
reported, so load from other processes hits every arm alike. The last column is the largest
parameter difference from torch AdamW after all steps, to show that every arm did the same work.

    python benchmarks/optim_step.py [--steps 20] [--device cpu|cuda] [--shape lora|full]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loraforge.optim import build_optimizer, optimizer_state_bytes

# (in, out) of each linear layer in one decoder layer, and the number of layers
MODELS = {
    "SmolLM2-135M": ([(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)], 30),
    "Llama-3-8B": ([(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)], 32),
}


def lora_shapes(model: str, r: int = 16) -> list[tuple[int, int]]:
    layer, n = MODELS[model]
    return [shape for _ in range(n) for i, o in layer for shape in ((r, i), (o, r))]


def make_arms(device: str) -> dict:
    arms = {
        "torch AdamW" + (" (fused)" if device == "cuda" else ""): lambda ps: build_optimizer("adamw", ps, lr=1e-4, weight_decay=0.01),
        "loraforge AdamW8bit": lambda ps: build_optimizer("adamw8bit", ps, lr=1e-4, weight_decay=0.01),
    }
    try:
        import bitsandbytes as bnb

        arms["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4, weight_decay=0.01)
    except ImportError:
        print("bitsandbytes is not installed: its arm is skipped")
    if device == "cuda":
        arms["loraforge paged_adamw"] = lambda ps: build_optimizer("paged_adamw", ps, lr=1e-4, weight_decay=0.01)
        arms["loraforge paged_adamw8bit"] = lambda ps: build_optimizer("paged_adamw8bit", ps, lr=1e-4, weight_decay=0.01)
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=("lora", "full"), default="lora")
    args = parser.parse_args()
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if args.shape == "full":
        model, shapes = "one 4096 x 4096 matrix", [(4096, 4096)]
    else:
        model = "Llama-3-8B" if device == "cuda" else "SmolLM2-135M"
        shapes = lora_shapes(model)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(device) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) * 1e-3 for s in shapes] for _ in range(4)]
    n = sum(t.numel() for t in init)

    arms = {}
    for name, make in make_arms(device).items():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        arms[name] = (params, make(params), [])
    total_steps = args.steps + 2  # two warm-up steps
    for step in range(total_steps):
        for name, (params, opt, times) in arms.items():
            for p, g in zip(params, grads[step % len(grads)]):
                p.grad = g
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if step >= 2:
                times.append(time.perf_counter() - start)

    reference = next(iter(arms.values()))[0]
    print(f"\noptimizer step, {model}: {len(shapes)} tensors, {n / 1e6:.2f} M parameters, "
          f"{args.steps} steps, device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
                                                    f" ({torch.get_num_threads()} threads)"))
    header = f"{'optimizer':<28} {'ms/step':>9} {'state MiB':>10} {'bytes/param':>12} {'max |dp| vs AdamW':>18}"
    print(header)
    print("-" * len(header))
    for name, (params, opt, times) in arms.items():
        state = optimizer_state_bytes(opt)
        diff = max((p - q).abs().max().item() for p, q in zip(params, reference))
        print(f"{name:<28} {1e3 * statistics.median(times):>9.2f} {state / 2**20:>10.2f} {state / n:>12.3f} {diff:>18.2e}")
    if device == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
