"""AdamW8bit against bitsandbytes' AdamW8bit (CPU backend) and a straightforward re-implementation.

bitsandbytes 0.50's CPU kernel requantizes through a 65536-entry table over [-1, 1] instead of a
nearest-code search (its CUDA kernel searches), so where two codes of the dynamic map lie closer
than one table step (2 / 65535, the map's finest codes near zero) it may pick a code several
indices away; everywhere else its code equals the nearest one or a neighbour. The checks below
allow exactly that and nothing more.
"""

from __future__ import annotations

import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from loraforge.optim import AdamW8bit  # noqa: E402

LUT_STEP = 2.0 / 65535
# a partial last block of 256, 1-D, two of whole blocks (updated together), a 32-bit small tensor
SHAPES = [(70, 150), (5000,), (32, 256), (48, 128), (10, 30)]


def _maps():
    return {1: bnb.functional.create_dynamic_map(signed=True), 2: bnb.functional.create_dynamic_map(signed=False)}


def _pair(dtype=torch.float32, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    return ours, AdamW8bit(ours, **kw), theirs, bnb.optim.AdamW8bit(theirs, **kw)


def _grads(params, gen, scale=1.0):
    return [torch.randn(p.shape, generator=gen).to(p.dtype) * scale for p in params]


def _assert_codes_match(ours, theirs, code, absmax):
    """Codes equal or adjacent, or (bnb's table) their values closer than one table step."""
    ours, theirs = ours.long().reshape(-1), theirs.long().reshape(-1)
    off = (ours - theirs).abs()
    close_values = (code[ours] - code[theirs]).abs() <= LUT_STEP
    assert bool(((off <= 1) | close_values).all()), f"codes differ by up to {off.max().item()}"
    assert (off > 0).float().mean().item() < 0.05


def _reference_step(p, grad, m_codes, absmax1, v_codes, absmax2, step, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """The 8-bit update spelled out: lookups, fp32 AdamW, nearest-code requantization by argmin."""
    maps = _maps()
    blocks = absmax1.numel()
    n = p.numel()

    def deq(codes, absmax, code):
        vals = code[codes.reshape(-1).long()]
        scale = absmax.repeat_interleave(256)[:n]
        return (vals * scale).reshape(p.shape)

    def quant(x, code):
        flat = torch.cat([x.reshape(-1), x.new_zeros(blocks * 256 - n)]).reshape(blocks, 256)
        absmax = flat.abs().max(dim=1).values
        normed = (flat / absmax[:, None]).reshape(-1)[:n]
        codes = (normed[:, None] - code[None, :]).abs().argmin(dim=1)
        return codes.to(torch.uint8).reshape(x.shape), absmax

    g = grad.float()
    m = deq(m_codes, absmax1, maps[1]).mul(betas[0]).add(g, alpha=1 - betas[0])  # torch's rounding
    v = deq(v_codes, absmax2, maps[2]).mul(betas[1]).addcmul(g, g, value=1 - betas[1])
    c1 = 1 - betas[0] ** step
    c2 = math.sqrt(1 - betas[1] ** step)
    new_p = p.float() * (1 - lr * wd) - lr / c1 * m / (v.sqrt() / c2 + eps)
    return new_p, quant(m, maps[1]), quant(v, maps[2])


def test_state_layout_and_small_tensor_fallback():
    ours, opt, theirs, ref = _pair(lr=1e-3)
    for p, q, g in zip(ours, theirs, _grads(ours, torch.Generator().manual_seed(1))):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    for p, q in zip(ours, theirs):
        mine, bnbs = opt.state[p], ref.state[q]
        assert mine["step"] == bnbs["step"] == 1
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert (key in mine) == (key in bnbs)
            if key in mine:
                assert mine[key].dtype == bnbs[key].dtype and mine[key].shape == bnbs[key].shape
    big, small = ours[0], ours[-1]
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert opt.state[big]["absmax1"].numel() == math.ceil(70 * 150 / 256)
    assert opt.state[small]["state1"].dtype == torch.float32


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_at_a_time_matches_bitsandbytes(weight_decay):
    """From the same state each step, parameters and absmax are bit-identical to bnb's."""
    ours, opt, theirs, ref = _pair(lr=1e-3, weight_decay=weight_decay)
    maps = _maps()
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        for p, q, g in zip(ours, theirs, _grads(ours, gen, scale=1 + step)):
            p.grad, q.grad = g.clone(), g.clone()
            if step:
                p.data.copy_(q.data)
                for key, value in ref.state[q].items():
                    if torch.is_tensor(value) and key in opt.state[p]:
                        opt.state[p][key].copy_(value)
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q)
            mine, bnbs = opt.state[p], ref.state[q]
            if mine["state1"].dtype == torch.float32:  # bnb's 32-bit rule, bit for bit
                assert torch.equal(mine["state1"], bnbs["state1"])
                assert torch.equal(mine["state2"], bnbs["state2"])
                continue
            for i in (1, 2):
                assert torch.equal(mine[f"absmax{i}"], bnbs[f"absmax{i}"])
                _assert_codes_match(mine[f"state{i}"], bnbs[f"state{i}"], maps[i], bnbs[f"absmax{i}"])


def test_matches_straightforward_reference():
    """Codes are the nearest ones (argmin), parameters the fp32 AdamW rule on dequantized states."""
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(33, 257))
    opt = AdamW8bit([p], lr=2e-3, weight_decay=0.05)
    ref_p = p.detach().clone()
    blocks = math.ceil(p.numel() / 256)
    m_codes = v_codes = None
    for step in range(1, 4):
        g = torch.randn_like(p)
        p.grad = g.clone()
        if m_codes is None:
            m_codes = torch.full(p.shape, 127, dtype=torch.uint8)  # code of 0.0 in the signed map
            v_codes = torch.zeros(p.shape, dtype=torch.uint8)
            absmax1 = absmax2 = torch.zeros(blocks)
        ref_p, (m_codes, absmax1), (v_codes, absmax2) = _reference_step(
            ref_p, g, m_codes, absmax1, v_codes, absmax2, step, lr=2e-3, wd=0.05
        )
        opt.step()
        state = opt.state[p]
        torch.testing.assert_close(p.detach(), ref_p, atol=1e-6, rtol=1e-6)
        assert torch.equal(state["absmax1"], absmax1) and torch.equal(state["absmax2"], absmax2)
        assert torch.equal(state["state1"], m_codes)
        assert torch.equal(state["state2"], v_codes)
        # continue the reference from the optimizer's own parameters: compare one step at a time
        ref_p = p.detach().clone()


