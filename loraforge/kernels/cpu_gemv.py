"""4-bit decode on CPU at memory speed: a small C kernel built at first use.

    y[m, n] = sum_k x[m, k] * code4[q[n, k]] * absmax[(n * K + k) // blocksize]      (+ bias)

the product of :mod:`loraforge.kernels.gemv4bit` (same storage, see
:mod:`loraforge.kernels.dequant`), for float32 ``x`` on the CPU. A one-token decode reads every
weight once, so it is bound by the bytes read: the kernel streams the packed codes and the
scales (4.127 bits per weight double-quantized) and never writes a float32 weight (32 bits), which
is what the reference (:func:`~loraforge.kernels.gemv4bit.gemv_4bit_reference`: dequantize, then
``F.linear``) does. Block scales (double-quantized ones decompressed on the fly) and the weights
``code * scale`` are the reference's float32 values; only the order of the sum differs.
:func:`dequantize_4bit_cpu` writes the reference's weight bits into a caller's buffer (the large-M
path: one dequantization per call, then one GEMM).

The same library holds the float32 case, :func:`linear_f32_cpu` (``y = x W^T + b`` for a few rows
of ``x``): a decode step's head is a float32 ``[vocab, hidden]`` weight under QLoRA (SmolLM2's
113 MB, a third of a 4-bit step's bytes), which MKL's GEMM reads 2x (one row) to 4x (four rows)
slower than the kernel's single pass; :func:`small_linear` routes a plain ``nn.Linear`` there.

Build: ``csrc/gemv4bit_cpu.c`` is compiled once per source, compiler and CPU with the system C
compiler (``$CC``, else ``cc`` / ``gcc`` / ``clang``) at ``-O3 -march=native`` with OpenMP --
the runtime torch itself loads, so the kernel's threads are torch's (``torch.set_num_threads``)
-- and cached under the loraforge cache (``$LORAFORGE_CACHE``, else ``$XDG_CACHE_HOME/loraforge``,
else ``~/.cache/loraforge``) in ``kernels/``; it is loaded with ``ctypes``. Without a compiler
(or when the build fails) :func:`library` returns ``None`` once, prints one notice, and callers
use the reference. ``LORAFORGE_KERNELS=reference`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from loraforge.kernels.dequant import Packed4bit
from loraforge.kernels.dispatch import mode, notice, unhooked

# at most this many rows of x against a float32 weight go through lf_linear_f32 (MKL 2024 reads
# SmolLM2's 49152 x 576 head slowly at few rows: at 2 threads, 15.0 / 35.3 / 59.9 ms at 1 / 4 / 32
# rows against the kernel's 7.8 / 9.1 / 26.1; measured on the AVX2 VM, 2026-12-03)
F32_MAX_ROWS = 32
# above this many rows of x, dequantize once and use one GEMM: the kernel decodes each weight once
# per 4 rows, so its cost grows with the rows while the GEMM's stays near its fixed dequantization;
# a whole SmolLM2 prefill on 2 cores crossed over at ~48-64 rows with the AVX-512 path and ~40-48
# with the AVX2 path (both measured on one AVX-512 VM, the AVX2 build with -mno-avx512f)
MAX_ROWS = 40
SOURCE = Path(__file__).with_name("csrc") / "gemv4bit_cpu.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99"]

_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cache_dir() -> Path:
    if os.environ.get("LORAFORGE_CACHE"):
        return Path(os.environ["LORAFORGE_CACHE"]).expanduser() / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "loraforge" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags (``-march=native`` code is only valid where they are the same)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, target: Path) -> str:
    """Compile into ``target`` (atomically); '' on success, else the reason."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    reason = ""
    # with OpenMP first; a compiler without it (no libgomp to link) still gives a one-thread kernel
    for extra in (["-fopenmp"], []):
        try:
            run = subprocess.run([cc, *_FLAGS, *extra, str(SOURCE), "-o", tmp],
                                 capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            reason = str(exc)
            continue
        if run.returncode == 0:
            os.replace(tmp, target)
            return ""
        reason = (run.stderr.strip().splitlines() or ["compiler failed"])[-1]
    Path(tmp).unlink(missing_ok=True)
    return reason


@functools.cache
def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        notice("no C compiler found (set CC): 4-bit layers and a decode step's float32 products on CPU use PyTorch (slower decode)")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"gemv4bit_cpu-{key}.so"
    if not target.exists():
        reason = _build(cc, target)
        if reason:
            notice(f"building the 4-bit CPU kernel failed ({reason}): using the PyTorch reference")
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        notice(f"loading the 4-bit CPU kernel failed ({exc}): using the PyTorch reference")
        return None
    lib.lf_gemv4.argtypes = [_P, _P, _I, _I, _P]
    lib.lf_gemv4.restype = ctypes.c_int
    lib.lf_dequant4.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, _I, _P]
    lib.lf_dequant4.restype = None
    lib.lf_dequant4_bf16.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, _I, _P]
    lib.lf_dequant4_bf16.restype = None
    lib.lf_linear_f32.argtypes = [_P, _P, _I, _I, _P, _I, _I, _P]
    lib.lf_linear_f32.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` (turned off, no compiler, failed build)."""
    if mode() == "reference":
        return None
    return _load()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Desc(ctypes.Structure):
    """The C side's ``weight4_desc``: one weight's pointers and sizes."""

    _fields_ = [(name, _P) for name in ("packed", "absmax", "nested", "map8", "offset", "code", "bias", "qabsmax")] + [
        ("n", _I), ("k", _I), ("blocksize", _I)]


def _check_cpu(w: Packed4bit) -> None:
    w.check()
    for name in ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset"):
        t = getattr(w, name)
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous CPU tensor")
    if w.code.dtype != torch.float32 or (w.double_quant and (w.nested_code.dtype != torch.float32
                                                             or w.offset.dtype != torch.float32)):
        raise ValueError("code books and offset must be float32")


class DecodePlan:
    """One weight's kernel call, prepared once: the C descriptor of ``w`` (raw pointers into its
    tensors, which the plan keeps alive) and of ``bias`` (float32 or ``None``). Valid while those
    tensors do not move; :class:`~loraforge.quant.QuantLinear` keeps one per layer and drops it
    when a buffer is replaced. Calling it is ``x @ dequant(w)^T + bias`` for float32 ``x [..., K]``
    with at most :data:`MAX_ROWS` rows (no gradient)."""

    def __init__(self, w: Packed4bit, bias: torch.Tensor | None = None):
        _check_cpu(w)
        if bias is not None:
            bias = bias.detach().to("cpu", torch.float32).contiguous()
        self.n, self.k = w.shape
        self.tensors = (w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset, bias)
        scales = dict(qabsmax=_ptr(w.absmax), nested=_ptr(w.nested_absmax), map8=_ptr(w.nested_code),
                      offset=_ptr(w.offset)) if w.double_quant else dict(absmax=_ptr(w.absmax))
        self.desc = _Desc(packed=_ptr(w.packed), code=_ptr(w.code), bias=_ptr(bias), n=self.n, k=self.k,
                          blocksize=w.blocksize, **scales)
        self.address = ctypes.addressof(self.desc)
        self.call = library().lf_gemv4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        if self.call(self.address, x.data_ptr(), x.numel() // self.k, self.k, y.data_ptr()) != 0:
            raise MemoryError("the 4-bit CPU kernel could not allocate its scratch buffer")
        return y


def gemv_4bit_cpu(x: torch.Tensor, w: Packed4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(w)^T + bias`` for float32 ``x [..., K]`` (no gradient); meant for at most
    :data:`MAX_ROWS` rows (above that, one dequantization and a GEMM are faster)."""
    return DecodePlan(w, bias)(x)


def dequantize_4bit_cpu(w: Packed4bit, out: torch.Tensor) -> torch.Tensor:
    """Write the weight into ``out`` (contiguous, float32 or bfloat16, CPU) with the reference's
    bits: float32 ones, or those rounded to bfloat16 as ``.to(torch.bfloat16)`` rounds them
    (straight from the codes: no float32 copy of the weight is made)."""
    _check_cpu(w)
    if w.double_quant:
        args = (_ptr(w.packed), None, _ptr(w.absmax), _ptr(w.nested_absmax), _ptr(w.nested_code),
                _ptr(w.offset), _ptr(w.code), w.blocksize)
    else:
        args = (_ptr(w.packed), _ptr(w.absmax), None, None, None, None, _ptr(w.code), w.blocksize)
    if (out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous() or out.numel() != w.numel
            or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous float32 or bfloat16 CPU tensor of {w.numel} values")
    fill = library().lf_dequant4 if out.dtype == torch.float32 else library().lf_dequant4_bf16
    fill(w.numel, *args, _ptr(out))
    return out


def linear_f32_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` for float32 CPU ``x [..., K]`` and a contiguous float32 ``weight
    [N, K]`` (nn.Linear's layout; no gradient): every pair of weight rows read once, meant for at
    most :data:`F32_MAX_ROWS` rows of ``x`` (only the order of the sum differs from a BLAS)."""
    n, k = weight.shape
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{name} must be a float32 CPU tensor")
    if not weight.is_contiguous() or x.shape[-1] != k or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"expected a contiguous weight [N, K], x [..., {k}] and bias [{n}]")
    x = x.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    library().lf_linear_f32(weight.data_ptr(), _ptr(bias), n, k, x.data_ptr(), x.numel() // max(k, 1), k,
                            y.data_ptr())
    return y


def small_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``: a plain float32 ``nn.Linear`` on the CPU, with at most :data:`F32_MAX_ROWS`
    rows of float32 ``x`` and no gradient wanted, through :func:`linear_f32_cpu` (a decode step's
    projections and head); anything else (another module, a hook, ``LORAFORGE_KERNELS=reference``, no compiler)
    through its own forward."""
    weight = getattr(module, "weight", None)
    if (type(module) is torch.nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and weight.is_contiguous() and x.dtype == torch.float32 and x.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.float32)
            and 0 < x.numel() <= F32_MAX_ROWS * module.in_features
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and unhooked(module) and library() is not None):
        return linear_f32_cpu(x, weight.detach(), None if module.bias is None else module.bias.detach())
    return module(x)
