"""The training recipe, top to bottom: ``setup`` (seed, data, model, adapter, wrapping for the
processes, optimizer, resume) builds a :class:`Run`; ``fit`` runs its optimizer steps, evaluating
and checkpointing on schedule; ``save`` writes the adapter and the run's files. One process is
the world-size-1 case of the same path (:mod:`loraforge.train.distributed`).

Loss (per optimizer step, over its micro-batches b = 1..A and their trained tokens t)::

    L = sum_b sum_t CE(logits_bt, label_bt) / N,   N = number of trained tokens in the whole step

Each micro-batch backpropagates its summed token loss divided by the step's N (counted before the
first forward), so ``batch_size=8, grad_accum=1`` and ``batch_size=1, grad_accum=8`` produce the
same gradient and update. Dividing each micro-batch by its own token count (the HF Trainer's old
behaviour) over-weights short examples under accumulation. With W processes N is all-reduced
over the ranks before the first backward, and each rank backpropagates ``W * sum / N`` (DDP and
FSDP average gradients over ranks), so W processes with ``batch_size`` compute the update of one
process with ``batch_size * W`` (:mod:`loraforge.train.batches` gives each rank its slice).

Methods that act between steps (AdaLoRA, SoRA; see :mod:`loraforge.adapters.method_hooks`) are
driven here, so no user code has to remember them. Per optimizer step t = 1..T::

    backward of every micro-batch (above); the method's extra loss, once per step (AdaLoRA:
    orth_reg_weight * R), joins the last micro-batch's loss (one backward, so DDP's single
    gradient all-reduce per step covers it; every rank adds the same term, the average keeps it)
    clip; optimizer step
    method step with the lr of step t, before zero_grad (AdaLoRA: importance from the gradients,
    budget, masking; SoRA: the proximal soft-threshold of the gates)
    scheduler step; zero_grad

The extra loss is a property of the weights, not of the data, so it enters each step once, with
its weight, whatever the accumulation: the same total as PEFT under the HF Trainer, where every
micro-batch's loss carries it and the step averages the micro-batches. The method's state (AdaLoRA's importance averages and mask)
goes into every checkpoint, so a resumed run continues exactly. Under DDP the method step reads
the all-reduced gradients, identical on every rank, so AdaLoRA's masks and SoRA's gates stay
identical across ranks.

Rank 0 alone prints, logs and writes; every rank takes part in the collectives (gradient sync,
token counts, gathering the adapter for saving). A Ctrl-C on any rank stops all of them at the
same step boundary (the stop flag is summed over the ranks each step).
"""

from __future__ import annotations

import random
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
from loraforge.train import build, distributed
from loraforge.train.batches import StepSampler, total_steps
from loraforge.train.checkpoint import (
    Position,
    latest_checkpoint,
    gathered_adapters,
    load_checkpoint,
    save_checkpoint,
)
from loraforge.train.config import Config, dump_yaml
from loraforge.train.distributed import World
from loraforge.train.logging import RunLog, SilentLog, peak_memory_bytes
from loraforge.train.outputs import check_output_dir, clear_previous_run, create_output_dir
from loraforge.train.optimizers import build_optimizer
from loraforge.train.schedule import build_scheduler
from loraforge.train.checkpointing import decide_checkpointing
from loraforge.train.precision import Precision, decide_precision
from loraforge.train.summary import banner_rows, finish, world_rows

IGNORE = -100


@dataclass
class TrainResult:
    model: torch.nn.Module  # the AdapterModel, trained
    tokenizer: object
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # train loss of every step run here
    eval_loss: float | None = None
    choice_accuracy: float | None = None  # on data.eval_choice, at the last evaluation
    interrupted: bool = False


@dataclass
class Run:
    """Everything a run holds once set up (the recipe's state)."""

    config: Config
    world: World
    device: torch.device
    precision: Precision  # train.dtype, decided for this device
    model: torch.nn.Module  # the AdapterModel (sharded in place under FSDP)
    engine: torch.nn.Module  # what forward and backward run through: model, or DDP(model)
    tokenizer: object
    train_set: list[dict]
    eval_set: list[dict]
    choice_items: list  # data.eval_choice rows (loraforge.infer.choice.ChoiceItem)
    params: list[torch.Tensor]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: object
    hooks: TrainingHooks
    sampler: StepSampler
    n_steps: int
    pad_id: int
    log: RunLog | SilentLog
    result: TrainResult

    @property
    def amp(self):
        """The context every forward of the run (training, evaluation) runs in."""
        return self.precision.autocast(self.device)


