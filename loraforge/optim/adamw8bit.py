"""AdamW with blockwise 8-bit moments, as bitsandbytes' ``AdamW8bit`` (0.50).

Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization" (ICLR 2022,
arXiv:2110.02861); weight decay decoupled as in Loshchilov & Hutter, "Decoupled Weight Decay
Regularization" (ICLR 2019).

Both moments are stored as one uint8 code per element plus one fp32 absmax per block of 256
elements (bitsandbytes' block since 0.44; the paper used 2048): the first moment ``m`` with the
signed dynamic 8-bit map, the second moment ``v`` with the unsigned one. One step for parameter
``p`` with gradient ``g`` at step ``t`` (lr ``a``, betas ``b1, b2``, ``eps``, weight decay ``wd``):

    m = deq(m_codes, absmax1)                       v = deq(v_codes, absmax2)
    m = b1 m + (1 - b1) g                           v = b2 v + (1 - b2) g^2
    p = p (1 - a wd)
    p = p - a / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    m_codes, absmax1 = quant(m)                     v_codes, absmax2 = quant(v)

so each block is requantized with the absmax of its *new* values, all arithmetic in fp32 whatever
the parameter dtype. Tensors with fewer than 4096 elements keep fp32 moments and take
bitsandbytes' 32-bit rule, the same update written as

    p = p (1 - a wd) - a sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t)).

The order of the decay follows bitsandbytes' CPU, Triton and default backends (and torch's AdamW):
shrink, then step. Its CUDA kernel shrinks after the step, a difference of a factor ``1 - a wd``
on the step itself (relative 1e-6 at a = 1e-4, wd = 0.01).

``quant`` takes the nearest code (ties to the lower), as bitsandbytes' CUDA kernel does with its
binary search; its CPU kernel goes through a 65536-entry table over [-1, 1] instead, which cannot
resolve the finest codes near zero (it never stores a nonzero second moment below 2.1e-5 of its
block's absmax, where the nearest code may be 0). Parameters and absmax match bitsandbytes
bit for bit from the same state; codes are equal or adjacent wherever that table resolves them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from loraforge.optim.codes8 import CodeTable
from loraforge.optim.state import flat_ids, flat_params, split_state_tensors
from loraforge.quant.codebooks import dynamic_map

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
CHUNK_ELEMENTS = 1 << 22  # whole blocks of 256


def state_bytes_8bit(numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of AdamW8bit's two moments for a tensor of ``numel`` elements."""
    if numel < min_8bit_size:
        return 2 * 4 * numel
    return 2 * (numel + 4 * math.ceil(numel / BLOCKSIZE))


