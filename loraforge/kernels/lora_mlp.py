"""Fused SwiGLU MLP with LoRA on gate, up and down (the Llama MLP; LoRA: arXiv:2106.09685,
SwiGLU: arXiv:2002.05202):

    g = x Wg^T + sg (x Ag^T) Bg^T     u = x Wu^T + su (x Au^T) Bu^T     h = silu(g) * u
    y = h Wd^T + sd (h Ad^T) Bd^T

Forward keeps ``x``, ``g``, ``u``, ``x [Ag; Au]^T`` and ``h Ad^T``; ``h`` is recomputed from ``g``
and ``u`` in backward (one elementwise pass) instead of being stored. Backward (hand-written):

    dh = dy Wd + sd (dy Bd) Ad        dBd = sd dy^T (h Ad^T)       dAd = sd (dy Bd)^T h
    dg, du = swiglu'(dh, g, u)        (written over g and u, which are dead by then)
    dx = dg Wg + du Wu + [sg dg Bg, su du Bu] [Ag; Au]        and dA, dB of gate and up likewise

Inside a checkpointed layer's re-run in backward (:func:`loraforge.kernels.checkpoint.in_recompute`)
the base ``h Wd^T`` is skipped (a quarter of a Llama layer's matmul work in that pass): a Llama
decoder layer only adds the MLP output to its residual, so the backward needs the re-run's graph
and saved tensors but never the value of ``y``; the output is then a zero-filled placeholder
(``skip_output``). Only :func:`fused_mlp_forward` on Llama-family layers (what ``apply_kernels``
patches) turns this on.

Base weights are dense or quantized (dequantized into a reused buffer before each matmul). The
elementwise SwiGLU runs in Triton where :func:`~loraforge.kernels.dispatch.use_triton` says so.
"""

from __future__ import annotations

import torch

from loraforge.kernels.checkpoint import in_recompute
from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.lora_linear import (
    LoraSpec,
    autocast_off,
    compute_dtype,
    lora_spec,
    lora_tensors,
    project,
    project_backward,
)
from loraforge.kernels.swiglu import (
    swiglu_backward_reference,
    swiglu_backward_triton,
    swiglu_forward_triton,
    swiglu_reference,
)


def _swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return swiglu_forward_triton(g, u) if use_triton(g) else swiglu_reference(g, u)


class LoRAMLPFunction(torch.autograd.Function):
    """``y = mlp(x)`` for specs ``(gate, up, down)``; gradients for ``x`` and every LoRA A, B
    (gate's and up's first, then down's, in :func:`lora_tensors` order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: list[LoraSpec], skip_output: bool, *params: torch.Tensor):
        gate, up, down = specs
        with autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
            (g, u), xa = project(x2, [gate, up])
            h = _swiglu(g, u)
            if skip_output:
                ha = h @ down.A.to(h.dtype).t() if down.A is not None else None
                y = x2.new_zeros(1).expand(x2.shape[0], down.out_features)
            else:
                (y,), ha = project(h, [down])
        ctx.save_for_backward(x2, g, u, xa, ha)
        ctx.specs, ctx.shape, ctx.in_dtype = specs, x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, g, u, xa, ha = ctx.saved_tensors
        gate, up, down = ctx.specs
        dy = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        h = _swiglu(g, u)
        dh, grads_down = project_backward([dy], h, ha, [down])
        del h
        if use_triton(dh):
            dg, du = swiglu_backward_triton(dh, g, u, dg=g, du=u)
        else:
            dg, du = swiglu_backward_reference(dh, g, u)
        del dh
        dx, grads_gu = project_backward([dg, du], x2, xa, [gate, up], need_dx=ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(ctx.shape).to(ctx.in_dtype)), None, None, *grads_gu, *grads_down


def mlp_specs(mlp) -> tuple[list[LoraSpec] | None, str]:
    """``([gate, up, down], "")`` for a Llama-family SwiGLU MLP, or ``(None, reason)``."""
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    if act not in ("silu", "swish"):
        return None, f"activation {act!r} is not SiLU"
    specs = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(mlp, name, None)
        if module is None:
            return None, f"MLP has no {name}"
        spec, why = lora_spec(module)
        if spec is None:
            return None, f"{name}: {why}"
        specs.append(spec)
    return specs, ""


def fused_mlp(x: torch.Tensor, specs: list[LoraSpec], skip_output: bool = False) -> torch.Tensor:
    """The fused MLP; ``skip_output=True`` returns a zero placeholder instead of ``y`` (the
    gradients stay exact; only for a re-run whose output value is unused)."""
    return LoRAMLPFunction.apply(x, specs, skip_output, *lora_tensors(specs))


def fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A drop-in ``forward`` for a Llama-family MLP instance (see ``patch.apply_kernels``)."""
    specs, _ = mlp_specs(self)
    if specs is None:  # the adapters changed since patching: the module's own path
        return type(self).forward(self, x)
    return fused_mlp(x, specs, skip_output=in_recompute())
