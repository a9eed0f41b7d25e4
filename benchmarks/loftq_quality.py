"""LoftQ vs plain quantization (QLoRA-style init) on SmolLM2-135M-Instruct.

For each bit width (NF4, NF2) it prints, before any training, the perplexity of a bounded slice
of ``../shared/data/wiki_demo.txt`` for

- the full-precision model (reference),
- the plainly quantized model with a default LoRA adapter (B = 0, so it is the quantized model),
- the LoftQ-initialised model (quantized base + LoftQ adapter), T = 1 and more iterations,

with the weight-level relative errors ||W - Q||_F / ||W||_F and ||W - Q - s B A||_F / ||W||_F.
Then both inits are fine-tuned for the same short run on ``../shared/data/alpaca_en_demo.json``
(same data order, optimizer and steps) and evaluated again: wiki perplexity and the alpaca
held-out loss.

    .venv/bin/python benchmarks/loftq_quality.py                     # defaults below, CPU
    .venv/bin/python benchmarks/loftq_quality.py --iterations 1 5 --steps 40 --batch 4 --windows 16

The defaults are sized for a shared 2-core CPU (about 10 minutes: LoftQ's 210 full SVDs per
iteration and ~5 s per training step dominate); a GPU, when present, is used.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IGNORE = -100


# ----- data and evaluation (shared with rank_methods.py) -------------------------------------------

def wiki_windows(tokenizer, windows: int, length: int) -> torch.Tensor:
    """The first ``windows`` x ``length`` tokens of wiki_demo.txt as rows."""
    text = (DATA / "wiki_demo.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: windows * length * 8])["input_ids"][: windows * length]
    return torch.tensor(ids).view(windows, length)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch: int = 4) -> float:
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def alpaca_examples(tokenizer, max_length: int, eval_rows: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) tokenized alpaca examples (labels on the responses only)."""
    from loraforge.data import build_dataset, load_records

    records = load_records(DATA / "alpaca_en_demo.json")
    train, _ = build_dataset(records[:-eval_rows], tokenizer, max_length=max_length)
    held, _ = build_dataset(records[-eval_rows:], tokenizer, max_length=max_length)
    return train, held


def _batch(examples, pad_id, device):
    from loraforge.data import collate

    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


def _token_loss(model, batch) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def eval_loss(model, examples, pad_id, batch: int = 8) -> float:
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        loss, n = _token_loss(model, _batch(examples[i : i + batch], pad_id, device))
        total, count = total + loss.item(), count + n
    return total / max(count, 1)


