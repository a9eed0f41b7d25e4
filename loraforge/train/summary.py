"""What a run reports about itself: the start banner's rows, the closing summary, and the short
model card (README.md) written next to the adapter; with ``init: loftq`` also the quantized base
the adapter was trained on (``base/``), without which the adapter is of no use."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loraforge.train.checkpoint import write_adapters
from loraforge.train.config import AdapterSection, Config, loftq_quantization, resolved_alpha, resolved_rank
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


def describe_method(a: AdapterSection, config: Config) -> str:
    """``lora r=16 alpha=16``, ``adalora init_r=12 -> target_r=8 alpha=8``, ... with the init."""
    if a.method == "full":
        return "full  (every weight trained, no adapter)"
    if a.method == "adalora":
        text = f"adalora  init_r={a.adalora.init_r} -> target_r={a.adalora.target_r} alpha={resolved_alpha(a):g}"
    elif a.method == "vera":
        text = f"vera  r={resolved_rank(a)}"
    elif a.method == "bottleneck":
        bn = a.bottleneck
        size = f"size {bn.bottleneck_size}" if bn.bottleneck_size else f"reduction {bn.reduction_factor or 16}"
        text = (f"bottleneck  {bn.placement}, {size}, {bn.non_linearity or 'default non-linearity'}"
                f"{'' if bn.residual else ', no residual'}")
    elif a.method == "prefix":
        pf = a.prefix
        projection = f", projection (hidden {pf.projection_hidden or 'd_kv'})" if pf.projection else ""
        text = f"prefix  {pf.num_virtual_tokens} virtual tokens per layer{projection}, init {pf.init}"
    else:
        text = f"{a.method}  r={resolved_rank(a)} alpha={resolved_alpha(a):g}{' rslora' if a.rslora else ''}"
    if a.method == "sora":
        text += f" lambda={a.sora.lambda_:g} ({a.sora.lambda_schedule or 'constant'})"
    if a.init == "loftq":
        quantizer, bits = loftq_quantization(a, config.quantization)
        n = a.loftq.iterations
        text += f"  init loftq ({quantizer}, {bits} bits, {n} iteration{'s' if n != 1 else ''}"
        text += f", first {a.loftq.mixed_4bit_layers} layers 4-bit)" if a.loftq.mixed_4bit_layers else ")"
    elif a.init != "default":
        text += f"  init {a.init}"
    return text


def banner_rows(config, adapter_model, device, dtype: str, train_set, eval_set, n_steps, optimizer,
                world_size: int = 1) -> list[tuple[str, str]]:
    t, a = config.train, config.adapter
    trainable, total = count_parameters(adapter_model)
    q = config.quantization
    if q is None:
        quant = "none"
    elif q.type == "llm_int8":
        quant = f"llm_int8 (row-wise int8, outlier threshold {6.0 if q.llm_int8_threshold is None else q.llm_int8_threshold:g})"
    else:
        quant = f"{q.type} (block {q.blocksize}{', double quant' if q.double_quant else ''})"
    if q and a.init == "loftq":
        quant += ", by LoftQ"
    method = describe_method(a, config)
    tokens = sum(len(e["input_ids"]) for e in train_set)
    data = f"{len(train_set)} train ({tokens:,} tokens)" + (f", {len(eval_set)} eval" if eval_set else "")
    return [
        ("model", f"{config.model}   quantization: {quant}"),
        ("method", method),
        ("trainable", f"{human_count(trainable)} / {human_count(total)} parameters ({100 * trainable / max(total, 1):.3f}%)"),
        ("device", f"{device.type}   dtype: {dtype}"),
        ("data", data),
        ("batch", f"{t.batch_size} x {t.grad_accum} accumulation"
                  + (f" x {world_size} processes" if world_size > 1 else "")
                  + f" = {t.batch_size * t.grad_accum * world_size} examples per step"),
        ("steps", f"{n_steps}   lr {t.lr:g} {t.schedule}, warm-up {t.warmup_steps}"),
        ("optimizer", f"{t.optimizer}   state {human_bytes(optimizer_state_bytes(optimizer))}"),
        ("output", str(config.output_dir)),
    ]


def world_rows(world, base_shards: tuple[list[int], int] | None) -> list[tuple[str, str]]:
    """The banner's rows about the processes; under FSDP the packed 4-bit base bytes each rank
    holds (``base_shards``: bytes per rank, bytes of the whole base)."""
    if world.size == 1:
        return []
    rows = [("processes", f"{world.size} ({world.mode})")]
    if base_shards is not None and base_shards[1]:
        held, total = base_shards
        rows.append(("base shards", ", ".join(f"rank {r} {human_bytes(b)}" for r, b in enumerate(held))
                     + f" of {human_bytes(total)} packed 4-bit base ({100 * max(held) / total:.1f}% max)"))
    return rows


def finish(result, config: Config, optimizer, log: RunLog, device, adapters: dict) -> None:
    """Write the adapter (``adapters``: its tensors, gathered whole), tokenizer, plot and model
    card; print the summary. Rank 0 alone calls it."""
    out = result.output_dir
    try:
        write_adapters(result.model, out, adapters)
        if hasattr(result.tokenizer, "save_pretrained"):
            result.tokenizer.save_pretrained(out)
    except OSError as err:
        from loraforge.errors import UserError
        from loraforge.files import describe_os_error
        from loraforge.train.checkpoint import latest_checkpoint

        last = latest_checkpoint(out)
        kept = (f"the checkpoint {last} is intact: free some space and run again with --resume to save it"
                if last else "no checkpoint was saved (train.save_every)")
        what = "model" if config.adapter.method == "full" else "adapter"
        raise UserError(f"could not write the trained {what}: {describe_os_error(err)}; {kept}",
                        where=str(out)) from None
    base = save_loftq_base(result, out / "base") if config.adapter.init == "loftq" else None
    plot = plot_losses(out)
    write_model_card(out, config, result)
    elapsed = log.elapsed()
    lines = [
        f"[bold green]done[/]: {result.steps} steps in {elapsed:.0f} s, "
        f"final loss {result.losses[-1]:.4f}" if result.losses else "[bold green]done[/]: no steps run",
    ]
    if result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}, perplexity {math.exp(min(result.eval_loss, 50)):.2f}")
    if result.choice_accuracy is not None:
        lines.append(f"choice accuracy {result.choice_accuracy:.1%} on {config.data.eval_choice}")
    lines.append(f"peak memory {human_bytes(peak_memory_bytes(device))}, optimizer state "
                 f"{human_bytes(optimizer_state_bytes(optimizer))}")
    full = config.adapter.method == "full"
    lines.append(f"model (transformers folder): {out}" if full else f"adapter: {out / 'adapter_model.safetensors'}")
    if base is not None:
        lines.append(f"quantized base (LoftQ): {base}")
    lines.append(f"log: {out / LOG_NAME}")
    lines.append(f"plot: {plot}" if plot else "plot: skipped (pip install matplotlib to get loss_curve.png)")
    for line in lines:
        log.note(line)


def save_loftq_base(result, folder: Path) -> Path:
    """The LoftQ-quantized base the adapter was trained on (see ``adapters.loftq.save_loftq_base``)."""
    from loraforge.adapters.loftq import save_loftq_base as save_base

    return save_base(result.model.model, result.tokenizer, folder)


def write_model_card(out: Path, config: Config, result) -> None:
    a, t = config.adapter, config.train
    q = config.quantization
    loftq = a.init == "loftq"
    if a.method == "full":
        write_full_model_card(out, config, result)
        return
    if loftq:
        base_line = (f"`{config.model}`, quantized to {q.type} by LoftQ; the adapter was trained on that quantized "
                     f"base, saved in `base/` (use it, not a fresh quantization of the model)")
        use = (f"Use it: `loraforge generate {out / 'base'} --adapter {out} --prompt \"...\"` (an nf4 / fp4 base is a "
               f"bitsandbytes folder, other types loraforge's k-bit folder).")
    else:
        base_line = f"`{config.model}`{f' (quantized to {q.type} for training)' if q else ''}"
        use = f"Use it: `loraforge generate {config.model} --adapter {out} --prompt \"...\"`"
        use += (" (PEFT has no bottleneck adapters: load it with loraforge.adapters.load_adapter; it cannot be "
                "merged)." if a.method == "bottleneck" else
                f", or with PEFT:\n`PeftModel.from_pretrained(base_model, \"{out}\")`"
                f"{' (a prefix cannot be merged)' if a.method == 'prefix' else ''}.")
    fmt = "PEFT's layout, peft_type BOTTLENECK" if a.method == "bottleneck" else "PEFT format"
    where = "in every attention layer" if a.method == "prefix" else f"targets: {a.targets}"
    text = f"""# Adapter trained with loraforge

