"""Training runs started from the web UI: each is a ``python -m loraforge train CONFIG.yaml``
subprocess (``--resume`` to continue one), watched through the run's own ``train_log.jsonl``.

Stop sends SIGINT, exactly what Ctrl-C sends: the run finishes its optimizer step, saves a
checkpoint and exits (``loraforge.train.loop.InterruptFlag``); Resume starts the same config
with ``resume: true``. One server never runs two processes into one output folder (a lock around
the table of runs, keyed by the resolved folder); beyond that, ``loraforge train``'s own check
(another run's files in ``output_dir``) refuses as it does on the command line.

Progress (step, loss, lr, tokens/s, memory, ETA) comes from the JSONL rows; the total number of
steps from the run's console line (``step N/T``), which is kept in a file beside the config.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import UserError
from loraforge.train.logging import LOG_NAME, human_bytes, read_log

STEP_LINE = re.compile(r"step (\d+)/(\d+)")


@dataclass
class RunProcess:
    output_dir: Path
    config_file: Path
    console_file: Path
    process: subprocess.Popen
    resumed: bool = False
    stop_requested: bool = False
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def state(self) -> str:
        code = self.process.poll()
        if code is None:
            return "stopping (finishing the step, saving a checkpoint)" if self.stop_requested else "running"
        if code == 0:
            return "finished"
        if code == 130:  # loraforge train's exit status after Ctrl-C
            if "interrupted: saved" in self.console(lines=400):
                return "stopped: checkpoint saved, Resume continues it"
            return "stopped before the first step (nothing saved)"
        return f"failed (exit status {code}; see the console below)"

    def console(self, lines: int = 40) -> str:
        try:
            text = self.console_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Runs:
    """The runs this server started, one per output folder."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self._lock = threading.Lock()
        self._runs: dict[str, RunProcess] = {}

    def get(self, output_dir: str | Path) -> RunProcess | None:
        return self._runs.get(_key(output_dir))

    def start(self, yaml_text: str, output_dir: str | Path, *, resume: bool = False) -> RunProcess:
        """Write the config and start ``loraforge train`` on it; refuses a folder one of this
        server's runs is still writing."""
        key = _key(output_dir)
        with self._lock:
            current = self._runs.get(key)
            if current is not None and current.running:
                raise UserError(f"a run started from this web UI (process {current.process.pid}) is writing into "
                                "this output_dir; stop it first, or pick another output_dir", where="output_dir")
            config_file = self.write_config(yaml_text, key)
            console_file = config_file.with_suffix(".console.txt")
            command = [sys.executable, "-m", "loraforge", "train", str(config_file)]  # resume: in the YAML
            with open(console_file, "w", encoding="utf-8") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"},
                                           preexec_fn=_default_sigint)
            run = RunProcess(Path(key), config_file, console_file, process, resumed=resume)
            self._runs[key] = run
            return run

    def write_config(self, yaml_text: str, output_dir: str | Path) -> Path:
        """The resolved config as a file under ``workdir/configs`` (named after the run's folder
        and the time): the one the run reads, and the one the download hands out."""
        folder = self.workdir / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{Path(_key(output_dir)).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        file, n = folder / f"{stem}.yaml", 1
        while file.exists():
            n += 1
            file = folder / f"{stem}-{n}.yaml"
        file.write_text(yaml_text, encoding="utf-8")
        return file

    def stop(self, output_dir: str | Path) -> RunProcess:
        """SIGINT, as Ctrl-C: the run saves a checkpoint at the end of its step and exits."""
        run = self.get(output_dir)
        if run is None or not run.running:
            raise UserError("no run of this web UI is running into this output_dir", where="output_dir")
        run.stop_requested = True
        run.process.send_signal(signal.SIGINT)
        return run

    def stop_all(self, timeout: float = 60.0) -> None:
        """On server exit: every running run stops as after Ctrl-C (checkpoint saved)."""
        running = [r for r in self._runs.values() if r.running]
        for run in running:
            run.stop_requested = True
            run.process.send_signal(signal.SIGINT)
        for run in running:
            try:
                run.process.wait(timeout)
            except subprocess.TimeoutExpired:
                run.process.kill()


def _default_sigint() -> None:
    """In the child: Ctrl-C's default meaning, even when the server was started with SIGINT
    ignored (a background job), so Stop works from the first moment of the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _key(output_dir: str | Path) -> str:
    return str(Path(output_dir).expanduser().resolve())


# --------------------------------------------------------------------------- progress
@dataclass
class Progress:
    step: int = 0
    total: int | None = None
    rows: list[dict] = field(default_factory=list)
    line: str = ""  # the one-line summary shown above the plot


def progress(output_dir: str | Path, run: RunProcess | None) -> Progress:
    """The latest numbers of the run in ``output_dir`` (its JSONL log; the console for T)."""
    rows = read_log(Path(output_dir) / LOG_NAME) if Path(output_dir).is_dir() else []
    steps = [r for r in rows if "loss" in r]
    total = None
    if run is not None:
        found = STEP_LINE.findall(run.console(lines=400))
        total = int(found[-1][1]) if found else None
    state = run.state() if run is not None else ("a run's log" if steps else "no run yet")
    if not steps:
        return Progress(0, total, rows, f"**{state}**")
    last = steps[-1]
    of = f"/{total}" if total else ""
    parts = [f"**{state}**", f"step {last['step']}{of}", f"loss {last['loss']:.4f}", f"lr {last['lr']:.2e}",
             f"{last.get('tokens_per_s', 0):,.0f} tokens/s", f"memory {human_bytes(last.get('peak_memory_bytes', 0))}"]
    eta = _eta(steps, total)
    if eta is not None and run is not None and run.running:
        parts.append(f"ETA {eta:.0f} s")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
    return Progress(last["step"], total, rows, " · ".join(parts))


def _eta(steps: list[dict], total: int | None) -> float | None:
    """Seconds left: the mean step time of this process's rows (elapsed_s restarts on resume)."""
    if not total or not steps:
        return None
    segment = [steps[-1]]
    for row in reversed(steps[:-1]):
        if row.get("elapsed_s", 0) > segment[0].get("elapsed_s", 0):
            break
        segment.insert(0, row)
    first, last = segment[0], segment[-1]
    n = last["step"] - first["step"] + 1
    per_step = last.get("elapsed_s", 0) / n if n else 0
    return per_step * (total - last["step"])
