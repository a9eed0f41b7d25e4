"""Fixtures for the kernel tests.

``triton_interpret`` runs loraforge's Triton kernels in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``): loraforge builds its kernels at first launch, per mode, so setting the
variable per test is enough (no subprocess needed). ``reference_kernels`` forces the PyTorch
references (``LORAFORGE_KERNELS=reference``). Import both into a test module to use them.
"""

from __future__ import annotations

import pytest
import torch


def triton_runs_interpreted() -> bool:
    from loraforge.kernels.dispatch import triton_importable

    return triton_importable()


@pytest.fixture
def triton_interpret(monkeypatch):
    if not triton_runs_interpreted():
        pytest.skip("triton is not importable, so its interpreter cannot run the kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LORAFORGE_KERNELS", raising=False)
    from loraforge.kernels.dispatch import use_triton

    assert use_triton(torch.empty(0))


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setenv("LORAFORGE_KERNELS", "reference")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere fails every tolerance)."""
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
