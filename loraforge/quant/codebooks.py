"""Code books: the value tables that k-bit codes index into.

- NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, sec. 3): the 4-bit NormalFloat. Quantiles of
  N(0, 1) chosen so that each bin holds equal probability mass, with an exact zero:
  ``q_i = ppf(p_i)`` for 8 positive levels ``p = linspace(delta, 1/2, 9)[:-1]`` and 7 negative
  levels ``p = linspace(delta, 1/2, 8)[:-1]`` (mirrored), plus 0, sorted and divided by the largest,
  with ``delta = 0.9677083 = 1 - (1/30 + 1/32) / 2``. ``NF4`` holds bitsandbytes' literal float32
  table; :func:`nf_codebook` builds any NF-k the same way (LoftQ's 2- and 3-bit modes).
- FP4 (bitsandbytes): E2M1 with exponent bias 2, indexed by bit pattern (bit 3 is the sign):
  ``[0, .0625, 8, 12, 4, 6, 2, 3, -0, -.0625, -8, -12, -4, -6, -2, -3] / 12``; as in bitsandbytes'
  table the "-0" entry (code 8) holds +0.0, so code 8 dequantizes to +0.0.
- INT-k: symmetric uniform levels ``linspace(-1, 1, 2**k)`` (LoftQ's "uniform" quantizer).
- The dynamic 8-bit map (Dettmers 2016, arXiv:1511.04561; bitsandbytes ``create_dynamic_map``):
  for exponent i = 0..6, the midpoints of ``linspace(0.1, 1, 2**i + 1)`` (signed) or
  ``linspace(0.1, 1, 2**(i+1) + 1)`` (unsigned) scaled by ``10**(i - 6)``, plus 0 and 1, sorted.
  Double quantization compresses absmax with the signed map; 8-bit optimizers use both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.errors import UserError, check_choice

NF_OFFSET = 0.9677083

NF4 = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

FP4 = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0


def nf_codebook(bits: int, offset: float = NF_OFFSET) -> torch.Tensor:
    """The k-bit NormalFloat code book (2**bits sorted float32 values in [-1, 1], exact zero).

    One more positive level than negative ones, as in QLoRA's ``create_normal_map`` and LoftQ's
    ``NFQuantizer``: ``2**(k-1)`` positive quantiles from ``linspace(offset, 0.5, 2**(k-1) + 1)``,
    ``2**(k-1) - 1`` negative ones from ``linspace(offset, 0.5, 2**(k-1))``, and 0.
    """
    if not 2 <= bits <= 8:
        raise UserError(f"NormalFloat code books have 2 to 8 bits, got {bits}", where="quant_type")
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def int_codebook(bits: int) -> torch.Tensor:
    """Symmetric uniform levels ``linspace(-1, 1, 2**bits)`` (float32; no exact zero)."""
    if not 2 <= bits <= 8:
        raise UserError(f"integer code books have 2 to 8 bits, got {bits}", where="quant_type")
    return torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (256 sorted float32 values; signed min is -0.99296875)."""
    values: list[float] = []
    for i in range(7):
        items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        if signed:
            values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@dataclass(frozen=True)
class QuantType:
    """A named code book and how its codes are stored: ``bits`` per code, ``storage_bits`` in memory
    (3-bit codes sit one per nibble; 2-bit four per byte; 4-bit two per byte; 8-bit one per byte)."""

    name: str
    bits: int

    @property
    def storage_bits(self) -> int:
        return {2: 2, 3: 4, 4: 4}.get(self.bits, 8)

    @property
    def codebook(self) -> torch.Tensor:
        return get_codebook(self.name)


def _names() -> list[str]:
    return ["nf4", "fp4"] + [f"nf{k}" for k in (2, 3, 5, 6, 7, 8)] + [f"int{k}" for k in range(2, 9)]


QUANT_TYPES = tuple(_names())


def quant_type(name: str, where: str = "quant_type") -> QuantType:
    """Validate a quant type name ("nf4", "fp4", "nf2", "nf3", "int2", "int4", "int8", ...)."""
    check_choice(str(name), QUANT_TYPES, "quant type", where=where)
    return QuantType(name, int(name.lstrip("nfpit")))


def get_codebook(name: str) -> torch.Tensor:
    """The float32 code book of a quant type, e.g. ``get_codebook("nf4")`` (a fresh tensor)."""
    kind = quant_type(name)
    if name == "nf4":
        return NF4.clone()
    if name == "fp4":
        return FP4.clone()
    if name.startswith("nf"):
        return nf_codebook(kind.bits)
    return int_codebook(kind.bits)
