"""Flat buffers: parameters and gradients as views into one vector per bucket."""

from __future__ import annotations

import pytest
import torch

from elra_fused.flat import ParameterMovedError, build_flat_buffers


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def test_params_and_grads_become_views_with_values_kept() -> None:
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}])
    assert buffer.numel == sum(b.numel() for b in before)
    for index, (param, old) in enumerate(zip(net.parameters(), before, strict=True)):
        assert torch.equal(param.detach(), old)
        assert param.data_ptr() == buffer.view(buffer.data, index).data_ptr()
        assert param.grad.data_ptr() == buffer.view(buffer.grad, index).data_ptr()
    net(torch.randn(4, 5)).sum().backward()
    flat_grads = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert torch.equal(buffer.grad, flat_grads)
    assert buffer.grad.abs().sum() > 0
    assert buffer.gather_grads() == []


def test_buckets_by_group_dtype_and_skips_frozen() -> None:
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    c = torch.nn.Parameter(torch.ones(4))
    frozen = torch.nn.Parameter(torch.ones(5), requires_grad=False)
    buffers = build_flat_buffers([{"params": [a, b, frozen]}, {"params": [c]}])
    assert [(buf.group_index, buf.data.dtype, buf.numel) for buf in buffers] == [
        (0, torch.float32, 3),
        (0, torch.float64, 2),
        (1, torch.float32, 4),
    ]
    assert frozen.grad is None


def test_regathers_grads_set_to_none() -> None:
    net = model()
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}])
    net.zero_grad(set_to_none=True)
    out = net(torch.randn(4, 5)).sum()
    out.backward()
    expected = [p.grad.clone() for p in net.parameters()]
    assert buffer.gather_grads() == []
    for index, (param, grad) in enumerate(zip(net.parameters(), expected, strict=True)):
        assert torch.equal(param.grad, grad)
        assert param.grad.data_ptr() == buffer.view(buffer.grad, index).data_ptr()


def test_missing_grads_become_zeros_and_are_reported() -> None:
    net = model()
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}])
    buffer.grad.fill_(7.0)
    net[0].bias.grad = None
    assert buffer.gather_grads() == [1]
    assert torch.equal(buffer.view(buffer.grad, 1), torch.zeros(7))


def test_zero_grad_is_one_fill_and_keeps_views() -> None:
    net = model()
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}])
    net(torch.randn(4, 5)).sum().backward()
    net[0].weight.grad = None
    buffer.zero_grad()
    assert torch.equal(buffer.grad, torch.zeros_like(buffer.grad))
    assert net[0].weight.grad.data_ptr() == buffer.grad.data_ptr()


def test_moved_parameter_is_detected() -> None:
    net = model()
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}], lambda g, i, p: f"p{i}")
    buffer.check()
    net.double()
    with pytest.raises(ParameterMovedError, match="p0 was moved or re-allocated"):
        buffer.check()


def test_reassigned_parameter_is_detected() -> None:
    net = model()
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}])
    net[2].bias.data = torch.zeros(3)
    with pytest.raises(ParameterMovedError, match="parameter 3 of param group 0"):
        buffer.check()
