"""``train.dtype``: the precision a run computes in (``auto``, ``bf16`` or ``fp32``).

``bf16`` is mixed precision as QLoRA trains (Dettmers et al. 2023, arXiv:2305.14314, sec. 3:
"bfloat16 as computation data type"): the frozen base is held in bfloat16 (a 4-bit base
dequantizes into bfloat16), the matmuls run under ``torch.autocast(dtype=bfloat16)``, and
everything trained -- the adapters, their gradients and the optimizer state -- stays float32
(Micikevicius et al. 2018, arXiv:1710.03740: float32 master weights). A float32 base weight
would be cast to bfloat16 on every call under autocast (autocast caches casts only of weights
that require grad), so the base is loaded in bfloat16 once instead; that also halves its memory.
``adapter.method: full`` trains the base itself, so there the base stays float32 (the master
weights) and only the matmuls run in bfloat16.

``auto`` picks ``bf16`` where the hardware multiplies bfloat16 natively -- a CUDA device with
bf16 support, or a CPU with AVX512-BF16 or AMX-BF16 (oneDNN then runs the projections' GEMMs
at about twice the float32 rate: 160-196 against 54-90 GFLOP/s on one core of a Zen 4 VM for
SmolLM2's shapes at 512 rows) -- and ``fp32`` elsewhere, where bfloat16 would be emulated and
slower. This is axolotl's ``bf16: auto``; on a CPU, transformers' ``Trainer`` and
LLaMA-Factory leave bf16 off unless asked. ``fp32`` keeps the checkpoint's own dtype for the base
(float32 for a GGUF file) and turns autocast off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation value autograd keeps (the checkpointing estimate's unit)."""
        return 2 if self.bf16 else 4

    @property
    def mask_dtype(self) -> torch.dtype:
        """The dtype of a packed batch's additive attention mask (the attention's dtype)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def base_dtype(self, trains_base: bool) -> torch.dtype | None:
        """The dtype to load the base in: bfloat16 for a frozen base under bf16; None (the
        checkpoint's own) otherwise."""
        return torch.bfloat16 if self.bf16 and not trains_base else None

    def autocast(self, device: torch.device):
        """The context every forward of the run (training, evaluation) runs in."""
        if self.bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.name}   ({self.reason})"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` multiplies bfloat16 in hardware, what was found)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    if device.type == "cpu":
        caps = cpu_capabilities()
        found = [name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)]
        if found:
            return True, f"this CPU has {found[0].upper().replace('_', '-')}"
        return False, "this CPU has no AVX512-BF16 / AMX-BF16"
    return False, f"no bf16 check for device type {device.type!r}"


def cpu_capabilities() -> dict:
    """torch's CPU feature flags (empty when this torch cannot tell)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return dict(get()) if get is not None else {}
    except Exception:  # a torch build without cpuinfo: no flags, so no native bf16 assumed
        return {}


def decide_precision(setting: str, device: torch.device) -> Precision:
    """The run's precision for ``train.dtype`` (validated against ``config.PRECISIONS``)."""
    if setting == "fp32":
        return Precision(False, "train.dtype: fp32")
    native, found = native_bf16(device)
    if setting == "bf16":
        return Precision(True, "train.dtype: bf16" + ("" if native else f"; {found}: emulated, slower than fp32"))
    if native:
        return Precision(True, f"auto: {found}")
    return Precision(False, f"auto: {found}")
