"""Training-step throughput: loraforge vs HF + PEFT (+ bitsandbytes) (+ Unsloth on GPU).

Every arm trains the same model on the same random tokens (labels = inputs), with LoRA r / alpha
on all linear layers of the decoder (q, k, v, o, gate, up, down), dropout 0, AdamW (lr 1e-4),
gradient checkpointing on; each arm runs in its own process (clean peak memory) and prints the
step time, tokens/s, peak memory and its first and last loss, so equal work is visible.

CPU (default): SmolLM2-135M-Instruct from the embedded GGUF (float32), 4 x 128 tokens.
  arms: peft (fp32 base), loraforge (fp32 base), peft-bnb (NF4 + double quant, fp32 compute),
        loraforge-nf4 (the same quantization), and loraforge-unfused (loraforge's adapters
        without apply_kernels, transformers' checkpointing: isolates what the kernels change).
  CPU peak memory is the process's peak resident set during training (VmHWM reset before the
  first step), model included. On a shared machine wall time depends on the neighbours: the
  table also gives the process CPU time per step (with ``--threads 1`` it is the work done).
GPU (--device cuda): random-weight Llama-3 shapes (``--shape llama3-1b|llama3-8b``), bf16, NF4
  + double quant, ``--bs 2 --seq 2048`` or ``--bs 1 --seq 8192``; arms peft (bitsandbytes QLoRA),
  unsloth and loraforge, through ``../shared/bench/peer_arms.py`` (imported, not copied: its
  ``train_loop`` times every arm). Peak = torch.cuda.max_memory_allocated.

bf16 (``--dtype bf16``, CPU): every arm holds its frozen base in bfloat16 (loraforge's
``train.dtype: bf16``: ``load_model(compute_dtype=bfloat16)``; PEFT's arms as ``from_pretrained(
dtype=bfloat16)`` would load it, bitsandbytes quantizing those bf16 weights with a bf16 compute
dtype), keeps the adapters and AdamW in float32 (PEFT's ``autocast_adapter_dtype``) and runs the
step under ``torch.autocast("cpu", bfloat16)``, as HF ``Trainer(bf16=True)`` does; the GEMM
ceiling is then measured in bf16. Worth it on a CPU with AVX512-BF16 / AMX (oneDNN's bf16
GEMMs); elsewhere bf16 is emulated.

DoRA (``--methods lora,dora``): every arm runs once per method (PEFT's ``use_dora=True``,
loraforge's fused DoRA), and the table adds each arm's DoRA / LoRA ratio of step time and of CPU
time per step (the issue-12 target for loraforge: <= 1.15x; PEFT's is 1.8-2.8x on GPU).

    python benchmarks/train_step.py --steps 3 --threads 1      # CPU table
    python benchmarks/train_step.py --steps 5 --threads 1 --arms peft,loraforge --methods lora,dora
    python benchmarks/train_step.py --steps 3 --threads 1 --arms peft,loraforge --no-checkpointing
    python benchmarks/train_step.py --steps 3 --threads 1 --no-checkpointing --dtype bf16
    python benchmarks/train_step.py --device cuda --shape llama3-8b --bs 2 --seq 2048

"of GEMM ceiling": the arm's tokens/s x (4, or 6 with checkpointing) x the matmul parameters
(decoder linears + head), over the dense GEMM rate measured in the same run on the model's
projection shapes (fp32 on CPU unless ``--dtype bf16``, bf16 on GPU): the share of the machine's matmul speed a step
turns into training (LoRA on a frozen base: forward plus input gradients, ~4 x params x tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO.parent / "shared" / "bench"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CPU_ARMS = ["peft", "loraforge", "peft-bnb", "loraforge-nf4", "loraforge-unfused"]
GPU_ARMS = ["peft", "unsloth", "loraforge"]


# ----- model builders ---------------------------------------------------------------------------

def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


CHECKPOINTING = True  # --no-checkpointing turns it off in every arm (the "best setting" row on CPU)


DORA = False  # --methods ... dora: the arm's DoRA variant


BF16 = False  # --dtype bf16 (CPU): bf16 base, fp32 adapters, the step under CPU autocast


def _peft(model, r, alpha):
    from peft import LoraConfig, get_peft_model

    if CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                            bias="none", task_type="CAUSAL_LM", use_dora=DORA))


def _loraforge(model, r, alpha, kernels=True):
    from loraforge.adapters import attach
    from loraforge.adapters.lora import LoraConfig

    wrapped = attach(model, LoraConfig(r=r, alpha=alpha, dropout=0.0, targets=TARGETS, use_dora=DORA))
    if kernels:
        from loraforge.kernels.checkpoint import enable_checkpointing
        from loraforge.kernels.patch import apply_kernels

        apply_kernels(wrapped)
        if CHECKPOINTING:
            enable_checkpointing(wrapped)
    elif CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return wrapped


def _bnb_4bit(model, compute_dtype):
    """bitsandbytes NF4 + double quant on the LoRA targets (as peer_arms.to_4bit, on CPU)."""
    import bitsandbytes as bnb
    import torch.nn as nn

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                      quant_type="nf4", compress_statistics=True, device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, name, q.to("cpu"))  # quantizes, as peer_arms' .to("cuda")
    return model


def build_cpu(arm, r, alpha):
    import torch

    from loraforge.models import load_model

    dtype = torch.bfloat16 if BF16 else torch.float32
    quant = "nf4" if arm == "loraforge-nf4" else None
    model, _ = load_model("smollm2-135m-instruct", quantize=quant, compute_dtype=dtype)
    model = _freeze(model.train())
    if arm == "peft":
        return _peft(model, r, alpha)
    if arm == "peft-bnb":
        return _peft(_bnb_4bit(model, dtype), r, alpha)
    return _loraforge(model, r, alpha, kernels=arm != "loraforge-unfused")


# ----- CPU loop ---------------------------------------------------------------------------------

def _reset_peak_rss():
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_gib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_loop(model, vocab, bs, seq, steps, warm):
    import contextlib

    import torch

    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if BF16 else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (bs, seq), generator=g) for _ in range(4)]
    _reset_peak_rss()
    losses, times, cpu = [], [], []
    for i in range(warm + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        x = data[i % 4]
        with amp():
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        losses.append(out.loss.item())
    timed = times[warm:]
    return dict(tok_s=bs * seq / statistics.median(timed), step_s=statistics.median(timed),
                cpu_s=statistics.median(cpu[warm:]),
                step_s_all=[round(t, 3) for t in timed], peak_gib=_peak_rss_gib(),
                trainable=sum(p.numel() for p in params), loss_first=losses[0], loss_last=losses[-1])


# ----- GPU arms (through the shared peer script) ------------------------------------------------

def _peer_arms():
    sys.path.insert(0, str(PEER_DIR))
    import peer_arms

    return peer_arms


def run_gpu(arm, a):
    import torch

    peer = _peer_arms()
    if arm == "peft":
        return peer.run_peft(a.shape, 1, a.bs, a.seq, a.steps, a.warm, a.r)
    if arm == "unsloth":
        peer.save_random(a.shape, a.path)
        return peer.run_unsloth(a.shape, a.bs, a.seq, a.steps, a.warm, a.r, a.path)
    from transformers import LlamaForCausalLM

    from loraforge.quant.replace import quantize_model

    torch.manual_seed(0)
    cfg = peer.make_cfg(a.shape)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    quantize_model(model, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    model = _loraforge(_freeze(model.train()), a.r, a.r)
    return peer.train_loop(model, cfg.vocab_size, a.bs, a.seq, a.steps, a.warm)


# ----- the GEMM ceiling -------------------------------------------------------------------------

def _model_config(a, gpu):
    if gpu:
        return _peer_arms().make_cfg(a.shape)
    from transformers import AutoConfig

    from loraforge.models import resolve_model_path
    from loraforge.models.gguf import cached_gguf_folder

    return AutoConfig.from_pretrained(cached_gguf_folder(resolve_model_path("smollm2-135m-instruct")))


def gemm_ceiling(a, gpu) -> tuple[float, int]:
    """(FLOP/s of this device's dense GEMMs on the model's projection shapes at bs x seq rows, the
    parameters every token multiplies: the decoder's linears plus the output head). Measured in
    this process with the arms' thread count, median of a few repeats per shape."""
    import torch

    cfg = _model_config(a, gpu)
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, i), (i, h)]  # (in, out) of q/o, k/v, gate/up, down
    params = cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.bfloat16 if BF16 else torch.float32)
    if a.threads and not gpu:
        torch.set_num_threads(a.threads)
    rows = a.bs * a.seq
    flops = secs = 0.0
    for k, n in shapes:
        x = torch.randn(rows, k, device=device, dtype=dtype)
        w = torch.randn(k, n, device=device, dtype=dtype)
        times = []
        for _ in range(5):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x @ w
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        flops += 2 * rows * k * n
        secs += statistics.median(times[1:])
    return flops / secs, params


