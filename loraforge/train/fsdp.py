"""FSDP2 for QLoRA: ``fully_shard`` per decoder layer and at the root, the frozen 4-bit base
sharded with the rest (FSDP2, torch.distributed.fsdp; Zhao et al., "PyTorch FSDP", 2023).

FSDP2 shards *parameters* (each one along dim 0, as a DTensor) and leaves buffers replicated.
A :class:`~loraforge.quant.linear.QuantLinear` keeps its packed codes and block scales as
buffers, so as they are every rank would hold the whole base. :func:`shard` re-registers them
(``qweight``, ``absmax``, ``nested_absmax``) as frozen parameters under the same names, so the
layer's own code reads them unchanged, and FSDP2 shards them: each rank keeps 1/N of the packed
bytes between uses and all-gathers a layer's codes just before its forward (and again before
its backward), freeing them after.

Storage form: the codes stay ``uint8``. bitsandbytes stores them in a float dtype
(``quant_storage``) because FSDP1 flattens every parameter of a unit into one buffer of one
dtype and needs float storage to do so (bitsandbytes PR #970). FSDP2 shards each parameter on
its own and, when a unit's parameters have different dtypes, all-gathers their bytes viewed as
``uint8`` in one collective (``foreach_all_gather``), so uint8 codes, float32 scales and the
float32 adapters of one decoder layer travel together, exactly, with no float reinterpretation
of integer codes. Measured on 2 CPU ranks with gloo (the test and the banner print it): each
rank holds half of the packed base bytes (up to one padding row per tensor).

The tiny shared code books (``quant_map``, ``nested_quant_map``) and the 0-dim ``offset`` stay
replicated buffers. Gradients exist only for the adapters; they are reduce-scattered, so each
rank's optimizer holds the states of its shards only.
"""

from __future__ import annotations

import torch
from torch import nn

SHARDED_STATE = ("qweight", "absmax", "nested_absmax")


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The frozen k-bit linears (anything holding packed ``qweight`` codes)."""
    return [m for m in model.modules() if hasattr(m, "qweight") and hasattr(m, "bits_per_parameter")]


def as_frozen_parameters(model: nn.Module) -> None:
    """Re-register each quantized linear's codes and scales as frozen parameters (same names)."""
    for layer in quantized_layers(model):
        for name in SHARDED_STATE:
            tensor = layer._buffers.get(name)
            if tensor is not None:
                del layer._buffers[name]
                layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names transformers lists as not to be split
    (``_no_split_modules``, e.g. ``LlamaDecoderLayer``)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(adapter_model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``adapter_model`` in place over the default process group and return it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    as_frozen_parameters(adapter_model)
    layers = decoder_layers(adapter_model)
    if not layers:
        from loraforge.errors import UserError

        raise UserError("train.distributed: fsdp shards per decoder layer, and this model lists none "
                        "(no _no_split_modules); use train.distributed: ddp", where="train.distributed")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(adapter_model, mesh=mesh)
    return adapter_model


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of packed codes and scales held by this rank, bytes of the whole base's)."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for layer in quantized_layers(model):
        for name in SHARDED_STATE:
            t = getattr(layer, name, None)
            if t is None:
                continue
            size = t.element_size()
            total += t.numel() * size
            local += (t.to_local().numel() if isinstance(t, DTensor) else t.numel()) * size
    return local, total
