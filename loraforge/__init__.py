"""loraforge: fine-tune large language models cheaply (LoRA family on 4-bit quantized bases)."""

from loraforge.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
