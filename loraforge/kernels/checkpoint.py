"""Activation (gradient) checkpointing per decoder layer (Chen et al., 2016, arXiv:1604.06174),
with optional offload of the saved layer inputs to pinned CPU memory.

Forward runs each decoder layer without recording a graph and keeps only its input hidden
state (``[B, S, H]``); backward brings that input back, re-runs the layer with grad enabled
(under the forward's autocast state, with its RNG state restored so that dropout repeats) and
back-propagates through it (only the re-run's graph is used, never its output values). Memory for
activations is one hidden state per layer plus one layer's full activations at a time. With
``offload=True`` the saved input of a CUDA layer is copied to pinned host memory (asynchronous
copy on the current stream) and copied back in backward: the GPU then keeps no per-layer
activations at all, at the price of two PCIe transfers of ``B S H`` elements per layer. On CPU
tensors offloading changes nothing.

:func:`enable_checkpointing` installs this on every transformers ``GradientCheckpointingLayer``
of a model through transformers' own hook (``layer.gradient_checkpointing`` and
``layer._gradient_checkpointing_func``, which the layer calls as ``func(forward, *args)`` while
training with grad enabled, after dropping caches); :func:`disable_checkpointing` undoes it.
The function is reentrant-style: it takes a zero-size dummy input that requires grad so that
backward reaches the layer even when the hidden states do not require grad (frozen
embeddings), and it accumulates the LoRA parameters' gradients directly, as PyTorch's reentrant
checkpoint does.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import nn

_STATE = threading.local()


def in_recompute() -> bool:
    """True while :class:`CheckpointFunction` re-runs a layer in backward. Only the graph of that
    re-run matters, not the value of the layer's output; the fused MLP uses this to skip the base
    ``down_proj`` matmul, whose result a Llama decoder layer only adds to its output (see
    :mod:`loraforge.kernels.lora_mlp`)."""
    return getattr(_STATE, "recompute", False)


@contextlib.contextmanager
def _recomputing():
    before = in_recompute()
    _STATE.recompute = True
    try:
        yield
    finally:
        _STATE.recompute = before


def _offload(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    return host


class CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_fn, offload: bool, dummy: torch.Tensor, *args):
        ctx.run_fn = run_fn
        ctx.devices = [a.device for a in args if isinstance(a, torch.Tensor)]
        ctx.requires = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda = any(d.type == "cuda" for d in ctx.devices)
        ctx.cuda_rng = torch.cuda.get_rng_state() if ctx.cuda else None
        ctx.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)]
        ctx.saved = [
            (_offload(a) if offload and a.is_cuda else a.detach()) if isinstance(a, torch.Tensor) else a for a in args
        ]
        with torch.no_grad():
            out = run_fn(*args)
        return out if isinstance(out, tuple) else (out,)

    @staticmethod
    def backward(ctx, *grads):
        inputs, devices = [], iter(ctx.devices)
        for a, req in zip(ctx.saved, ctx.requires):
            if isinstance(a, torch.Tensor):
                a = a.to(next(devices), non_blocking=True).detach().requires_grad_(req)
            inputs.append(a)
        ctx.saved = None
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if ctx.cuda else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            with contextlib.ExitStack() as stack:
                for device, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device_type=device, dtype=dtype))
                stack.enter_context(torch.enable_grad())
                stack.enter_context(_recomputing())
                out = ctx.run_fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        in_grads = [a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in inputs]
        return None, None, None, *in_grads


def checkpoint(run_fn, *args, offload: bool = False):
    """``run_fn(*args)`` checkpointed (see the module docstring); returns what ``run_fn`` returns."""
    returned_tuple = []

    def run(*inputs):
        out = run_fn(*inputs)
        returned_tuple[:] = [isinstance(out, tuple)]
        return out

    dummy = torch.empty(0, requires_grad=True)
    out = CheckpointFunction.apply(run, offload, dummy, *args)
    return out if returned_tuple[0] else out[0]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if hasattr(type(m), "gradient_checkpointing") and type(m).__name__.endswith("DecoderLayer")]


def enable_checkpointing(model: nn.Module, offload: bool = False, skip_last: bool = True) -> int:
    """Checkpoint the decoder layers of ``model`` (transformers layers); returns how many.

    ``skip_last``: the last layer is not checkpointed. Its re-run would start right after its
    forward, at the beginning of backward, so checkpointing it saves no peak memory and costs
    one layer's forward."""
    func = functools.partial(checkpoint, offload=offload)
    layers = _decoder_layers(model)
    for module in layers[:-1] if skip_last else layers:
        module.gradient_checkpointing = True
        module._gradient_checkpointing_func = func
    return len(layers) - 1 if skip_last and layers else len(layers)


def disable_checkpointing(model: nn.Module) -> None:
    for module in _decoder_layers(model):
        module.gradient_checkpointing = False
