"""Adapters: LoRA, rsLoRA, DoRA, VeRA, AdaLoRA, SoRA and bottleneck adapters on dense or 4-bit
linear layers, and prefix tuning (key/value prefixes in every attention layer), in PEFT's format
(bottleneck: loraforge's own, in PEFT's layout).

    from loraforge.adapters import LoraConfig, attach, load_adapter
    am = attach(model, LoraConfig(r=16, alpha=16, use_dora=False))
    ...train...; am.save_pretrained("out"); am = load_adapter(model2, "out")

Methods register themselves in :data:`loraforge.adapters.base.REGISTRY` when their file is
imported; this package imports the built-in ones (lora and dora, vera, adalora, sora, loftq,
bottleneck, prefix).
"""

from loraforge.adapters import lora, vera  # noqa: F401  (registers the methods; lora first)
from loraforge.adapters import adalora, bottleneck, loftq, prefix, sora  # noqa: F401,I001
from loraforge.adapters.bottleneck import BottleneckConfig
from loraforge.adapters.base import REGISTRY, AdapterConfig, AdapterLayer, Method, register
from loraforge.adapters.lora import DoraConfig, LoraConfig
from loraforge.adapters.model import AdapterModel, attach, load_adapter
from loraforge.adapters.prefix import PrefixConfig
from loraforge.adapters.vera import VeraConfig

__all__ = [
    "REGISTRY",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModel",
    "BottleneckConfig",
    "DoraConfig",
    "LoraConfig",
    "Method",
    "PrefixConfig",
    "VeraConfig",
    "attach",
    "load_adapter",
    "register",
]