def train(config: Config, *, on_start: Callable | None = None, console=None) -> TrainResult:
    """Run ``config``; ``on_start(adapter_model, tokenizer)`` is called just before step 1.

    Launched by torchrun, this process is one rank of the run; otherwise the only one. Under
    FSDP the returned model holds this rank's shards (the saved adapter is whole)."""
    console = console or Console()
    records = read_inputs(config)  # bad input fails here, alike on every rank, before any collective
    world = distributed.start(config.train.distributed)
    try:
        run = setup(config, world, records, console)
        if on_start is not None:
            on_start(run.model, run.tokenizer)
        try:
            fit(run)
        finally:
            run.log.close()
        save(run)
    finally:
        distributed.stop(world)
    return run.result


# --------------------------------------------------------------------------- setup
def read_inputs(config: Config) -> tuple[list[dict], list[dict], list]:
    """Check output_dir (another run there, or not writable) and read the data files (train, eval,
    ``data.eval_choice``): a malformed row fails before the model loads or anything is written."""
    check_output_dir(config)
    return (*build.read_records(config), build.read_choice_items(config))


def setup(config: Config, world: World, records: tuple[list[dict], list[dict]], console) -> Run:
    """Model, adapter, data, optimizer and position, identical on every rank but the data slice."""
    t = config.train
    seed_everything(t.seed)  # the same on every rank: the same adapter initialisation
    device = distributed.device_of(world)
    precision = decide_precision(t.dtype, device)
    model, tokenizer = build.load_base(config, device=str(device),
                                       dtype=precision.base_dtype(trains_base=config.adapter.method == "full"))
    train_records, eval_records, choice_items = records
    train_set, train_stats = build.tokenize(train_records, tokenizer, config, source=str(config.data.train))
    eval_set = []
    if eval_records:
        eval_set, _ = build.tokenize(eval_records, tokenizer, config, source=str(config.data.eval or config.data.train))

    echo = (lambda line: console.print(line, markup=False, highlight=False)) if world.is_main else (lambda line: None)
    adapter_model = build.attach_adapter(model, config, echo=echo)
    if t.kernels:
        apply_kernels(adapter_model)  # fused LoRA blocks, norms and the chunked loss; notices where not
    longest = max((len(e["input_ids"]) for e in train_set), default=0)
    checkpointing = decide_checkpointing(t.gradient_checkpointing, getattr(model, "config", None), device,
                                         t.batch_size * longest, precision.activation_bytes)
    if checkpointing.on:
        enable_gradient_checkpointing(adapter_model)
    if not any(p.requires_grad for p in adapter_model.parameters()):
        raise UserError("the adapter has no trainable parameters (check adapter.targets)", where="adapter.targets")
    engine = distributed.wrap(adapter_model, world)  # before the optimizer: FSDP replaces the parameters
    params = [p for p in adapter_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(t.optimizer, param_groups(adapter_model, t.weight_decay), lr=t.lr,
                                weight_decay=t.weight_decay)
    n_steps = total_steps(len(train_set), t.batch_size, t.grad_accum, t.steps, t.epochs, world.size)
    scheduler = build_scheduler(optimizer, schedule=t.schedule, warmup_steps=t.warmup_steps, total_steps=n_steps)
    hooks = training_hooks(adapter_model, "default", n_steps)

    seed_everything(t.seed + world.rank)  # each rank its own dropout stream from here on
    output_dir = Path(config.output_dir)
    position = Position(step=0, epoch=0, index=0)
    resume_from = latest_checkpoint(output_dir) if config.resume else None
    resume_from = world.broadcast_object(resume_from)  # rank 0's view of the folder decides
    if resume_from is not None:
        position = load_checkpoint(resume_from, adapter_model=adapter_model, optimizer=optimizer,
                                   scheduler=scheduler, hooks=hooks, world=world)
    if world.is_main:  # the earlier run's files (overwrite: true) go now, by rank 0 alone
        clear_previous_run(config)
        create_output_dir(config)
        (output_dir / "config.yaml").write_text(dump_yaml(config), encoding="utf-8")

    sampler = StepSampler(len(train_set), batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed,
                          position=position, world_size=world.size, rank=world.rank)
    log = (RunLog(output_dir, total_steps=n_steps, start_step=position.step, console=console)
           if world.is_main else SilentLog())
    shards = base_shards(world, adapter_model)
    log.banner(banner_rows(config, adapter_model, device, precision.describe(), train_set, eval_set, n_steps,
                           optimizer, world_size=world.size) + world_rows(world, shards)
               + [("checkpointing", checkpointing.describe())])
    if shards is not None and resume_from is None:
        log.record({"step": 0, "base_bytes_per_rank": shards[0], "base_bytes": shards[1]})
    log.note(train_stats.summary())
    if config.adapter.init == "loftq" and resume_from is None:  # LoftQ's errors, as a step-0 row
        report = adapter_model.configs["default"].report
        plain, loftq = report.totals()
        log.record({"step": 0, "quantization_error": plain, "loftq_error": loftq, "loftq_layers": len(report.rows)})
    if resume_from is not None:
        log.note(f"resumed from {resume_from} (step {position.step}, epoch {position.epoch})")
    elif config.resume:
        log.note(f"resume: no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
    result = TrainResult(adapter_model, tokenizer, output_dir, steps=position.step)
    return Run(config=config, world=world, device=device, precision=precision, model=adapter_model,
               engine=engine, tokenizer=tokenizer, train_set=train_set, eval_set=eval_set, choice_items=choice_items, params=params,
               optimizer=optimizer, scheduler=scheduler, hooks=hooks, sampler=sampler, n_steps=n_steps,
               pad_id=pad_token_id(tokenizer), log=log, result=result)


def base_shards(world: World, adapter_model) -> tuple[list[int], int] | None:
    """Under FSDP: (packed 4-bit base bytes held by each rank, bytes of the whole base)."""
    if world.mode != "fsdp":
        return None
    from loraforge.train.fsdp import base_bytes

    local, total = base_bytes(adapter_model)
    return world.gather_objects(local), total


# --------------------------------------------------------------------------- train
def fit(run: Run) -> None:
    """The optimizer steps from the sampler's position to ``n_steps``, evaluating and saving on
    schedule; a Ctrl-C is honoured at the next step boundary by saving a checkpoint."""
    t, result = run.config.train, run.result
    stop = InterruptFlag()
    run.model.train()
    with run.log, stop:
        while run.sampler.position.step < run.n_steps:
            step = train_step(run)
            if t.eval_every and step % t.eval_every == 0 and step < run.n_steps:
                evaluate_run(run, step)
            if t.save_every and step % t.save_every == 0:
                save_state(run)
            if run.world.sum([float(stop.requested)])[0] > 0:  # any rank's Ctrl-C stops all
                path = save_state(run)
                run.log.note(f"interrupted: saved {path}; continue with --resume")
                result.interrupted = True
                raise KeyboardInterrupt
        evaluate_run(run, result.steps)
    for line in run.hooks.finish():
        run.log.note(line)
    run.model.eval()


def train_step(run: Run) -> int:
    """One optimizer step on this rank's slice of the global batch; returns its number."""
    start = time.perf_counter()
    indices = run.sampler.next_step()
    step = run.sampler.position.step
    examples = [[run.train_set[i] for i in idx] or [filler(run.train_set[0])] for idx in indices]
    micro_batches = [collate(ex, run.pad_id, run.device, run.precision.mask_dtype) for ex in examples]
    lr = run.scheduler.get_last_lr()[0]
    method_logs = {}
    extra = run.hooks.extra_loss()  # once per optimizer step, already weighted
    if extra is not None:
        method_logs["reg_loss"] = extra.item()
    loss, trained = accumulate_gradients(run.engine, micro_batches, run.amp, world=run.world, extra=extra)
    grad_norm = clip_gradients(run.params, run.config.train.max_grad_norm)
    run.optimizer.step()
    method_logs.update(run.hooks.after_optimizer_step(step, lr))  # reads .grad: before zero_grad
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    seen = sum(len(run.train_set[i]["input_ids"]) for idx in indices for i in idx)
    memory = [0.0] * run.world.size
    memory[run.world.rank] = peak_memory_bytes(run.device)
    seen, *memory = run.world.sum([seen, *memory])  # one all-reduce: global tokens, each rank's peak
    run.result.losses.append(loss)
    run.result.steps = step
    run.log.step(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=int(seen), trained_tokens=trained,
                 seconds=time.perf_counter() - start, peak_memory=int(memory[0]), **method_logs)
    if run.world.size > 1:
        run.log.record({"step": step, "peak_memory_per_rank": [int(m) for m in memory]})
    return step


def save_state(run: Run) -> Path:
    return save_checkpoint(run.result.output_dir, adapter_model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, hooks=run.hooks, position=run.sampler.position,
                           keep_last=run.config.train.keep_last, world=run.world)


def evaluate_run(run: Run, step: int) -> None:
    """Eval loss on ``data.eval`` and choice accuracy on ``data.eval_choice``, whichever are given."""
    if run.eval_set:
        run.result.eval_loss = evaluate(run.model, run.eval_set, run.config.train.batch_size, run.pad_id, run.device,
                                        run.precision, run.log, step, world=run.world)
    if run.choice_items:
        run.result.choice_accuracy = evaluate_choice(run, step)


@torch.no_grad()
def evaluate_choice(run: Run, step: int) -> float:
    """Multiple-choice accuracy (the answer letter's log-likelihood after MMLU's prompt, as QLoRA's
    ``--do_mmlu_eval``), computed by every rank alike (FSDP needs all of them in each forward)."""
    from loraforge.infer.choice import choice_accuracy

    was_training = run.model.training
    run.model.eval()
    with run.amp:
        result = choice_accuracy(run.model, run.tokenizer, run.choice_items, pad_id=run.pad_id,
                                 batch_size=run.config.train.batch_size)
    run.model.train(was_training)
    accuracy = result.correct / max(result.total, 1)
    run.log.choice(step=step, accuracy=accuracy, correct=result.correct, total=result.total)
    return accuracy


# --------------------------------------------------------------------------- save
def save(run: Run) -> None:
    """The adapter (gathered whole under FSDP) and, on rank 0, tokenizer, plot and model card."""
    adapters = gathered_adapters(run.model)  # collective under FSDP
    if run.world.is_main:
        finish(run.result, run.config, run.optimizer, run.log, run.device, adapters)
    run.world.barrier()


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
def accumulate_gradients(model, micro_batches: list[dict], amp, *, world: World = World(),
                         extra: torch.Tensor | None = None) -> tuple[float, int]:
    """Backward every micro-batch's summed token loss x world size / the global step's
    trained-token count (summed over the ranks before the first backward); ``extra`` (the
    method's once-per-step loss) joins the last micro-batch. Returns (mean loss per trained
    token over the global step, its trained tokens)."""
    local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro_batches)
    (trained,) = world.sum([local])
    trained = int(trained)
    if trained == 0:
        return 0.0, 0  # nothing to learn in this step (the data pipeline drops such rows)
    total = 0.0
    for k, batch in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with distributed.gradient_sync(model, world, enabled=last):
            with amp:
                summed = token_loss_sum(model, batch)
            loss = summed / (trained / world.size)  # world size 1: summed / trained, as ever
            if last and extra is not None:
                loss = loss + extra
            loss.backward()
        total += summed.item()
    (total,) = world.sum([total])
    return total / trained, trained


def filler(example: dict) -> dict:
    """A micro-batch for a rank whose slice of a short last step is empty: a real example with
    every label ignored, so its loss is 0 and its gradient zero, but the pass (and its
    collectives) happens on every rank."""
    return {**example, "labels": [IGNORE] * len(example["labels"])}


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions (labels shifted by one)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    patch = getattr(getattr(model, "module", model), "_loraforge_kernel_patch", None)  # DDP holds it in .module
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
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device, precision: Precision, log: RunLog, step: int,
             *, world: World = World()) -> float:
    """Mean loss per trained token over ``examples`` (logged with its perplexity). With several
    ranks batch i runs on rank i mod W (each rank the same number of forwards, with fillers) and
    the sums are all-reduced."""
    was_training = model.training
    model.eval()
    starts = list(range(0, len(examples), batch_size))
    rounds = -(-len(starts) // world.size)
    total, count = 0.0, 0
    for r in range(rounds):
        i = r * world.size + world.rank
        chunk = examples[starts[i] : starts[i] + batch_size] if i < len(starts) else [filler(examples[0])]
        batch = collate(chunk, pad_id, device, precision.mask_dtype)
        with precision.autocast(device):
            total += token_loss_sum(model, batch).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train(was_training)
    total, count = world.sum([total, count])
    loss = total / max(count, 1)
    log.eval(step=step, loss=loss, tokens=int(count))
    return loss


# --------------------------------------------------------------------------- set-up helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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


def collate(examples: list[dict], pad_id: int, device, mask_dtype: torch.dtype) -> dict:
    """Padded tensors on ``device``; a packed batch's additive mask in the attention's dtype."""
    from loraforge import data

    batch = data.collate(examples, pad_id, mask_dtype=mask_dtype)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
