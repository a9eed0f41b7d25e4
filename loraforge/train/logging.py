"""What a run tells the user: a start banner, a live progress line, evaluation lines and a closing
summary on the console (rich); the same numbers as JSON lines in ``train_log.jsonl``; a loss-curve
PNG (matplotlib, when installed); TensorBoard scalars (when ``tensorboard`` is installed).
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss_curve.png"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RunLog:
    """Console + JSONL (+ TensorBoard) for one run. ``start_step`` > 0 when resuming: the JSONL
    keeps the rows up to that step and continues after them."""

    def __init__(self, output_dir: Path, *, total_steps: int, start_step: int, console: Console | None = None):
        self.console = console or Console()
        self.path = Path(output_dir) / LOG_NAME
        self.total_steps = total_steps
        self._keep_rows_until(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard(Path(output_dir) / "tensorboard")
        self._progress: Progress | None = None
        self._task = None
        self._start_step = start_step
        self._t0 = time.perf_counter()
        self.tokens = 0

    def _keep_rows_until(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    # ------------------------------------------------------------------ console
    def banner(self, rows: list[tuple[str, str]]) -> None:
        table = Table(title="loraforge train", show_header=False, title_justify="left", box=None, padding=(0, 2))
        for key, value in rows:
            table.add_row(f"[bold]{key}[/]", value)
        self.console.print(table)

    def note(self, message: str) -> None:
        self.console.print(message)

    def __enter__(self) -> "RunLog":
        self._t0 = time.perf_counter()
        if not self.console.is_terminal:  # logs and pipes get one plain line per step instead
            return self
        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task("train", total=self.total_steps, completed=self._start_step, stats="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def elapsed(self) -> float:
        """Seconds since the first step started."""
        return time.perf_counter() - self._t0

    # ------------------------------------------------------------------ records
    def step(self, *, step: int, loss: float, lr: float, grad_norm: float, tokens: int, trained_tokens: int,
             seconds: float, peak_memory: int, **method: float) -> None:
        """One optimizer step; ``method`` holds the adapter method's own numbers (AdaLoRA's
        budget and rank, SoRA's lambda, l1 and gates_zero, a regulariser's reg_loss)."""
        self.tokens += tokens
        tps = tokens / seconds if seconds > 0 else 0.0
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
               "trained_tokens": trained_tokens, "tokens_per_s": round(tps, 1),
               "elapsed_s": round(time.perf_counter() - self._t0, 3), "peak_memory_bytes": peak_memory, **method}
        self._write(row)
        stats = (f"loss {loss:.4f}  lr {lr:.2e}  gnorm {grad_norm:.3f}  {tps:,.0f} tok/s  "
                 f"mem {human_bytes(peak_memory)}")
        if method:
            stats += "  " + "  ".join(f"{key} {_short(value)}" for key, value in method.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        else:
            left = (time.perf_counter() - self._t0) / max(step - self._start_step, 1) * (self.total_steps - step)
            self.console.print(f"  step {step}/{self.total_steps}  {stats}  ETA {left:.0f} s", highlight=False,
                               soft_wrap=True)

    def eval(self, *, step: int, loss: float, tokens: int) -> None:
        ppl = math.exp(loss) if loss < 50 else float("inf")
        self._write({"step": step, "eval_loss": loss, "eval_ppl": ppl, "eval_tokens": tokens})
        self.console.print(f"  eval @ step {step}: loss {loss:.4f}  perplexity {ppl:.2f}  ({tokens} tokens)")

    def choice(self, *, step: int, accuracy: float, correct: int, total: int) -> None:
        """Multiple-choice accuracy on ``data.eval_choice``."""
        self._write({"step": step, "choice_accuracy": accuracy, "choice_correct": correct, "choice_total": total})
        self.console.print(f"  choice accuracy @ step {step}: {accuracy:.1%}  ({correct}/{total})")

    def record(self, row: dict[str, Any]) -> None:
        """A row of other numbers (e.g. LoftQ's errors at step 0) for the JSONL and TensorBoard."""
        self._write(row)

    def _write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])


class SilentLog:
    """The log of a rank other than 0: the same calls, nothing printed or written."""

    def banner(self, rows) -> None: ...
    def note(self, message: str) -> None: ...
    def step(self, **row) -> None: ...
    def eval(self, **row) -> None: ...
    def choice(self, **row) -> None: ...
    def record(self, row) -> None: ...
    def close(self) -> None: ...
    def elapsed(self) -> float:
        return 0.0

    def __enter__(self) -> "SilentLog":
        return self

    def __exit__(self, *exc) -> None: ...


def _short(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(output_dir: Path) -> Path | None:
    """Train (and eval) loss against step as a PNG; None when matplotlib is not installed."""
    fig = loss_figure(read_log(Path(output_dir) / LOG_NAME))
    if fig is None:
        return None
    out = Path(output_dir) / PLOT_NAME
    fig.savefig(out)
    return out


def loss_figure(rows: list[dict]):
    """The matplotlib figure of a run's JSONL ``rows``: train and eval loss against step, choice
    accuracy on its own axis; None when matplotlib is not installed. A bare ``Figure`` (no
    pyplot state), so the web UI can draw it live from any thread."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    choice = [(r["step"], r["choice_accuracy"]) for r in rows if "choice_accuracy" in r]
    if choice:  # data.eval_choice: accuracy on its own axis
        acc = ax.twinx()
        acc.plot(*zip(*choice), "s--", color="tab:green", label="choice accuracy", linewidth=1.2)
        acc.set_ylabel("choice accuracy")
        acc.set_ylim(0, 1)
        more_handles, more_labels = acc.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)
    fig.tight_layout()
    return fig