# ----- driver -----------------------------------------------------------------------------------

def run_arm(a):
    if a.device == "cuda":
        res = run_gpu(a.arm, a)
    else:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        model = build_cpu(a.arm, a.r, a.r)
        res = cpu_loop(model, model.config.vocab_size if hasattr(model, "config") else 49152, a.bs, a.seq, a.steps, a.warm)
        res["threads"] = torch.get_num_threads()
    res["arm"], res["method"] = a.arm, a.method
    print("RESULT " + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--bs", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warm", type=int, default=None)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--path", default="/tmp/rand_model")
    ap.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off in every arm")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads per arm (default: torch's)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="CPU: bf16 = bf16 base + CPU autocast in every arm (GPU arms are bf16 anyway)")
    ap.add_argument("--methods", default="lora", help="comma-separated: lora, dora (each arm runs once per method)")
    ap.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global CHECKPOINTING, DORA, BF16
    CHECKPOINTING = not a.no_checkpointing
    BF16 = a.dtype == "bf16" and a.device == "cpu"
    DORA = a.method == "dora"
    gpu = a.device == "cuda"
    a.bs = a.bs or (2 if gpu else 4)
    a.seq = a.seq or (2048 if gpu else 128)
    a.steps = a.steps or (8 if gpu else 3)
    a.warm = a.warm if a.warm is not None else (3 if gpu else 1)
    if a.arm:
        return run_arm(a)
    arms = a.arms.split(",") if a.arms else (GPU_ARMS if gpu else CPU_ARMS)
    methods = a.methods.split(",")
    rows = []
    for arm in arms:
        for method in methods:
            cmd = [sys.executable, __file__, "--arm", arm, "--method", method, "--device", a.device, "--shape", a.shape,
                   "--bs", str(a.bs), "--seq", str(a.seq), "--steps", str(a.steps), "--warm", str(a.warm),
                   "--r", str(a.r), "--path", a.path] + (["--threads", str(a.threads)] if a.threads else []) \
                + (["--no-checkpointing"] if a.no_checkpointing else []) + ["--dtype", a.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"[{arm} {method}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[7:]))
            print(f"[{arm} {method}] done: {rows[-1]['tok_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    ceiling, matmul_params = gemm_ceiling(a, gpu)
    flops_per_token = (6 if CHECKPOINTING else 4) * matmul_params
    where = f"{a.shape}, " if gpu else "SmolLM2-135M-Instruct, "
    print(f"\n{where}{a.bs} x {a.seq} tokens, r={a.r} alpha={a.r} on {','.join(TARGETS)}, AdamW, "
          f"gradient checkpointing {'off' if a.no_checkpointing else 'on'}, {'bf16' if gpu or BF16 else 'fp32'}, {a.steps} timed steps after {a.warm} warm-up ({a.device})")
    cpu = not gpu
    print(f"GEMM ceiling {ceiling / 1e9:,.0f} GFLOP/s ({'bf16' if gpu or BF16 else 'fp32'}, this model's shapes, measured now); "
          f"a step needs {'6' if CHECKPOINTING else '4'} x {matmul_params / 1e6:,.1f}M matmul parameters x tokens FLOPs")
    print("| arm | method | tokens/s | of GEMM ceiling | step s (median) |" + (" CPU s / step | tokens per CPU s |" if cpu else "")
          + " peak GiB | loss first -> last |")
    print("|---|---|---|---|" + ("---|---|" if cpu else "") + "---|---|")
    for r in rows:
        extra = f" {r['cpu_s']:.2f} | {a.bs * a.seq / r['cpu_s']:.1f} |" if cpu else ""
        print(f"| {r['arm']} | {r['method']} | {r['tok_s']:.1f} | {100 * r['tok_s'] * flops_per_token / ceiling:.0f}% | "
              f"{r['step_s']:.3f} |{extra} {r['peak_gib']:.2f} | "
              f"{r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
    by = {(r["arm"], r["method"]): r for r in rows}
    ratios = [(arm, by[arm, "lora"], by[arm, "dora"]) for arm in arms if (arm, "lora") in by and (arm, "dora") in by]
    if ratios:
        print("\n| arm | DoRA / LoRA step time | DoRA / LoRA CPU time per step |")
        print("|---|---|---|")
        for arm, lo, do in ratios:
            cpu_ratio = f"{do['cpu_s'] / lo['cpu_s']:.2f}x" if cpu else "-"
            print(f"| {arm} | {do['step_s'] / lo['step_s']:.2f}x | {cpu_ratio} |")


if __name__ == "__main__":
    main()
