"""Chunked linear + cross-entropy against F.cross_entropy on the full logits (float64), with ignored
labels (-100), chunk boundaries that cut rows unevenly, "mean" and "sum", gradients for the hidden
states and the head weight; the Triton row kernel (interpreted) and the PyTorch path; Granite's
logit divisor and Gemma's final soft-cap.
Tolerance: relative error <= 1e-5 (float32), <= 2e-2 (bfloat16 hidden states and weight).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_kernels import reference_kernels, rel_err, triton_interpret  # noqa: F401

from loraforge.errors import UserError
from loraforge.kernels.cross_entropy import linear_cross_entropy


def _case(dtype, seed, ignore_first=5):
    torch.manual_seed(seed)
    hidden = torch.randn(2, 9, 32, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(250, 32, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, 250, (2, 9))
    labels[0, :ignore_first] = -100
    labels[1, -1] = -100
    return hidden, weight, labels


def _expected(hidden, weight, labels, reduction, scale, divisor=1.0, softcap=None):
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = (h @ w.t()) / divisor
    if softcap is not None:  # as Gemma2ForCausalLM.forward
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits.view(-1, 250), labels.view(-1), reduction=reduction)
    return (loss, *torch.autograd.grad(loss * scale, (h, w)))


def _check(dtype, reduction, tol, chunk_size=4, **head):
    hidden, weight, labels = _case(dtype, seed=hash(reduction) % 100)
    loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=chunk_size, **head)
    dh, dw = torch.autograd.grad(loss * 0.5, (hidden, weight))
    want, want_dh, want_dw = _expected(hidden, weight, labels, reduction, 0.5, **head)
    assert rel_err(loss, want) < tol and rel_err(dh, want_dh) < tol and rel_err(dw, want_dw) < tol
    assert dh[0, :5].abs().max() == 0  # ignored positions get no gradient
    assert dw.dtype == weight.dtype and dh.dtype == hidden.dtype


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_rows_kernel(triton_interpret, reduction):
    _check(torch.float32, reduction, 1e-5)


@pytest.mark.parametrize("head", [{"divisor": 4.0}, {"softcap": 1.5}, {"divisor": 0.5, "softcap": 2.0}])
def test_logit_divisor_and_softcap(triton_interpret, head):
    _check(torch.float32, "mean", 1e-5, **head)


def test_triton_rows_kernel_bf16(triton_interpret):
    _check(torch.bfloat16, "mean", 2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_path(reference_kernels, reduction, monkeypatch):
    _check(torch.float32, reduction, 1e-5)
    # chunks of 8 trained rows, their softmax passes in slices of 3 (uneven at both levels)
    monkeypatch.setattr("loraforge.kernels.cross_entropy.ROWS_IN_CACHE", 3)
    _check(torch.float32, reduction, 1e-5, chunk_size=8)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_head_matmul_in_vocabulary_blocks(reference_kernels, monkeypatch, dtype, tol):
    """The CPU head matmul in blocks of 64 vocabulary rows (250 = 3 x 64 + 58): the loss and both
    gradients as F.cross_entropy's, and the logits bit for bit those of one matmul."""
    from loraforge.kernels.cross_entropy import _head_logits

    monkeypatch.setattr("loraforge.kernels.cross_entropy.VOCAB_BLOCK", 64)
    _check(dtype, "mean", tol)
    hidden, weight, _ = _case(dtype, seed=4)
    h = hidden.detach().reshape(-1, 32)
    assert torch.equal(_head_logits(h, weight.detach()), h @ weight.detach().t())


def test_frozen_head_and_all_ignored(reference_kernels):
    hidden, weight, labels = _case(torch.float32, seed=3)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels)
    (dh,) = torch.autograd.grad(loss, (hidden,))
    want, want_dh, _ = _expected(hidden, weight, labels, "mean", 1.0)
    assert rel_err(dh, want_dh) < 1e-5
    none = torch.full_like(labels, -100)
    assert linear_cross_entropy(hidden, weight, none, reduction="sum").item() == 0.0
    assert torch.isnan(linear_cross_entropy(hidden, weight, none))  # as F.cross_entropy


def test_bad_reduction():
    hidden, weight, labels = _case(torch.float32, seed=1)
    with pytest.raises(UserError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
