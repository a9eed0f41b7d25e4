"""Chunked linear + cross-entropy for the output head (the idea of Liger's fused linear
cross-entropy and of Unsloth's chunked loss), that never materialises ``[tokens, vocab]`` logits.

For the trained positions only (label != ``ignore_index``; ignored positions cost nothing: they
are dropped before the head matmul), in chunks of ``chunk_size`` tokens:

    z = h W^T  (float32)        loss_t = logsumexp(z_t) - z_t[y_t]
    dz = softmax(z) - onehot(y)        dh = dz W        dW += dz^T h     (dW only if W trains)

Heads that transform the logits before the loss: ``z / divisor`` (Granite's ``logits_scaling``)
and the soft cap ``c tanh(z / c)`` (Gemma 2 / 3 ``final_logit_softcapping``), applied in that
order as transformers does; their derivatives ``1 / divisor`` and ``1 - tanh^2`` multiply ``dz``
(PyTorch ops on the ``[chunk, vocab]`` block, around the row kernel).

The gradients are formed in the forward pass, chunk by chunk, scaled by ``1 / n_trained``
(``reduction="mean"``, what ``F.cross_entropy`` does) or 1 (``"sum"``: a trainer that normalises
by the trained tokens of all micro-batches divides itself); the backward only multiplies them by
the incoming gradient. Peak extra memory is one ``[chunk, vocab]`` float32 block plus ``dh``
(the size of ``h``). The per-row softmax / loss / gradient is one Triton kernel (two passes over
the row: online max and sum of exponentials, then ``softmax - onehot`` written over the logits
in place); the reference does the same with PyTorch ops, a few rows at a time. The head matmuls
are cuBLAS / MKL; on CPU ``z = h W^T`` is formed ``VOCAB_BLOCK`` vocabulary rows of ``W`` at a
time, each block written into its columns of ``z`` (the same products, so the same bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge.errors import check_choice
from loraforge.kernels.dispatch import use_triton
from loraforge.kernels.jit import kernel

try:
    import triton.language as tl
except ImportError:
    tl = None

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2**20  # float32 logits per chunk
# the PyTorch path's softmax passes run over this many rows at a time (a few MB at a 50k-150k
# vocabulary): each slice stays in cache across its passes instead of streaming the whole chunk
# from memory each time (a 341-row SmolLM2 chunk: ~61 -> ~38 ms on 2 cores, the same bits); the
# passes work in place, with no [rows, vocab] temporary (logsumexp's cost another ~2x: 47 -> 26 ms)
ROWS_IN_CACHE = 32
# CPU: the head matmul h [C, H] @ W^T with W [V, H] takes this many rows of W per call. One call
# over a whole 49k-152k vocabulary runs MKL's transposed-B path at ~60-70% of its rate on the
# decoder's shapes; 1024 rows (2.4 MB of W at H = 576) ran a 341-row SmolLM2 chunk 1.2x faster
# on 1 thread and 1.4x on 2 (56 -> 60 and 67 -> 93 GFLOP/s, interleaved in one process)
VOCAB_BLOCK = 1024


def cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            reduction: str = "mean", ignore_index: int = IGNORE_INDEX, divisor: float = 1.0,
                            softcap: float | None = None) -> torch.Tensor:
    """Full logits, then ``F.cross_entropy`` (what transformers does)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float() / divisor
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)


@kernel(configs=[{"BLOCK": 4096, "num_warps": 8}, {"BLOCK": 8192, "num_warps": 16}, {"BLOCK": 2048, "num_warps": 4}],
        key=["V"])
