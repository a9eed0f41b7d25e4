"""What a run reports about itself: the start banner's rows, the closing summary, and the short
model card (README.md) written next to the adapter."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loraforge.train.config import Config, resolved_alpha, resolved_rank
from loraforge.train.logging import LOG_NAME, PLOT_NAME, RunLog, human_bytes, human_count, peak_memory_bytes, plot_losses
from loraforge.train.optimizers import optimizer_state_bytes


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); a quantized linear counts as in_features x out_features weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    quantized_params: set[int] = set()
    for module in model.modules():
        if hasattr(module, "bits_per_parameter") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features
            quantized_params.update(id(p) for p in module.parameters(recurse=False) if p.dtype == torch.uint8)
    total += sum(p.numel() for p in model.parameters() if id(p) not in quantized_params)
    return trainable, total


def banner_rows(config, adapter_model, device, dtype: str, train_set, eval_set, n_steps, optimizer) -> list[tuple[str, str]]:
    t, a = config.train, config.adapter
    trainable, total = count_parameters(adapter_model)
    q = config.quantization
    quant = f"{q.type} (block {q.blocksize}{', double quant' if q.double_quant else ''})" if q else "none"
    method = f"{a.method}  r={resolved_rank(a)}"
    if a.method != "vera":
        method += f" alpha={resolved_alpha(a):g}{' rslora' if a.rslora else ''}"
    tokens = sum(len(e["input_ids"]) for e in train_set)
    data = f"{len(train_set)} train ({tokens:,} tokens)" + (f", {len(eval_set)} eval" if eval_set else "")
    return [
        ("model", f"{config.model}   quantization: {quant}"),
        ("method", method),
        ("trainable", f"{human_count(trainable)} / {human_count(total)} parameters ({100 * trainable / max(total, 1):.3f}%)"),
        ("device", f"{device.type}   dtype: {dtype}"),
        ("data", data),
        ("batch", f"{t.batch_size} x {t.grad_accum} accumulation = {t.batch_size * t.grad_accum} examples per step"),
        ("steps", f"{n_steps}   lr {t.lr:g} {t.schedule}, warm-up {t.warmup_steps}"),
        ("optimizer", f"{t.optimizer}   state {human_bytes(optimizer_state_bytes(optimizer))}"),
        ("output", str(config.output_dir)),
    ]


def finish(result, config: Config, optimizer, log: RunLog, device) -> None:
    """Write the adapter, tokenizer, plot and model card; print the summary."""
    out = result.output_dir
    result.model.save_pretrained(out)
    if hasattr(result.tokenizer, "save_pretrained"):
        result.tokenizer.save_pretrained(out)
    plot = plot_losses(out)
    write_model_card(out, config, result)
    elapsed = log.elapsed()
    lines = [
        f"[bold green]done[/]: {result.steps} steps in {elapsed:.0f} s, "
        f"final loss {result.losses[-1]:.4f}" if result.losses else "[bold green]done[/]: no steps run",
    ]
    if result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}, perplexity {math.exp(min(result.eval_loss, 50)):.2f}")
    lines.append(f"peak memory {human_bytes(peak_memory_bytes(device))}, optimizer state "
                 f"{human_bytes(optimizer_state_bytes(optimizer))}")
    lines.append(f"adapter: {out / 'adapter_model.safetensors'}")
    lines.append(f"log: {out / LOG_NAME}")
    lines.append(f"plot: {plot}" if plot else "plot: skipped (pip install matplotlib to get loss_curve.png)")
    for line in lines:
        log.note(line)


def write_model_card(out: Path, config: Config, result) -> None:
    a, t = config.adapter, config.train
    q = config.quantization
    text = f"""# Adapter trained with loraforge

- base model: `{config.model}`{f" (quantized to {q.type} for training)" if q else ""}
- method: {a.method}, r = {resolved_rank(a)}{"" if a.method == "vera" else f", alpha = {resolved_alpha(a):g}"}, targets: {a.targets}
- data: `{config.data.train}` ({config.data.format} format, max_length {config.data.max_length})
- training: {result.steps} steps, batch {t.batch_size} x {t.grad_accum}, lr {t.lr:g} ({t.schedule}), optimizer {t.optimizer}, seed {t.seed}
- final train loss: {result.losses[-1] if result.losses else float("nan"):.4f}{"" if result.eval_loss is None else f"; eval loss {result.eval_loss:.4f}"}

Files: `adapter_config.json` + `adapter_model.safetensors` (PEFT format), the tokenizer with its
chat template, `config.yaml` (the exact configuration), `{LOG_NAME}` and `{PLOT_NAME}`.

Use it: `loraforge generate {config.model} --adapter {out} --prompt "..."`, or with PEFT:
`PeftModel.from_pretrained(base_model, "{out}")`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
