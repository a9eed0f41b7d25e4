"""Multi-process QLoRA training throughput and memory: loraforge (1 process, ddp, fsdp) against
PEFT under PyTorch DDP (the peer), each at the same global batch, in the same run.

Every arm trains LoRA r=16 on all linear layers of the decoder, AdamW, gradient checkpointing,
for ``--steps`` optimizer steps of a global batch of ``--global-bs`` rows of ``--seq`` tokens
(each of N processes takes ``global-bs / N`` rows); loraforge trains on the alpaca demo packed
into full rows (``data.packing``), the peer on random tokens of the same shape (same work per
token). Each arm is started by ``torch.distributed.run`` (world size 1 included) and prints:

- tokens/s: global trained-on tokens of the steps after the first, over their wall time;
- peak memory per rank during training (CPU: the process's peak resident set, reset just
  before step 1, so model loading is excluded; CUDA: ``max_memory_allocated`` after a reset);
- for loraforge's fsdp arm, the packed 4-bit base bytes each rank holds.

    python benchmarks/train_distributed.py --steps 4                 # CPU, gloo, SmolLM2-135M NF4
    python benchmarks/train_distributed.py --arms lf-1,lf-fsdp-2 --quant none
    python benchmarks/train_distributed.py --device cuda --nproc 2 --model PATH --seq 2048 --global-bs 8

On CPU the ranks share the machine's cores (torchrun sets one thread each): 2 processes can
only be faster than 1 where the cores are free; the numbers show the cost of the collectives and
the memory split, not a speed-up. Wall times on a loaded machine vary with the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ALPACA = REPO.parent / "shared" / "data" / "alpaca_en_demo.json"
RESULT = "RESULT "


def arms(nproc: int) -> list[str]:
    return ["lf-1", f"lf-ddp-{nproc}", f"lf-fsdp-{nproc}", "peft-1", f"peft-ddp-{nproc}"]


def parse_arm(arm: str) -> tuple[str, str, int]:
    """'lf-fsdp-2' -> ('lf', 'fsdp', 2); 'peft-1' -> ('peft', 'single', 1)."""
    parts = arm.split("-")
    return parts[0], (parts[1] if len(parts) == 3 else "single"), int(parts[-1])


# ----- measuring inside a rank ------------------------------------------------------------------
def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM


def peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def report(row: dict) -> None:
    """Gather every rank's peak memory to rank 0, which prints the arm's result line."""
    import torch.distributed as dist

    peaks = [row.pop("peak")]
    if dist.is_initialized():
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak_bytes(row["device"]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT + json.dumps({**row, "peak_per_rank": peaks}), flush=True)


def loraforge_worker(a, mode: str) -> None:
    import io

    import torch.distributed as dist
    from rich.console import Console

    from loraforge.train import load_config, train
    from loraforge.train.logging import read_log

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(a.out) / f"lf-{mode}-{world}"
    overrides = [f"model={a.model}", f"data.train={ALPACA}", "data.packing=true", f"data.max_length={a.seq}",
                 "adapter.r=16", f"train.steps={a.steps}", f"train.batch_size={a.global_bs // world}",
                 "train.save_every=0", "train.eval_every=0", "train.lr=1e-4", f"output_dir={out}", "overwrite=true",
                 "quantization=null" if a.quant == "none" else f"quantization.type={a.quant}"]
    if mode != "single":
        overrides.append(f"train.distributed={mode}")
    train(load_config(None, overrides), on_start=lambda *_: reset_peak(a.device), console=Console(file=io.StringIO()))
    rows = read_log(out / "train_log.jsonl") if int(os.environ.get("RANK", "0")) == 0 else []
    steps = [r for r in rows if "loss" in r]
    shards = [r for r in rows if "base_bytes_per_rank" in r]
    timed = steps[1:]  # after the first (warm-up) step: wall time from its end to the last step's end
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"] if len(steps) > 1 else 0.0
    report({"arm": f"lf-{mode}-{world}" if mode != "single" else "lf-1", "device": a.device,
            "tokens_per_s": sum(r["tokens"] for r in timed) / seconds if seconds > 0 else 0.0,
            "first_loss": steps[0]["loss"] if steps else float("nan"),
            "last_loss": steps[-1]["loss"] if steps else float("nan"),
            "base_bytes_per_rank": shards[0]["base_bytes_per_rank"] if shards else None,
            "peak": peak_bytes(a.device)})
    if dist.is_initialized():
        dist.destroy_process_group()


def peft_worker(a, mode: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from train_step import _bnb_4bit, _freeze, _peft

    from loraforge.models import load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if a.device == "cuda" else torch.device("cpu")
    model, _ = load_model(a.model, compute_dtype=torch.float32 if a.device == "cpu" else torch.bfloat16)
    model = _freeze(model.train())
    if a.quant != "none":
        model = _bnb_4bit(model, torch.float32 if a.device == "cpu" else torch.bfloat16)
    model = _peft(model, 16, 16).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    engine = model
    if world > 1:
        engine = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if a.device == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    bs, vocab = a.global_bs // world, model.config.vocab_size
    gen = torch.Generator().manual_seed(rank)
    times, losses = [], []
    for step in range(a.steps):
        if step == 1:
            reset_peak(a.device)
        ids = torch.randint(0, vocab, (bs, a.seq), generator=gen).to(device)
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if a.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    report({"arm": f"peft-{mode}-{world}" if mode != "single" else "peft-1", "device": a.device,
            "tokens_per_s": a.global_bs * a.seq * (a.steps - 1) / sum(times[1:]),
            "first_loss": losses[0], "last_loss": losses[-1], "base_bytes_per_rank": None,
            "peak": peak_bytes(a.device)})
    if dist.is_initialized():
        dist.destroy_process_group()


# ----- the driver ---------------------------------------------------------------------------------
def run_arm(arm: str, a, out: str) -> dict | None:
    kind, mode, nproc = parse_arm(arm)
    env = dict(os.environ)
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
           "--worker", f"{kind}:{mode}", "--out", out, *forwarded(a)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        print(f"{arm}: failed (exit {done.returncode})\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(RESULT):])


def forwarded(a) -> list[str]:
    return ["--device", a.device, "--model", a.model, "--quant", a.quant, "--steps", str(a.steps),
            "--seq", str(a.seq), "--global-bs", str(a.global_bs)]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def print_table(rows: list[dict], a) -> None:
    print(f"\nglobal batch {a.global_bs} x {a.seq} tokens, {a.steps} steps (first excluded), base {a.quant}, "
          f"device {a.device}; load: {os.getloadavg()[0]:.1f} (1-min load average)")
    print(f"{'arm':<14}{'tokens/s':>10}{'vs lf-1':>9}  {'peak MiB per rank':<22}{'4-bit base B/rank':<22}"
          f"{'loss first -> last':<20}")
    base = next((r["tokens_per_s"] for r in rows if r["arm"] == "lf-1"), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        peaks = " / ".join(mib(p) for p in r["peak_per_rank"])
        shards = " / ".join(str(b) for b in r["base_bytes_per_rank"]) if r["base_bytes_per_rank"] else "-"
        print(f"{r['arm']:<14}{r['tokens_per_s']:>10,.0f}{ratio:>9}  {peaks:<22}{shards:<22}"
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--arms", default=None, help="comma-separated, e.g. lf-1,lf-ddp-2,lf-fsdp-2,peft-1,peft-ddp-2")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--global-bs", type=int, default=4)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, mode = a.worker.split(":")
        (loraforge_worker if kind == "lf" else peft_worker)(a, mode)
        return
    chosen = a.arms.split(",") if a.arms else arms(a.nproc)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as out:
        for arm in chosen:
            start = time.perf_counter()
            row = run_arm(arm, a, out)
            print(f"{arm}: {time.perf_counter() - start:.0f} s (start-up and loading included)", flush=True)
            rows += [row] if row is not None else []
    print_table(rows, a)


if __name__ == "__main__":
    main()