def _ce_rows_kernel(z_ptr, stride, labels_ptr, loss_ptr, V, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    label = tl.load(labels_ptr + row)
    m = tl.full([], float("-inf"), tl.float32)   # running max and sum of exp(z - max)
    s = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_label = tl.load(base + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_label)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(base + cols, (grad * scale).to(z_ptr.dtype.element_ty), mask=mask)


def _rows_loss_and_grad(z: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row loss; overwrites ``z`` (float32 ``[C, V]``) with ``scale * (softmax(z) - onehot)``."""
    if use_triton(z):
        loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        _ce_rows_kernel[(z.shape[0],)](z, z.stride(0), labels, loss, z.shape[1], scale)
        return loss
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], ROWS_IN_CACHE):  # each slice's passes stay in cache
        zs, ys = z[start:start + ROWS_IN_CACHE], labels[start:start + ROWS_IN_CACHE]
        row_max = zs.amax(1, keepdim=True)
        z_label = zs.gather(1, ys[:, None])
        zs.sub_(row_max).exp_()                      # exp(z - max), in place: no temporaries
        sum_exp = zs.sum(1, keepdim=True)
        loss[start:start + ROWS_IN_CACHE] = (row_max + sum_exp.log() - z_label).squeeze(1)
        zs.mul_(scale / sum_exp)                     # scale * softmax(z)
        zs[torch.arange(zs.shape[0], device=z.device), ys] -= scale
    return loss


# CPU: one logits block per dtype, reused by every chunk and call (valid until the next). A fresh
# 64 MB tensor is a fresh mapping from the OS each time (glibc maps blocks over 32 MB and unmaps
# them when freed): 16k page faults on its first write, in the middle of the head matmul.
_LOGITS: dict[torch.dtype, torch.Tensor] = {}


def _head_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h @ weight^T`` (``[C, V]``), on CPU in blocks of ``VOCAB_BLOCK`` vocabulary rows, into
    the reused logits block."""
    if h.device.type != "cpu" or weight.shape[0] <= VOCAB_BLOCK:
        return h @ weight.t()
    n = h.shape[0] * weight.shape[0]
    buf = _LOGITS.get(h.dtype)
    if buf is None or buf.numel() < n:
        buf = _LOGITS[h.dtype] = torch.empty(n, dtype=h.dtype)
    z = buf[:n].view(h.shape[0], weight.shape[0])
    for v0 in range(0, weight.shape[0], VOCAB_BLOCK):
        torch.mm(h, weight[v0:v0 + VOCAB_BLOCK].t(), out=z[:, v0:v0 + VOCAB_BLOCK])
    return z


def default_chunk(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``loss(hidden [T, H], weight [V, H], labels [T])`` with chunk-wise gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, reduction: str, ignore_index: int, chunk: int,
                divisor: float = 1.0, softcap: float | None = None):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        trained = (labels != ignore_index).nonzero().squeeze(1)
        n = trained.numel()
        scale = 1.0 / n if reduction == "mean" and n > 0 else 1.0
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = trained[start:start + chunk]
            h = hidden.index_select(0, rows)
            z = _head_logits(h, weight).float()
            if divisor != 1.0:
                z.div_(divisor)
            if softcap is not None:
                t = z.div_(softcap).tanh_()
                z = t * softcap
            total += _rows_loss_and_grad(z, labels.index_select(0, rows), scale).sum()
            if softcap is not None:
                z.mul_(t.square_().neg_().add_(1.0))
            if divisor != 1.0:
                z.div_(divisor)
            if want_h or want_w:
                dz = z.to(hidden.dtype)
                if want_h:
                    grad_h.index_copy_(0, rows, dz @ weight.to(dz.dtype))
                if want_w:
                    grad_w.addmm_(dz.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        if reduction == "mean":
            return total / n if n else total / 0.0  # F.cross_entropy: nan when nothing is trained
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         reduction: str = "mean", ignore_index: int = IGNORE_INDEX,
                         chunk_size: int | None = None, divisor: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T`` (``/ divisor``, then soft-capped to ``softcap``
    when given) against ``labels`` without full logits.

    ``hidden [..., H]``, ``labels [...]`` (already shifted for causal LM), ``weight [V, H]``;
    ``reduction`` is ``"mean"`` (over trained tokens) or ``"sum"``. Under autocast the head's
    matmuls run in the autocast dtype, as ``lm_head``'s would (the loss itself in float32)."""
    check_choice(reduction, ("mean", "sum"), "reduction", where="linear_cross_entropy")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or default_chunk(weight.shape[0])
    device_type = h2.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h2, weight = h2.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(h2, weight, labels.reshape(-1).to(h2.device), reduction, ignore_index,
                                                chunk, float(divisor), None if softcap is None else float(softcap))