- base model: {base_line}
- method: {" ".join(describe_method(a, config).split())}, {where}
- data: `{config.data.train}` ({config.data.format} format, max_length {config.data.max_length})
- training: {result.steps} steps, batch {t.batch_size} x {t.grad_accum}, lr {t.lr:g} ({t.schedule}), optimizer {t.optimizer}, seed {t.seed}
- final train loss: {result.losses[-1] if result.losses else float("nan"):.4f}{"" if result.eval_loss is None else f"; eval loss {result.eval_loss:.4f}"}

Files: `adapter_config.json` + `adapter_model.safetensors` ({fmt}), the tokenizer with its
chat template, `config.yaml` (the exact configuration), `{LOG_NAME}` and `{PLOT_NAME}`.

{use}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def write_full_model_card(out: Path, config: Config, result) -> None:
    """The model card of a fully fine-tuned model (a transformers folder, not an adapter)."""
    t = config.train
    text = f"""# Model fully fine-tuned with loraforge

- base model: `{config.model}`; every weight trained (adapter.method: full)
- data: `{config.data.train}` ({config.data.format} format, max_length {config.data.max_length})
- training: {result.steps} steps, batch {t.batch_size} x {t.grad_accum}, lr {t.lr:g} ({t.schedule}), optimizer {t.optimizer}, seed {t.seed}
- final train loss: {result.losses[-1] if result.losses else float("nan"):.4f}{"" if result.eval_loss is None else f"; eval loss {result.eval_loss:.4f}"}

Files: a transformers model folder (`config.json`, `model.safetensors`), the tokenizer with its
chat template, `config.yaml` (the exact configuration), `{LOG_NAME}` and `{PLOT_NAME}`.

Use it: `loraforge generate {out} --prompt "..."`, or
`AutoModelForCausalLM.from_pretrained("{out}")`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
