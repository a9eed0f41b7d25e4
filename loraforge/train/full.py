"""Full fine-tuning (``adapter.method: full``): every weight of the base model is trained.

No adapter is added: the model's own parameters are the trainable ones, updated by the same loop
(loss, accumulation, clipping, optimizer, checkpoints) as an adapter's. This is the baseline the
QLoRA paper compares against (Dettmers et al., 2023, its ``--full_finetune``): for a step with
trained-token count N, every weight W gets the gradient of ``L = sum_t CE_t / N`` and the
optimizer's update ``W <- W - lr * update(dL/dW)``.

Only a 16/32-bit base can be trained this way: a quantized layer (nf4, int8, ...) stores codes,
not weights with a gradient, so :class:`FullModel` refuses a model holding one (and the config
refuses ``quantization`` with ``method: full``). The output is a complete transformers model
folder (``config.json``, ``generation_config.json``, ``model.safetensors`` or its shards with
``model.safetensors.index.json``; the run adds the tokenizer), loaded with
``AutoModelForCausalLM.from_pretrained``; checkpoints hold the same folder as ``model/``.

:class:`FullModel` offers what the loop asks of an adapter model: ``model`` (the wrapped model),
``configs`` (one ``default`` entry, for the loop's per-method hooks: none here), forward,
generate and attribute access passed through to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from loraforge.adapters.base import is_quantized_linear
from loraforge.errors import UserError

EXPORT_NAME = "model"  # the checkpoint's subfolder holding the model (an adapter's is "adapter")


@dataclass
class FullConfig:
    """Full fine-tuning has no settings of its own (the ``train`` section has them all)."""

    method: ClassVar[str] = "full"


class FullModel(nn.Module):
    """``model`` with every parameter trainable; refuses quantized layers and integer weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        quantized = [key for key, module in model.named_modules() if is_quantized_linear(module)]
        if quantized:
            raise UserError(f"the base model holds quantized layers ({quantized[0]} is a "
                            f"{type(model.get_submodule(quantized[0])).__name__}); full fine-tuning trains every "
                            "weight and needs a 16/32-bit base: load the original model with quantization: null, "
                            "or train an adapter on the quantized base", where="adapter.method")
        not_float = [n for n, p in model.named_parameters() if not p.is_floating_point()]
        if not_float:
            raise UserError(f"parameter {not_float[0]} is not floating point; full fine-tuning needs a 16/32-bit base",
                            where="adapter.method")
        self.model = model
        self.configs: dict[str, FullConfig] = {"default": FullConfig()}
        config = getattr(model, "config", None)
        self.use_cache = getattr(config, "use_cache", None)  # restored in the saved config
        for param in model.parameters():
            param.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """The model as a transformers folder of safetensors (with the ``use_cache`` it came
        with: gradient checkpointing turns it off for training)."""
        config = getattr(self.model, "config", None)
        training_value = getattr(config, "use_cache", None)
        if config is not None and self.use_cache is not None:
            config.use_cache = self.use_cache
        try:
            self.model.save_pretrained(str(directory), safe_serialization=True)
        finally:
            if config is not None and training_value is not None:
                config.use_cache = training_value

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