def finetune(adapter_model, examples, pad_id, *, steps: int, batch: int, lr: float, seed: int = 0,
             total_steps: int | None = None) -> list[float]:
    """AdamW on the adapter for ``steps`` steps of ``batch`` examples (seeded order), calling the
    method's training hooks (AdaLoRA's allocator and regulariser, SoRA's gate step)."""
    from loraforge.adapters.method_hooks import training_hooks

    hooks = training_hooks(adapter_model, "default", total_steps or steps)
    params = [p for p in adapter_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    device = params[0].device
    losses = []
    adapter_model.train()
    for step in range(1, steps + 1):
        picked = [examples[order[(step * batch + j) % len(order)]] for j in range(batch)]
        loss, n = _token_loss(adapter_model, _batch(picked, pad_id, device))
        loss = loss / max(n, 1)
        extra = hooks.extra_loss()
        (loss if extra is None else loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        hooks.after_optimizer_step(step, lr)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    adapter_model.eval()
    return losses


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ----- the two inits ---------------------------------------------------------------------------------

def qlora_init(full, quant_type: str, r: int, alpha: float, blocksize: int):
    """Plain quantization of every linear but lm_head, then a default LoRA adapter (B = 0)."""
    from loraforge.adapters import LoraConfig, attach
    from loraforge.quant.replace import quantize_model

    model = quantize_model(copy.deepcopy(full), quant_type=quant_type, blocksize=blocksize, double_quant=True)
    return attach(model, LoraConfig(r=r, alpha=alpha))


def loftq_init(full, bits: int, iterations: int, r: int, alpha: float, blocksize: int):
    from loraforge.adapters.loftq import LoftqConfig, loftq_attach

    config = LoftqConfig(r=r, alpha=alpha, loftq_bits=bits, loftq_iterations=iterations, blocksize=blocksize, echo=None)
    adapter_model = loftq_attach(copy.deepcopy(full), config)
    return adapter_model, config.report.totals()


def weight_error(full, adapter_model) -> float:
    """Total ||W - Q||_F / ||W||_F over the quantized layers (plain quantization)."""
    from loraforge.adapters.base import AdapterLayer

    err = norm = 0.0
    for key, module in adapter_model.model.named_modules():
        if isinstance(module, AdapterLayer):
            w = full.get_submodule(key).weight.detach().float()
            err += float(torch.linalg.matrix_norm(w - module.base_layer.dequantize(torch.float32))) ** 2
            norm += float(torch.linalg.matrix_norm(w)) ** 2
    return math.sqrt(err / norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--iterations", type=int, nargs="+", default=[1], help="LoftQ T values (the first is fine-tuned)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--windows", type=int, default=4, help="wiki windows for perplexity")
    parser.add_argument("--length", type=int, default=128, help="tokens per wiki window")
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps (0: none)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=16, help="alpaca rows held out for the eval loss")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from loraforge.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    full, tokenizer = load_model("smollm2-135m-instruct", device=device)
    rows = wiki_windows(tokenizer, args.windows, args.length)
    pad_id = pad_id_of(tokenizer)
    train, held = alpaca_examples(tokenizer, args.max_length, eval_rows=args.eval_rows) if args.steps else ([], [])
    print(f"SmolLM2-135M-Instruct on {device}; wiki slice {args.windows} x {args.length} tokens; "
          f"r={args.rank} alpha={args.alpha:g}; blocksize {args.blocksize}, double quant")
    print(f"full precision: wiki perplexity {perplexity(full, rows):.2f}")

    before = [("bits", "init", "weight err", "loftq err", "wiki ppl", "init s")]
    after = [("bits", "init", f"train loss (last 5 of {args.steps})", "alpaca eval loss", "wiki ppl")]
    for bits in args.bits:
        quant_type = f"nf{bits}"
        t = time.perf_counter()
        qlora = qlora_init(full, quant_type, args.rank, args.alpha, args.blocksize)
        before.append((quant_type, "plain (QLoRA)", f"{weight_error(full, qlora):.4f}", "-",
                       f"{perplexity(qlora, rows):.2f}", f"{time.perf_counter() - t:.0f}"))
        tuned = {"plain (QLoRA)": qlora}
        for i, iterations in enumerate(args.iterations):
            t = time.perf_counter()
            loftq, (plain_err, loftq_err) = loftq_init(full, bits, iterations, args.rank, args.alpha, args.blocksize)
            before.append((quant_type, f"LoftQ T={iterations}", f"{plain_err:.4f}", f"{loftq_err:.4f}",
                           f"{perplexity(loftq, rows):.2f}", f"{time.perf_counter() - t:.0f}"))
            if i == 0:
                tuned[f"LoftQ T={iterations}"] = loftq
            else:
                del loftq
        print_table(before)
        if args.steps:
            for name, model in tuned.items():
                losses = finetune(model, train, pad_id, steps=args.steps, batch=args.batch, lr=args.lr)
                after.append((quant_type, name, f"{sum(losses[-5:]) / len(losses[-5:]):.4f}",
                              f"{eval_loss(model, held, pad_id):.4f}", f"{perplexity(model, rows):.2f}"))
            print_table(after)
        del tuned, qlora
    print("\nbefore fine-tuning:")
    print_table(before)
    if args.steps:
        print(f"\nafter {args.steps} steps x {args.batch} examples (AdamW lr {args.lr:g}, max_length {args.max_length}):")
        print_table(after)
    print(f"total {time.perf_counter() - start:.0f} s")


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
