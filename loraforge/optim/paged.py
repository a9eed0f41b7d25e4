"""Paged AdamW (32-bit and 8-bit): optimizer states in pinned host memory, paged to the GPU.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314, "paged optimizers") keeps optimizer states where
a memory spike (a long sequence, a big batch) cannot run the GPU out of memory. bitsandbytes does
it with CUDA managed memory that the driver evicts when the card fills up; loraforge never uses
managed memory. Instead the states of every parameter with at least ``1e5`` elements (the same
threshold as bitsandbytes) live in pinned host memory, and the step walks the parameters one at a
time:

    copy stream:    H2D(states[i+1])          D2H(states[i])  ...
    compute stream:           update(p[i], states[i])       update(p[i+1], ...)

The next parameter's states are prefetched on a side CUDA stream while the current one is
updated, then written back; only two or three parameters' states are on the GPU at any moment.
Smaller states stay resident on the parameter's device. On CPU (or for CPU parameters) nothing is
paged and both optimizers are exactly their unpaged twins, ``torch.optim.AdamW`` and
``AdamW8bit``; on CUDA they run the same per-element update, so results are identical too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.optim.adam import adam
from torch.optim.optimizer import _get_scalar_dtype

from loraforge.optim.adamw8bit import MIN_8BIT_SIZE, AdamW8bit
from loraforge.optim.state import flat_ids, flat_params, pinned_copy, split_state_tensors

MIN_PAGED_SIZE = 100_000

# State entries that stay put: the step counter (a CPU scalar, or on the parameter's device for
# fused / capturable torch AdamW), never paged.
_NOT_PAGED = ("step",)


class StatePager:
    """Streams per-parameter state tensors between pinned host memory and the GPU."""

    def __init__(self, min_numel: int = MIN_PAGED_SIZE):
        self.min_numel = min_numel
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._done: dict[torch.device, torch.cuda.Event] = {}

    def pages(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s states live in pinned host memory."""
        return p.is_cuda and p.numel() >= self.min_numel

    def load(self, optimizer: torch.optim.Optimizer, state_dict: dict, load, dtype_of) -> None:
        """Load ``state_dict`` with ``load`` (torch's loader), paged tensors straight to pinned memory.

        torch's loader would move every state tensor to its parameter's device first; the paged
        ones are taken out, copied into pinned host memory (as ``dtype_of(p, tensor)``) and put
        back after ``load`` has handled the groups and the rest.
        """
        self.synchronize()
        params = dict(zip(flat_ids(state_dict), flat_params(optimizer)))
        taken, rest = split_state_tensors(state_dict, lambda pid: pid in params and self.pages(params[pid]))
        load({**state_dict, "state": rest})
        for pid, tensors in taken.items():
            p = params[pid]
            for key, value in tensors.items():
                optimizer.state[p][key] = pinned_copy(value, dtype_of(p, value))

    def synchronize(self) -> None:
        """Wait until every write-back has landed in host memory."""
        for event in self._done.values():
            event.synchronize()

    def stream(self, items: list[tuple[torch.Tensor, dict]]) -> Iterator[tuple[torch.Tensor, dict]]:
        """Yield ``(p, device_state)`` for each ``(p, host_state)``; write back after each yield.

        ``device_state`` holds GPU copies of the pageable tensors of ``host_state`` (everything
        but the step counter); the caller updates them in place on the current stream. Parameter
        ``i + 1`` is prefetched while ``i`` is updated.
        """
        by_device: dict[torch.device, list] = {}
        for p, host in items:
            by_device.setdefault(p.device, []).append((p, host))
        for device, on_this in by_device.items():
            yield from self._stream_device(device, on_this)

    def _stream_device(self, device: torch.device, items: list) -> Iterator[tuple[torch.Tensor, dict]]:
        compute = torch.cuda.current_stream(device)
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        copy = self._streams[device]
        # A host buffer is read by the next step's prefetch only after this step's write-back:
        # both run in order on `copy`.
        pending = self._fetch(items[0][1], device, copy)
        for i, (p, host) in enumerate(items):
            on_device, ready = pending
            if i + 1 < len(items):
                pending = self._fetch(items[i + 1][1], device, copy)
            compute.wait_event(ready)
            for t in on_device.values():  # allocated on `copy`, used on `compute`
                t.record_stream(compute)
            yield p, on_device
            updated = torch.cuda.Event()
            updated.record(compute)
            with torch.cuda.stream(copy):
                copy.wait_event(updated)
                for key, t in on_device.items():
                    host[key].copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copy)
        self._done[device] = done

    @staticmethod
    def _fetch(host: dict, device: torch.device, copy: torch.cuda.Stream) -> tuple[dict, torch.cuda.Event]:
        with torch.cuda.stream(copy):
            on_device = {
                key: value.to(device, non_blocking=True)
                for key, value in host.items()
                if key not in _NOT_PAGED and torch.is_tensor(value)
            }
            ready = torch.cuda.Event()
            ready.record(copy)
        return on_device, ready


class PagedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose large states (>= 1e5 elements) are paged from pinned memory.

    Same constructor as torch's AdamW (plus ``min_paged_size``), same state dict; on CPU it is
    torch's AdamW unchanged.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_paged_size: int = MIN_PAGED_SIZE, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.pager = StatePager(min_paged_size)

    def _paged_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if self.pager.pages(p)]

    @torch.no_grad()
    def step(self, closure=None):
        if not self._paged_params():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.state[p] and self.pager.pages(p):
                    self.state[p].update(self._pinned_state(p, group))
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
            lists = list(zip(params, grads, exp_avgs, exp_avg_sqs, steps))
            amsgrad = group["amsgrad"]
            resident = [i for i, p in enumerate(params) if not self.pager.pages(p)]
            if resident:
                self._adam(group, has_complex, [lists[i] for i in resident],
                           [max_exp_avg_sqs[i] for i in resident] if amsgrad else [])
            paged = [(p, self.state[p]) for p in params if self.pager.pages(p)]
            for p, on_device in self.pager.stream(paged):
                row = (p, p.grad, on_device["exp_avg"], on_device["exp_avg_sq"], self.state[p]["step"])
                self._adam(group, has_complex, [row], [on_device["max_exp_avg_sq"]] if amsgrad else [])
        return loss

    def _pinned_state(self, p: torch.Tensor, group: dict) -> dict:
        """The state torch's AdamW would create for ``p``, moments in pinned host memory."""
        on_device = group["capturable"] or group["fused"]
        state = {
            "step": torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
            if on_device
            else torch.tensor(0.0, dtype=_get_scalar_dtype()),
            "exp_avg": torch.zeros(p.shape, dtype=p.dtype, pin_memory=True),
            "exp_avg_sq": torch.zeros(p.shape, dtype=p.dtype, pin_memory=True),
        }
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros(p.shape, dtype=p.dtype, pin_memory=True)
        return state

    def _adam(self, group: dict, has_complex: bool, rows: list[tuple], max_exp_avg_sqs: list) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = (list(column) for column in zip(*rows))
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
             amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
             lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
             differentiable=group["differentiable"], fused=group["fused"],
             grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
             decoupled_weight_decay=group["decoupled_weight_decay"])

    def state_dict(self) -> dict:
        self.pager.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating-point moments to the parameter's dtype; so do we.
        self.pager.load(self, state_dict, super().load_state_dict,
                        lambda p, v: p.dtype if p.is_floating_point() else v.dtype)


class PagedAdamW8bit(AdamW8bit):
    """``AdamW8bit`` whose large states (>= 1e5 elements) are paged from pinned memory."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, min_8bit_size: int = MIN_8BIT_SIZE,
                 min_paged_size: int = MIN_PAGED_SIZE):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        self.pager = StatePager(min_paged_size)

    def new_state(self, p: torch.Tensor) -> dict:
        if self.pager.pages(p):
            return self.fresh_state(p, device=torch.device("cpu"), pin_memory=True)
        return self.fresh_state(p)

    def step_group(self, due: list[tuple[torch.Tensor, dict]], group: dict) -> None:
        super().step_group([(p, s) for p, s in due if not self.pager.pages(p)], group)
        paged = [(p, s) for p, s in due if self.pager.pages(p)]
        for p, on_device in self.pager.stream(paged):
            self.update(p, on_device, self.state[p]["step"], group)

    def state_dict(self) -> dict:
        self.pager.synchronize()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.pager.synchronize()
        super().load_state_dict(state_dict)

    def _place_loaded(self, p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return pinned_copy(value) if self.pager.pages(p) else super()._place_loaded(p, value)
