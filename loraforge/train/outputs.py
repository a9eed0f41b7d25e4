"""The run's output folder: what a run writes there, and the checks made before anything loads.

A run refuses to mix two runs in one folder (unless resuming or ``overwrite: true``) and proves
the folder can be written before the model loads, so a read-only or forbidden ``output_dir``
costs a second, not a model load and a training run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loraforge.errors import UserError
from loraforge.train.config import Config
from loraforge.train.logging import LOG_NAME, PLOT_NAME

# Files a run writes into output_dir (``overwrite: true`` removes exactly these).
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "README.md",
             LOG_NAME, PLOT_NAME, "checkpoints", "tensorboard", "base",
             # adapter.method: full writes a transformers model folder
             "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def check_output_dir(config: Config) -> None:
    """Raise a UserError naming ``output_dir`` if it holds another run (without resume or
    overwrite) or cannot be written; writes nothing (a probe file is created and removed)."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError("output_dir exists and is not a folder", where=str(output_dir))
    if output_dir.is_dir():
        ours = [name for name in RUN_FILES if (output_dir / name).exists()]
        if ours and not config.resume and not config.overwrite:
            raise UserError(
                "output_dir already holds a run; continue it with --resume, replace it with "
                "overwrite=true, or pick another output_dir=...",
                where=str(output_dir),
            )
    check_writable(output_dir)


def check_writable(folder: Path) -> None:
    """``folder``, or the nearest existing folder above it, accepts a new file."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create output_dir: {existing} is a file, not a folder", where=str(folder))
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".loraforge-probe-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        target = "output_dir" if existing == folder else f"output_dir (its parent {existing})"
        raise UserError(f"{target} cannot be written: {reason}; pick a writable output_dir=...",
                        where=str(folder)) from None


def clear_previous_run(config: Config) -> None:
    """With ``overwrite: true`` (and no resume), remove the files an earlier run left."""
    output_dir = Path(config.output_dir)
    if config.resume or not config.overwrite or not output_dir.is_dir():
        return
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def create_output_dir(config: Config) -> Path:
    output_dir = Path(config.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output_dir: {err.strerror or err}", where=str(output_dir)) from None
    return output_dir

