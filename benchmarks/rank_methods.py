"""LoRA vs AdaLoRA vs SoRA at a similar parameter budget on alpaca data (SmolLM2-135M-Instruct),
beside the rest of the family: bottleneck adapters, prefix tuning and full fine-tuning.

- LoRA r (default 8) on every linear layer;
- AdaLoRA from init_r = 1.5 r down to target_r = r (average), the budget moved between modules
  by importance (tinit / tfinal = 10% / 25% of the steps);
- SoRA from r0 = 1.5 r with the proximal L1 step on the gates, so it prunes ranks as it trains;
- bottleneck adapters (Houlsby placement, reduction factor 16: after attention and MLP);
- prefix tuning (``--prefix-tokens`` virtual tokens per layer, default 20, no projection, its own
  learning rate ``--prefix-lr``: prefixes are trained at 1e-2-ish rates, as in PEFT's examples),
  once with PEFT's random N(0, 1) init and once with ``init: words`` (Li & Liang's real-token
  activations, so it starts as the model prompted with those tokens);
- full fine-tuning (every weight; its own, smaller learning rate ``--full-lr``).

The same short run for each (same data order, AdamW, steps; lr per method as said); printed:
trainable parameters at the start and kept at the end, final ranks (total, min / mean / max per
module; "-" for methods without ranks), train loss, held-out alpaca loss, seconds per step.

    .venv/bin/python benchmarks/rank_methods.py
    .venv/bin/python benchmarks/rank_methods.py --steps 60 --rank 8 --sora-lambda 20
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loftq_quality import alpaca_examples, eval_loss, finetune, pad_id_of, print_table


def adapter_parameters(adapter_model, ranks: dict[str, int]) -> int:
    """Parameters of a LoRA-shaped adapter with these per-module ranks: sum of r (in + out) (what
    the saved adapter holds; AdaLoRA's E, r more per module, is not counted, SoRA's g is folded)."""
    total = 0
    for key, r in ranks.items():
        layer = adapter_model.model.get_submodule(key)
        total += r * (layer.in_features + layer.out_features)
    return total


def lora_ranks(adapter_model) -> dict[str, int]:
    return {k: adapter_model.model.get_submodule(k).r["default"] for k in adapter_model.targets["default"]}


def adalora_ranks(adapter_model) -> dict[str, int]:
    config = adapter_model.configs["default"]
    return {k: sum(config.rank_pattern.get(k, [True] * config.init_r)) for k in adapter_model.targets["default"]}


def sora_ranks(adapter_model) -> dict[str, int]:
    return {k: adapter_model.model.get_submodule(k).kept_rank("default") for k in adapter_model.targets["default"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--full-lr", type=float, default=2e-5, help="learning rate of full fine-tuning")
    parser.add_argument("--prefix-lr", type=float, default=1e-2, help="learning rate of prefix tuning")
    parser.add_argument("--prefix-tokens", type=int, default=20, help="prefix tuning's virtual tokens per layer")
    parser.add_argument("--sora-lambda", type=float, default=20.0)
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from loraforge.adapters import BottleneckConfig, LoraConfig, PrefixConfig, attach
    from loraforge.adapters.adalora import AdaloraConfig
    from loraforge.adapters.sora import SoraConfig
    from loraforge.models import load_model
    from loraforge.train.full import FullModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    full, tokenizer = load_model("smollm2-135m-instruct", device=device)
    train, held = alpaca_examples(tokenizer, args.max_length, args.eval_rows)
    pad_id = pad_id_of(tokenizer)
    r, r0 = args.rank, args.rank * 3 // 2
    adapters = {
        f"LoRA r={r}": (LoraConfig(r=r, alpha=2 * r), lora_ranks),
        f"AdaLoRA {r0}->{r}": (AdaloraConfig(init_r=r0, target_r=r, alpha=2 * r, tinit=args.steps // 10,
                                             tfinal=args.steps // 4), adalora_ranks),
        f"SoRA r0={r0} lambda={args.sora_lambda:g}": (SoraConfig(r=r0, alpha=2 * r0, lambda_=args.sora_lambda),
                                                      sora_ranks),
        "bottleneck houlsby /16": (BottleneckConfig(placement="houlsby", reduction_factor=16), None),
    }
    # name -> (make the trained model from a copy of the base, ranks at the end or None, lr)
    methods = {name: ((lambda model, config=config: attach(model, config)), ranks_of, args.lr)
               for name, (config, ranks_of) in adapters.items()}
    for init in ("random", "words"):
        methods[f"prefix {args.prefix_tokens} tokens, {init}"] = (
            lambda model, init=init: attach(model, PrefixConfig(num_virtual_tokens=args.prefix_tokens,
                                                                prefix_init=init)), None, args.prefix_lr)
    methods["full fine-tuning"] = (FullModel, None, args.full_lr)
    print(f"SmolLM2-135M-Instruct (fp32) on {device}; adapters on all linear layers (bottleneck: after attention "
          f"and MLP); {args.steps} steps x {args.batch} alpaca examples, AdamW lr {args.lr:g} (prefix: "
          f"{args.prefix_lr:g}, full: {args.full_lr:g}), max_length {args.max_length}; eval on the last "
          f"{args.eval_rows} rows")
    rows = [("method", "params start", "params end", "ranks end (sum; min/mean/max)",
             "train loss (last 5)", "eval loss", "s/step")]
    for name, (make, ranks_of, lr) in methods.items():
        adapter_model = make(copy.deepcopy(full))
        params_start = sum(p.numel() for p in adapter_model.parameters() if p.requires_grad)
        t = time.perf_counter()
        losses = finetune(adapter_model, train, pad_id, steps=args.steps, batch=args.batch, lr=lr)
        per_step = (time.perf_counter() - t) / args.steps
        if ranks_of is None:
            params_end, ranks_text = f"{params_start:,}", "-"
        else:
            ranks = ranks_of(adapter_model)
            values = list(ranks.values())
            params_end = f"{adapter_parameters(adapter_model, ranks):,}"
            ranks_text = f"{sum(values)}; {min(values)}/{sum(values) / len(values):.1f}/{max(values)}"
        rows.append((name, f"{params_start:,}", params_end, ranks_text, f"{sum(losses[-5:]) / 5:.4f}",
                     f"{eval_loss(adapter_model, held, pad_id):.4f}", f"{per_step:.2f}"))
        print_table(rows)
        del adapter_model
    print()
    print_table(rows)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