class AdamW8bit(torch.optim.Optimizer):
    """AdamW keeping both moments in 8 bits, blockwise (see the module docstring).

    State per parameter (bitsandbytes' key names): ``step`` (int), ``state1`` / ``state2`` (uint8
    codes shaped like the parameter, or fp32 moments below ``min_8bit_size`` elements) and
    ``absmax1`` / ``absmax2`` (fp32, one per block of 256) for the 8-bit ones.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon {eps}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"invalid betas {betas}: expected two values in [0, 1)")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.chunk_elements = CHUNK_ELEMENTS
        self._maps: dict[torch.device, tuple[CodeTable, CodeTable]] = {}

    # -- state -------------------------------------------------------------------------------

    def uses_8bit(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def state_bytes(self, p: torch.Tensor) -> int:
        """Bytes this optimizer keeps for ``p`` (used before the lazy state exists)."""
        return state_bytes_8bit(p.numel(), self.min_8bit_size)

    def fresh_state(self, p: torch.Tensor, device: torch.device | None = None, pin_memory: bool = False) -> dict:
        """Zero moments for ``p``, on ``device`` (default: p's), optionally in pinned host memory."""
        device = p.device if device is None else device
        make = dict(device=device, pin_memory=pin_memory)
        if not self.uses_8bit(p):
            return {
                "step": 0,
                "state1": torch.zeros(p.shape, dtype=torch.float32, **make),
                "state2": torch.zeros(p.shape, dtype=torch.float32, **make),
            }
        blocks = math.ceil(p.numel() / BLOCKSIZE)
        # Code 0 decodes to 0 with absmax 0, whatever the map.
        return {
            "step": 0,
            "state1": torch.zeros(p.shape, dtype=torch.uint8, **make),
            "state2": torch.zeros(p.shape, dtype=torch.uint8, **make),
            "absmax1": torch.zeros(blocks, dtype=torch.float32, **make),
            "absmax2": torch.zeros(blocks, dtype=torch.float32, **make),
        }

    def _tables(self, device: torch.device) -> tuple[CodeTable, CodeTable]:
        """Lookup tables of the signed (first moment) and unsigned (second moment) dynamic maps."""
        if device not in self._maps:
            self._maps[device] = (CodeTable(dynamic_map(signed=True), device), CodeTable(dynamic_map(signed=False), device))
        return self._maps[device]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, except that state tensors keep their own dtypes.

        torch would cast every state tensor of a floating-point parameter to that parameter's
        dtype (uint8 codes to floats, fp32 absmax to bf16); here torch loads the groups and the
        step counters and the tensors are placed by :meth:`_place_loaded`.
        """
        tensors, rest = split_state_tensors(state_dict, lambda pid: True)
        super().load_state_dict({**state_dict, "state": rest})
        for p, saved in zip(flat_params(self), flat_ids(state_dict)):
            for key, value in tensors.get(saved, {}).items():
                self.state[p][key] = self._place_loaded(p, value)

    def _place_loaded(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return value.to(device=p.device, copy=True)

    # -- update ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            due = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self.new_state(p))
                state["step"] += 1
                due.append((p, state))
            self.step_group(due, group)
        return loss

    def new_state(self, p: torch.Tensor) -> dict:
        return self.fresh_state(p)

    def step_group(self, due: list[tuple[torch.Tensor, dict]], group: dict) -> None:
        """Update the parameters of one group whose step counters were just advanced.

        8-bit tensors made of whole blocks are updated together, a chunk of several at a time
        (one set of kernels instead of one per tensor: LoRA has hundreds of small matrices); the
        others one by one. Blocks never straddle two tensors, so the results are the same.
        """
        batches: dict[tuple, list] = {}
        for p, state in due:
            if self._batchable(p, state):
                batches.setdefault((p.device, p.dtype, state["step"]), []).append((p, state))
            else:
                self.update(p, state, state["step"], group)
        for (device, _, step), items in batches.items():
            pack, size = [], 0
            for p, state in items:
                if pack and size + p.numel() > self.chunk_elements:
                    self._update_pack(pack, step, group, device)
                    pack, size = [], 0
                pack.append((p, state))
                size += p.numel()
            self._update_pack(pack, step, group, device)

    def _batchable(self, p: torch.Tensor, state: dict) -> bool:
        return (
            state["state1"].dtype == torch.uint8
            and p.numel() % BLOCKSIZE == 0
            and p.numel() < self.chunk_elements
            and p.is_contiguous()
        )

    def _update_pack(self, pack: list[tuple[torch.Tensor, dict]], step: int, group: dict, device) -> None:
        """Concatenate the tensors of ``pack``, update them as one, copy the results back."""
        beta1, beta2 = group["betas"]
        rule = _Rule(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step)
        signed, unsigned = self._tables(device)
        flat = lambda tensors: torch.cat([t.reshape(-1) for t in tensors])
        params = [p for p, _ in pack]
        fields = {key: [state[key] for _, state in pack] for key in ("state1", "state2", "absmax1", "absmax2")}
        weight, joined = flat(params).float(), {key: flat(tensors) for key, tensors in fields.items()}
        rule.step_8bit(
            weight, flat([p.grad for p in params]),
            (joined["state1"], joined["absmax1"], signed), (joined["state2"], joined["absmax2"], unsigned),
        )
        sizes = [p.numel() for p in params]
        torch._foreach_copy_([p.view(-1) for p in params], list(weight.split(sizes)))
        for key, tensors in fields.items():
            parts = joined[key].split([t.numel() for t in tensors])
            torch._foreach_copy_([t.view(-1) for t in tensors], list(parts))

    @torch.no_grad()
    def update(self, p: torch.Tensor, tensors: dict, step: int, group: dict) -> None:
        """One AdamW step of ``p`` in place; ``tensors`` holds its state tensors on p's device.

        8-bit states are updated in chunks of whole blocks (``chunk_elements``), so the fp32
        temporaries stay small whatever the parameter's size; blocks are independent, so the
        result does not depend on the chunking.
        """
        beta1, beta2 = group["betas"]
        rule = _Rule(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], step)
        work = p if p.is_contiguous() else p.contiguous()
        weight, grad = work.view(-1), p.grad.reshape(-1)
        flat = {key: value.view(-1) for key, value in tensors.items() if torch.is_tensor(value)}
        if flat["state1"].dtype == torch.float32:
            rule.step_32bit(weight, grad, flat["state1"], flat["state2"])
        else:
            signed, unsigned = self._tables(p.device)
            n = weight.numel()
            for start in range(0, n, self.chunk_elements):
                end = min(start + self.chunk_elements, n)
                blocks = slice(start // BLOCKSIZE, math.ceil(end / BLOCKSIZE))
                rule.step_8bit(
                    weight[start:end], grad[start:end],
                    (flat["state1"][start:end], flat["absmax1"][blocks], signed),
                    (flat["state2"][start:end], flat["absmax2"][blocks], unsigned),
                )
        if work is not p:
            p.copy_(work)


class _Rule:
    """bitsandbytes' AdamW arithmetic for one parameter at one step (fp32 throughout)."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int):
        self.lr, self.beta1, self.beta2, self.eps, self.wd = lr, beta1, beta2, eps, weight_decay
        self.correction1 = 1.0 - beta1**step
        self.correction2 = math.sqrt(1.0 - beta2**step)

    def _moments(self, m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> None:
        m.mul_(self.beta1).add_(grad, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)

    def _decay(self, w: torch.Tensor) -> None:
        if self.wd > 0.0:
            w.mul_(1.0 - self.lr * self.wd)

    def step_32bit(self, weight: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        """bnb's 32-bit kernel: p -= lr c2 / c1 * m / (sqrt(v) + eps c2)."""
        grad, w = grad.float(), weight.float()
        self._moments(m, v, grad)
        self._decay(w)
        w.add_(m / (v.sqrt() + self.eps * self.correction2), alpha=-self.lr * self.correction2 / self.correction1)
        if w is not weight:
            weight.copy_(w)

    def step_8bit(self, weight: torch.Tensor, grad: torch.Tensor, first: tuple, second: tuple) -> None:
        """bnb's blockwise kernel: dequantize, update, p -= lr / c1 * m / (sqrt(v) / c2 + eps), requantize."""
        grad, w = grad.float(), weight.float()
        (codes1, absmax1, map1), (codes2, absmax2, map2) = first, second
        m = map1.dequantize(codes1, absmax1, BLOCKSIZE)
        v = map2.dequantize(codes2, absmax2, BLOCKSIZE)
        self._moments(m, v, grad)
        denom = (v.sqrt() / self.correction2).add_(self.eps)
        self._decay(w)
        w.addcdiv_(m, denom, value=-self.lr / self.correction1)
        if w is not weight:
            weight.copy_(w)
        map1.quantize(m, codes1, absmax1, BLOCKSIZE)
        map2.quantize(v, codes2, absmax2, BLOCKSIZE)
