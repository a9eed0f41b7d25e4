"""The training loop, top to bottom: seed, model, adapter, data, optimizer, steps, checkpoints.

Loss (per optimizer step, over its micro-batches b = 1..A and their trained tokens t)::

    L = sum_b sum_t CE(logits_bt, label_bt) / N,   N = number of trained tokens in the whole step

Each micro-batch backpropagates its summed token loss divided by the step's N (counted before the
first forward), so ``batch_size=8, grad_accum=1`` and ``batch_size=1, grad_accum=8`` produce the
same gradient and update. Dividing each micro-batch by its own token count (the HF Trainer's old
behaviour) over-weights short examples under accumulation.

Methods that act between steps (AdaLoRA, SoRA; see :mod:`loraforge.adapters.method_hooks`) are
driven here, so no user code has to remember them. Per optimizer step t = 1..T::

    backward of every micro-batch (above)
    backward of the method's extra loss, once per step (AdaLoRA: orth_reg_weight * R)
    clip; optimizer step
    method step with the lr of step t, before zero_grad (AdaLoRA: importance from the gradients,
    budget, masking; SoRA: the proximal soft-threshold of the gates)
    scheduler step; zero_grad

The extra loss is a property of the weights, not of the data, so it enters each step once, with
its weight, whatever the accumulation: the same total as PEFT under the HF Trainer, where every
micro-batch's loss carries it and the step averages the micro-batches. The method's state (AdaLoRA's importance averages and mask)
goes into every checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from loraforge.adapters.method_hooks import TrainingHooks, training_hooks
from loraforge.errors import UserError
from loraforge.kernels import apply_kernels
from loraforge.train import build
from loraforge.train.batches import StepSampler, total_steps
from loraforge.train.checkpoint import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from loraforge.train.config import Config, dump_yaml
from loraforge.train.logging import LOG_NAME, PLOT_NAME, RunLog, peak_memory_bytes
from loraforge.train.optimizers import build_optimizer
from loraforge.train.schedule import build_scheduler
from loraforge.train.checkpointing import decide_checkpointing
from loraforge.train.summary import banner_rows, finish

IGNORE = -100
# Files a run writes into output_dir (``overwrite: true`` removes exactly these).
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md",
             LOG_NAME, PLOT_NAME, "checkpoints", "tensorboard", "base")


@dataclass
class TrainResult:
    model: torch.nn.Module  # the AdapterModel, trained
    tokenizer: object
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # train loss of every step run here
    eval_loss: float | None = None
    interrupted: bool = False


def train(config: Config, *, on_start: Callable | None = None, console=None) -> TrainResult:
    """Run ``config``; ``on_start(adapter_model, tokenizer)`` is called just before step 1."""
    t = config.train
    console = console or Console()
    seed_everything(t.seed)
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config)

    # Data files first: a malformed row fails before the model loads or anything is written.
    train_records, eval_records = build.read_records(config)

    device = pick_device()
    model, tokenizer = build.load_base(config, device=str(device))
    train_set, train_stats = build.tokenize(train_records, tokenizer, config, source=str(config.data.train))
    eval_set = []
    if eval_records:
        eval_set, _ = build.tokenize(eval_records, tokenizer, config, source=str(config.data.eval or config.data.train))

    adapter_model = build.attach_adapter(
        model, config, echo=lambda line: console.print(line, markup=False, highlight=False))
    if t.kernels:
        apply_kernels(adapter_model)  # fused LoRA blocks, norms and the chunked loss; notices where not
    longest = max((len(e["input_ids"]) for e in train_set), default=0)
    checkpointing = decide_checkpointing(t.gradient_checkpointing, getattr(model, "config", None), device,
                                         t.batch_size * longest, 2 if device.type == "cuda" else 4)
    if checkpointing.on:
        enable_gradient_checkpointing(adapter_model)
    params = [p for p in adapter_model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the adapter has no trainable parameters (check adapter.targets)", where="adapter.targets")
    optimizer = build_optimizer(t.optimizer, param_groups(adapter_model, t.weight_decay), lr=t.lr,
                                weight_decay=t.weight_decay)
    n_steps = total_steps(len(train_set), t.batch_size, t.grad_accum, t.steps, t.epochs)
    scheduler = build_scheduler(optimizer, schedule=t.schedule, warmup_steps=t.warmup_steps, total_steps=n_steps)
    hooks = training_hooks(adapter_model, "default", n_steps)

    position = Position(step=0, epoch=0, index=0)
    resume_from = latest_checkpoint(output_dir) if config.resume else None
    if resume_from is not None:
        position = load_checkpoint(resume_from, adapter_model=adapter_model, optimizer=optimizer, scheduler=scheduler,
                                   hooks=hooks)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_yaml(config), encoding="utf-8")

    pad_id = pad_token_id(tokenizer)
    amp = autocast_context(device)
    sampler = StepSampler(len(train_set), batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed,
                          position=position)
    result = TrainResult(adapter_model, tokenizer, output_dir, steps=position.step)
    log = RunLog(output_dir, total_steps=n_steps, start_step=position.step, console=console)
    log.banner(banner_rows(config, adapter_model, device, compute_dtype_name(device), train_set, eval_set, n_steps,
                           optimizer) + [("checkpointing", checkpointing.describe())])
    log.note(train_stats.summary())
    if config.adapter.init == "loftq" and resume_from is None:  # LoftQ's errors, as a step-0 row
        report = adapter_model.configs["default"].report
        plain, loftq = report.totals()
        log.record({"step": 0, "quantization_error": plain, "loftq_error": loftq, "loftq_layers": len(report.rows)})
    if resume_from is not None:
        log.note(f"resumed from {resume_from} (step {position.step}, epoch {position.epoch})")
    elif config.resume:
        log.note(f"resume: no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    if on_start is not None:
        on_start(adapter_model, tokenizer)

    adapter_model.train()
    try:
        run_steps(config, result, adapter_model, train_set, eval_set, sampler, optimizer, scheduler, params,
                  pad_id, device, amp, log, n_steps, hooks)
        for line in hooks.finish():
            log.note(line)
    finally:
        log.close()
    adapter_model.eval()
    finish(result, config, optimizer, log, device)
    return result


def run_steps(config, result, adapter_model, train_set, eval_set, sampler, optimizer, scheduler, params,
              pad_id, device, amp, log, n_steps, hooks: TrainingHooks) -> None:
    """The optimizer steps from the sampler's position to ``n_steps``, evaluating and saving on
    schedule; a Ctrl-C is honoured at the next step boundary by saving a checkpoint."""
    t, output_dir = config.train, result.output_dir
    save = dict(adapter_model=adapter_model, optimizer=optimizer, scheduler=scheduler, hooks=hooks,
                keep_last=t.keep_last)
    stop = InterruptFlag()
    with log, stop:
        while sampler.position.step < n_steps:
            start = time.perf_counter()
            indices = sampler.next_step()
            step = sampler.position.step
            micro_batches = [collate([train_set[i] for i in idx], pad_id, device) for idx in indices]
            seen = sum(len(train_set[i]["input_ids"]) for idx in indices for i in idx)
            lr = scheduler.get_last_lr()[0]
            loss, trained = accumulate_gradients(adapter_model, micro_batches, amp)
            method_logs = {}
            extra = hooks.extra_loss()  # once per optimizer step, already weighted
            if extra is not None:
                extra.backward()
                method_logs["reg_loss"] = extra.item()
            grad_norm = clip_gradients(params, t.max_grad_norm)
            optimizer.step()
            method_logs.update(hooks.after_optimizer_step(step, lr))  # reads .grad: before zero_grad
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss)
            result.steps = step
            log.step(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=seen, trained_tokens=trained,
                     seconds=time.perf_counter() - start, peak_memory=peak_memory_bytes(device), **method_logs)

            if eval_set and t.eval_every and step % t.eval_every == 0 and step < n_steps:
                result.eval_loss = evaluate(adapter_model, eval_set, t.batch_size, pad_id, device, amp, log, step)
            if t.save_every and step % t.save_every == 0:
                save_checkpoint(output_dir, position=sampler.position, **save)
            if stop.requested:
                path = save_checkpoint(output_dir, position=sampler.position, **save)
                log.note(f"interrupted: saved {path}; continue with --resume")
                result.interrupted = True
                raise KeyboardInterrupt
        if eval_set:
            result.eval_loss = evaluate(adapter_model, eval_set, t.batch_size, pad_id, device, amp, log, result.steps)


def param_groups(adapter_model, weight_decay: float) -> list:
    """The trainable parameters for the optimizer: SoRA's gates (``lora_gate``) in a group without
    weight decay (their regulariser is the L1 proximal step; decay would add an L2 term the paper
    does not have), everything else with ``weight_decay``."""
    named = [(n, p) for n, p in adapter_model.named_parameters() if p.requires_grad]
    gates = [p for n, p in named if ".lora_gate." in n]
    rest = [p for n, p in named if ".lora_gate." not in n]
    if not gates or weight_decay == 0:
        return [p for _, p in named]
    return [{"params": rest, "weight_decay": weight_decay}, {"params": gates, "weight_decay": 0.0}]


# --------------------------------------------------------------------------- one step
def accumulate_gradients(model, micro_batches: list[dict], amp) -> tuple[float, int]:
    """Backward every micro-batch's summed token loss / the step's trained-token count.
    Returns (mean loss per trained token, trained tokens)."""
    trained = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    if trained == 0:
        return 0.0, 0  # nothing to learn in this step (the data pipeline drops such rows)
    total = 0.0
    for batch in micro_batches:
        with amp:
            summed = token_loss_sum(model, batch)
        (summed / trained).backward()
        total += summed.item()
    return total / trained, trained


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions (labels shifted by one)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    patch = getattr(model, "_loraforge_kernel_patch", None)
    if patch is not None and patch.count("loss"):
        # chunked head + cross-entropy: no full logits, ignored positions skipped; sum over tokens
        return model(**inputs, labels=batch["labels"], num_items_in_batch=1).loss
    logits = model(**inputs).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip to ``max_norm`` (0: no clipping); returns the total norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device, amp, log: RunLog, step: int) -> float:
    """Mean loss per trained token over ``examples`` (logged with its perplexity)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        with amp:
            total += token_loss_sum(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    log.eval(step=step, loss=loss, tokens=count)
    return loss


# --------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_context(device: torch.device):
    """bf16 autocast on a CUDA device that supports it; full fp32 otherwise."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype_name(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def enable_gradient_checkpointing(adapter_model) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen inputs need no
    requires_grad hook); the KV cache is useless in training and conflicts with it."""
    base = getattr(adapter_model, "model", adapter_model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def pad_token_id(tokenizer) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def collate(examples: list[dict], pad_id: int, device) -> dict:
    """Padded tensors on ``device``; a packed batch's additive mask in the attention's dtype."""
    from loraforge import data

    mask_dtype = torch.bfloat16 if compute_dtype_name(device) != "fp32" else torch.float32
    batch = data.collate(examples, pad_id, mask_dtype=mask_dtype)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_output_dir(output_dir: Path, config: Config) -> None:
    """Refuse to mix two runs in one folder unless resuming or ``overwrite: true``."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UserError("output_dir exists and is not a folder", where=str(output_dir))
    ours = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not ours or config.resume:
        return
    if not config.overwrite:
        raise UserError(
            "output_dir already holds a run; continue it with --resume, replace it with "
            "overwrite=true, or pick another output_dir=...",
            where=str(output_dir),
        )
    for name in ours:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class InterruptFlag:
    """Turns the first Ctrl-C into a request honoured at the next step boundary (so the saved
    state is never half-updated); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
