"""Checkpoints that resume exactly and never leave a half-written state behind.

A checkpoint ``output_dir/checkpoints/step-000050/`` holds

    adapter/            the adapter in PEFT's format (AdapterModel.save_pretrained); with
                        ``adapter.method: full`` ``model/``, the whole model as a transformers
                        folder (:mod:`loraforge.train.full`)
    trainer_state.pt    the trainable tensors exactly as trained, optimizer and scheduler state,
                        the adapter method's training state (AdaLoRA's importance averages and
                        rank mask; empty for most methods), RNG states (torch, cuda, python,
                        numpy) and the data position (step, epoch, index in that epoch's
                        shuffled order)

It is written into ``checkpoints/.tmp-step-000050``, every file fsynced, and renamed with
``os.replace``, so a directory named ``step-*`` is always complete: a crash while saving leaves
the previous checkpoints untouched and only a ``.tmp-*`` folder, removed by the next save. A
write that fails (a full disk, a quota) removes the ``.tmp-*`` folder and raises a UserError naming
the checkpoint and the previous one, which is intact. After a save only the newest ``keep_last``
checkpoints remain.

Resuming restores the trainable tensors from ``trainer_state.pt`` (bit for bit, whatever dtype
the PEFT export uses), then optimizer, scheduler, method state, RNG states and data position.

With several processes (:mod:`loraforge.train.distributed`) every rank calls save and load;
rank 0 alone writes. The RNG states of all ranks are saved (``rng_ranks``), so resuming with the
same world size continues exactly. Under FSDP the trainable tensors and the optimizer state are
sharded; they are gathered whole to rank 0 (``full_state_dict``) and saved in the same
world-size-free form, and loading hands each rank its shard again, so a run also resumes, not
bit-exactly (other ranks' RNG streams, other float sums), with a different world size. The
adapter and its optimizer state are small (the base is frozen and never saved), so gathering
them costs little and keeps one checkpoint format. Ranks read the checkpoint from the same path:
several machines need a shared ``output_dir``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraforge.errors import UserError
from loraforge.files import describe_os_error, fsync_tree, os_error_in
from loraforge.train.distributed import World, full_tensor
from loraforge.train.full import EXPORT_NAME as FULL_EXPORT_NAME
from loraforge.train.full import FullModel

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where the data stream stands after ``step`` optimizer steps."""

    step: int
    epoch: int
    index: int  # next example's index in the epoch's shuffled order


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole (FSDP shards gathered: a collective, call on every rank)."""
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer, model, world: World) -> dict:
    """The optimizer's state dict; under FSDP the full one, keyed by parameter names, on rank 0."""
    if world.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_adapters(adapter_model) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's PEFT-keyed tensors, whole (FSDP shards gathered: call on every rank).
    A fully fine-tuned model has none: it is written from the live model (never sharded, as
    fsdp trains adapters only)."""
    from loraforge.adapters.io import adapter_tensors

    if isinstance(adapter_model, FullModel):
        return {}
    return {name: {k: full_tensor(v) for k, v in adapter_tensors(adapter_model, name).items()}
            for name in adapter_model.configs}


def write_adapters(adapter_model, directory: Path, adapters: dict[str, dict[str, torch.Tensor]]) -> None:
    """PEFT's layout: ``default`` into ``directory``, other adapters into ``directory/<name>``;
    a fully fine-tuned model as a transformers folder into ``directory``."""
    from loraforge.adapters.io import save_adapter as write

    if isinstance(adapter_model, FullModel):
        adapter_model.save_pretrained(directory)
        return
    for name, tensors in adapters.items():
        write(adapter_model, name, Path(directory) if name == "default" else Path(directory) / name, tensors=tensors)


def export_name(adapter_model) -> str:
    """The checkpoint's subfolder holding what the run exports: ``adapter`` or ``model``."""
    return FULL_EXPORT_NAME if isinstance(adapter_model, FullModel) else "adapter"


def save_adapter(adapter_model, directory: Path, world: World = World()) -> None:
    """The adapter in PEFT's format, written by rank 0 (gathered first, on every rank)."""
    adapters = gathered_adapters(adapter_model)
    if world.is_main:
        write_adapters(adapter_model, directory, adapters)


