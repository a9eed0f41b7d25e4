"""Fused gated MLP with LoRA (or DoRA) on its projections: the Llama / Qwen / Mistral / Granite /
OLMo 2 SwiGLU MLP, Gemma's GeGLU (tanh-GELU) and Phi-3's fused ``gate_up_proj`` (LoRA:
arXiv:2106.09685, gated activations: arXiv:2002.05202; see :mod:`lora_linear` for the
projection and DoRA formulas):

    g = x Wg^T + sg (x Ag^T) Bg^T     u = x Wu^T + su (x Au^T) Bu^T     h = act(g) * u
    y = h Wd^T + sd (h Ad^T) Bd^T

(Phi-3: ``[g | u] = x Wgu^T + s (x A^T) B^T``, one projection split in halves). Forward keeps
``x``, ``g``, ``u`` (for a DoRA projection its pre-magnitude ``z`` instead, ``g`` / ``u`` being
recomputed from it), ``x [Ag; Au]^T`` and ``h Ad^T``; ``h`` is recomputed from ``g`` and ``u`` in
backward (one elementwise pass) instead of being stored. Backward (hand-written):

    dh = dy Wd + sd (dy Bd) Ad        dBd = sd dy^T (h Ad^T)       dAd = sd (dy Bd)^T h
    dg, du = act'(dh, g, u)           (written over g and u, which are dead by then)
    dx = dg Wg + du Wu + [sg dg Bg, su du Bu] [Ag; Au]        and dA, dB of gate and up likewise

Inside a checkpointed layer's re-run in backward (:func:`loraforge.kernels.checkpoint.in_recompute`)
the base ``h Wd^T`` is skipped (a quarter of a decoder layer's MLP matmul work in that pass) when
the layer only adds the MLP output to its residual (``ArchSpec.mlp_output_only_added``): the
backward needs the re-run's graph and saved tensors but never the value of ``y``; the output is
then a zero-filled placeholder (``skip_output``). A DoRA ``down_proj`` needs ``y``'s ``z``, so it
is never skipped.

Base weights are dense or quantized (dequantized into a reused buffer before each matmul). The
elementwise activation runs in Triton where :func:`~loraforge.kernels.dispatch.use_triton` says so.
"""

from __future__ import annotations

import torch

from loraforge.kernels.arch_specs import GATED_ACTIVATIONS, ArchSpec, spec_for
from loraforge.kernels.checkpoint import in_recompute
from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.lora_linear import (
    LoraSpec,
    autocast_off,
    compute_dtype,
    finish,
    lora_spec,
    lora_tensors,
    project,
    project_backward,
)
from loraforge.kernels.swiglu import (
    swiglu_backward_in_place,
    swiglu_backward_triton,
    swiglu_forward_triton,
    swiglu_reference,
)


def _gate_and_up(outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, u)`` from the gate/up projections' outputs: two tensors, or one ``[T, 2I]`` split in halves."""
    if len(outs) == 2:
        return outs[0], outs[1]
    return outs[0].chunk(2, dim=-1)


def _act(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_forward_triton(g, u, act) if use_triton(g) else swiglu_reference(g, u, act)


def _act_backward_in_place(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str) -> None:
    """Write ``dg`` over ``g`` and ``du`` over ``u``."""
    if use_triton(dh):
        swiglu_backward_triton(dh, g, u, dg=g, du=u, act=act)
    else:
        swiglu_backward_in_place(dh, g, u, act)


class LoRAMLPFunction(torch.autograd.Function):
    """``y = mlp(x)`` for specs ``(gate, up, down)`` or ``(gate_up, down)``; gradients for ``x``
    and every trained tensor (gate's and up's first, then down's, in :func:`lora_tensors` order)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, specs: list[LoraSpec], act: str, skip_output: bool, *params: torch.Tensor):
        *gate_up, down = specs
        skip_output = skip_output and down.magnitude is None
        with autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
            outs, xa, doras = project(x2, gate_up)
            h = _act(*_gate_and_up(outs), act)
            if skip_output:
                ha = h @ down.A.to(h.dtype).t() if down.A is not None else None
                y, down_doras = x2.new_zeros(1).expand(x2.shape[0], down.out_features), [None]
            else:
                (y,), ha, down_doras = project(h, [down])
        kept = [None if d is not None else o for o, d in zip(outs, doras)]  # DoRA: z is kept instead
        ctx.save_for_backward(x2, xa, ha, *kept)
        ctx.doras, ctx.down_doras = doras, down_doras
        ctx.specs, ctx.act, ctx.shape, ctx.in_dtype = specs, act, x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, xa, ha, *kept = ctx.saved_tensors
        *gate_up, down = ctx.specs
        outs = [finish(d.z, s, d) if d is not None else o for o, s, d in zip(kept, gate_up, ctx.doras)]
        g, u = _gate_and_up(outs)
        dy = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)
        h = _act(g, u, ctx.act)
        dh, grads_down = project_backward([dy], h, ha, [down], ctx.down_doras)
        del h
        _act_backward_in_place(dh, g, u, ctx.act)  # outs now hold the gradients of the gate/up outputs
        del dh
        dx, grads_gu = project_backward(outs, x2, xa, gate_up, ctx.doras, need_dx=ctx.needs_input_grad[0],
                                        own_dys=True)
        ctx.doras = ctx.down_doras = None
        return (None if dx is None else dx.view(ctx.shape).to(ctx.in_dtype)), None, None, None, *grads_gu, *grads_down


def mlp_specs(mlp, arch: ArchSpec | None = None) -> tuple[tuple[list[LoraSpec], str] | None, str]:
    """``((specs, act), "")`` for a gated MLP of ``arch`` (read from ``mlp.config`` when not
    given), or ``(None, reason)``."""
    config = getattr(mlp, "config", None)
    arch = arch or spec_for(getattr(config, "model_type", None))
    if arch is None:
        return None, "no kernel spec for this model type"
    name = getattr(config, arch.act_key, None)
    act = GATED_ACTIVATIONS.get(name)
    if act is None:
        return None, f"activation {name!r} has no fused gated kernel ({', '.join(GATED_ACTIVATIONS)})"
    specs = []
    for proj in (*arch.gate_up, "down_proj"):
        module = getattr(mlp, proj, None)
        if module is None:
            return None, f"MLP has no {proj}"
        spec, why = lora_spec(module)
        if spec is None:
            return None, f"{proj}: {why}"
        specs.append(spec)
    return (specs, act), ""


def fused_mlp(x: torch.Tensor, specs: list[LoraSpec], skip_output: bool = False, act: str = "silu") -> torch.Tensor:
    """The fused MLP; ``skip_output=True`` returns a zero placeholder instead of ``y`` (the
    gradients stay exact; only for a re-run whose output value is unused)."""
    return LoRAMLPFunction.apply(x, specs, act, skip_output, *lora_tensors(specs))


def fused_mlp_forward(self, x: torch.Tensor, arch: ArchSpec | None = None) -> torch.Tensor:
    """A drop-in ``forward`` for a gated MLP instance of ``arch`` (see ``patch.apply_kernels``)."""
    arch = arch or spec_for(getattr(getattr(self, "config", None), "model_type", None))
    found, _ = mlp_specs(self, arch)
    if found is None:  # the adapters changed since patching: the module's own path
        return type(self).forward(self, x)
    specs, act = found
    skip = in_recompute() and arch.mlp_output_only_added
    return fused_mlp(x, specs, skip_output=skip, act=act)