def test_several_steps_track_bitsandbytes_and_fp32():
    """Free-running: as close to bnb as bnb's own 8-bit tests allow, and no further from fp32 AdamW."""
    ours, opt, theirs, ref = _pair(lr=1e-3, weight_decay=0.1)
    full = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    exact = torch.optim.AdamW(full, lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(4)
    for _ in range(8):
        for p, q, f, g in zip(ours, theirs, full, _grads(ours, gen)):
            p.grad, q.grad, f.grad = g.clone(), g.clone(), g.clone()
        opt.step()
        ref.step()
        exact.step()
    for p, q, f in zip(ours[:-1], theirs[:-1], full[:-1]):  # the 8-bit ones
        not_close = ~torch.isclose(p, q, atol=1e-5, rtol=1e-3)
        assert not_close.float().mean().item() < 0.002
        # ours and bnb agree ten times better than either agrees with fp32 AdamW
        assert (p - q).abs().mean().item() < 0.1 * (q - f).abs().mean().item()
        assert (p - f).abs().mean().item() <= 1.05 * (q - f).abs().mean().item()


def test_bfloat16_parameters_keep_fp32_state():
    ours, opt, theirs, ref = _pair(dtype=torch.bfloat16, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q, g in zip(ours, theirs, _grads(ours, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert p.dtype == torch.bfloat16
        state = opt.state[p]
        assert state["state1"].dtype in (torch.uint8, torch.float32)
        if "absmax1" in state:
            assert state["absmax1"].dtype == torch.float32
        # one bf16 ulp at most where bnb's table picked another code
        assert (~torch.isclose(p.float(), q.float(), atol=0, rtol=2**-7)).float().mean().item() < 0.01


def test_chunked_and_batched_updates_are_identical():
    """Whole-block tensors updated together, or one by one in chunks of whole blocks: same result."""
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(s, generator=gen) for s in [(41, 131), (32, 256), (48, 128), (256,)]]
    results = []
    for chunk in (AdamW8bit([torch.zeros(1)]).chunk_elements, 512):  # default: batched; 512: chunked
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=256)
        opt.chunk_elements = chunk
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([(p.detach().clone(), dict(opt.state[p])) for p in params])
    for (p1, s1), (p2, s2) in zip(*results):
        assert torch.equal(p1, p2)
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(s1[key], s2[key])