def save_checkpoint(output_dir: Path, *, adapter_model, optimizer, scheduler, position: Position,
                    keep_last: int, hooks=None, world: World = World()) -> Path:
    """Write the checkpoint of ``position.step`` atomically; prune to ``keep_last``. Every rank
    calls it (the gathering is collective); rank 0 writes, the others wait for it."""
    root = checkpoint_dir(output_dir)
    name = f"step-{position.step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    adapters = gathered_adapters(adapter_model)
    state = {
        "trainable": trainable_state(adapter_model),
        "optimizer": optimizer_state(optimizer, adapter_model, world),
        "scheduler": scheduler.state_dict(),
        "hooks": hooks.state_dict() if hooks is not None else {},
        "rng": rng_state(),
        "rng_ranks": world.gather_objects(rng_state()),
        "position": {"step": position.step, "epoch": position.epoch, "index": position.index},
        "world": {"size": world.size, "mode": world.mode},
    }
    if world.is_main:
        write_checkpoint(output_dir, name, adapter_model, adapters, state, keep_last)
    world.barrier()
    return final


def write_checkpoint(output_dir: Path, name: str, adapter_model, adapters: dict, state: dict, keep_last: int) -> None:
    """Rank 0's part of a save: write into ``.tmp-<name>``, fsync, rename, prune."""
    root = checkpoint_dir(output_dir)
    tmp, final = root / f".tmp-{name}", root / name
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        write_adapters(adapter_model, tmp / export_name(adapter_model), adapters)
        with open(tmp / "trainer_state.pt", "wb") as f:
            torch.save(state, f)
        fsync_tree(tmp)
    except Exception as failure:  # torch.save turns an OSError into a RuntimeError while closing its zip
        shutil.rmtree(tmp, ignore_errors=True)
        err = os_error_in(failure)
        if err is None:
            raise
        previous = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"could not write checkpoint {name}: {describe_os_error(err)}; {kept}; free some space "
                        "and continue with --resume", where=str(root)) from None
    if final.exists():  # the same step saved again (e.g. an interrupt right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, *, adapter_model, optimizer, scheduler, hooks=None,
                    world: World = World()) -> Position:
    """Restore everything saved in ``path`` (``hooks``: the method's training hooks); returns the
    data position to continue from. Every rank reads the same file and keeps its own part."""
    file = Path(path) / "trainer_state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError("the checkpoint has no trainer_state.pt", where=str(path)) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        earlier = [p.name for p in list_checkpoints(Path(path).parent.parent) if p != Path(path)]
        hint = (f"; remove {Path(path).name} to resume from {earlier[-1]}" if earlier else "")
        raise UserError(f"cannot read the checkpoint (truncated or corrupt: {str(err).splitlines()[0][:120]}){hint}",
                        where=str(file)) from None
    params = dict(adapter_model.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing or len(state["trainable"]) != sum(p.requires_grad for p in params.values()):
        raise UserError(
            "checkpoint does not match the configured adapter (changed method, rank or targets?)",
            where=str(path),
        )
    saved_mode = state.get("world", {}).get("mode", "single")
    if world.mode == "fsdp" and saved_mode != "fsdp":
        raise UserError(f"checkpoint was written by a {saved_mode} run, whose optimizer state fsdp cannot "
                        "shard; resume it with train.distributed: ddp or one process", where=str(path))
    with torch.no_grad():
        for n, value in state["trainable"].items():
            copy_into(params[n], value)
    if saved_mode == "fsdp":  # parameter-name keys: any world size, sharded or not
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(adapter_model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if hooks is not None and state.get("hooks"):
        hooks.load_state_dict(state["hooks"])
    ranks = state.get("rng_ranks") or [state["rng"]]
    set_rng_state(ranks[world.rank] if len(ranks) == world.size else ranks[world.rank % len(ranks)])
    return Position(**state["position"])


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param <- value``; a sharded (DTensor) parameter takes its own shard of ``value``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(value)
