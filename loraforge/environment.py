"""``loraforge env``: the facts a bug report needs, one per line (paste them into an issue).

Versions come from the installed distributions' metadata (peft, bitsandbytes, triton are never
imported: they are optional, and importing them is slow or prints warnings); only torch is
imported, for the device and thread count.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

PACKAGES = ("loraforge", "torch", "transformers", "safetensors", "gguf", "accelerate", "peft", "bitsandbytes",
            "triton", "llama-cpp-python", "gradio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def version_of(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def folder_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({torch.version.cuda}): {', '.join(names)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} ({os.cpu_count()} logical cores; torch build {torch.__version__})"


def rows() -> list[tuple[str, str]]:
    import torch

    from loraforge.models.cache import cache_root
    from loraforge.train.logging import human_bytes

    cache = cache_root()
    out = [(name, version_of(name)) for name in PACKAGES]
    out += [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("device", device_line()),
        ("threads", f"torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"),
        ("cache", f"{cache} ({human_bytes(folder_size(cache)) if cache.is_dir() else 'empty'})"),
    ]
    return out


def run(args: argparse.Namespace) -> int:
    facts = rows()
    width = max(len(key) for key, _ in facts)
    for key, value in facts:
        print(f"{key:<{width}}  {value}")
    return 0
