"""The merge passes GPUs take, run here on the CPU: the same torch ops, so the same roundings.

On an accelerator slerp's combine pass is mergekit's eager ops over large pieces
(or a fused Triton kernel, which checks itself against those ops on the device
before it is used; search/engine/methods/fused_triton.py), with the coefficients
left on the device. These tests run that eager path on CPU tensors against
mergekit's slerp, bit for bit, and check that the host-side decision of when t
selects one side agrees with the coefficients it stands for.
"""

from __future__ import annotations

import pytest
import torch

from search.engine.methods import Context, Inputs, StatCache
from search.engine.methods import fused
from search.engine.methods import slerp as ours


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_device_eager_pass_is_mergekits_slerp_to_the_bit(dtype, monkeypatch):
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    def device_pass(a, b, ca, cb, out, ctx):
        fused.device_weighted_sum(a.reshape(-1), b.reshape(-1), ca.reshape(1), cb.reshape(1), out.view(-1), ctx)

    monkeypatch.setattr(ours, "weighted_sum", device_pass)
    monkeypatch.setattr(fused, "piece_size", lambda t: 300_007)  # several pieces, ragged ends
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(1024, 900, generator=g) * 0.02).to(dtype)
    b = (a.float() + torch.randn(1024, 900, generator=g) * 0.01).to(dtype)
    a.view(-1)[:64] = 0.0
    a.view(-1)[64:128] = -0.0
    b.view(-1)[100:200] = torch.finfo(dtype).tiny / 4  # subnormal
    ctx = Context(cache=StatCache())
    for t in (0.0, 0.13, 0.5, 0.77, 1.0):
        got = ours.merge(Inputs("w", [a, b], [None, None], 0), {"t": t}, [{}, {}], ctx)
        want = mergekit_slerp(torch.tensor([t]), a.unsqueeze(0), b.unsqueeze(0))[0]
        assert got.dtype == want.dtype
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), t


@pytest.mark.parametrize("t", [0.0, 1.0, -0.0, 1e-50, 1 - 1e-12, 1e-7, 0.5, 0.999, 1.0 + 1e-9])
@pytest.mark.parametrize("dot", [0.3, -0.7, 0.99999, 1.0, -1.0])
def test_side_chosen_from_t_alone_has_exact_coefficients(t, dot):
    """When t selects a side on the host, the coefficients mergekit computes are exactly (1, 0) or (0, 1)."""
    d = torch.tensor([[dot]])
    coef_a, coef_b = ours.coefficients(t, d, d.abs() > ours.DOT_THRESHOLD)
    side = ours.selected_side(t, torch.float32)
    if side == "a":
        assert (float(coef_a), float(coef_b)) == (1.0, 0.0)
    elif side == "b":
        assert (float(coef_a), float(coef_b)) == (0.0, 1.0)
    else:
        assert float(torch.tensor(t, dtype=torch.float32)) not in (0.0, 1.0)


def test_fused_kernel_is_never_used_off_the_gpu():
    from search.engine.methods import fused_triton

    x = torch.ones(10)
    assert fused_triton.weighted_sum(x, x, torch.ones(1), torch.ones(1), torch.empty(10)) is False


def test_rescaling_decided_on_the_device_gives_the_same_values():
    """DARE's L1 rescaling without a host branch: the same values as mergekit's branch, small norms included."""
    from search.engine.methods.task_arithmetic import Selection, l1_norms_apply

    g = torch.Generator().manual_seed(2)
    for scale in (1.0, 1e-9, 0.0):
        x = (torch.randn(300, 70, generator=g) * scale).to(torch.bfloat16)
        for mask in ((torch.rand(300, 70, generator=g) < 0.3).to(x.dtype), torch.zeros_like(x)):
            masked = x * mask
            norms = Selection(scale=(x.abs().sum(), masked.abs().sum()))
            host = l1_norms_apply(masked.clone(), norms, on_device=False)
            device = l1_norms_apply(masked.clone(), norms, on_device=True)
            assert torch.equal(host.view(torch.int16), device.view(torch.int16)), scale
