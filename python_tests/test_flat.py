"""Flat buffers: parameters and gradients as views into one vector per bucket."""

from __future__ import annotations

import pytest
import torch

from elra_fused import ELRA, ops
from elra_fused.flat import ParameterMovedError, build_flat_buffers, check_gradient

BACKEND = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"


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


def test_zero_grad_replaces_gradients_allocated_elsewhere() -> None:
    """After ``model.zero_grad()`` (``.grad`` None) autograd allocates gradients outside
    the buffer; the buffer's zero_grad must zero them too (the views replace them), or
    the next backward adds to the old values."""
    net = model()
    (buffer,) = build_flat_buffers([{"params": list(net.parameters())}])
    inputs = torch.randn(4, 5)
    net(inputs).sum().backward()
    expected = buffer.grad.clone()
    net.zero_grad(set_to_none=True)
    net(inputs).sum().backward()
    assert net[0].weight.grad.data_ptr() != buffer.grad.data_ptr()  # allocated elsewhere
    buffer.zero_grad()
    for index, param in enumerate(net.parameters()):
        assert param.grad.data_ptr() == buffer.view(buffer.grad, index).data_ptr()
        assert not param.grad.any()
    net(inputs).sum().backward()
    assert buffer.gather_grads() == []
    assert torch.equal(buffer.grad, expected)


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


def _sparse(dense: torch.Tensor) -> torch.Tensor:
    return dense.to_sparse()


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (_sparse, "has a sparse gradient"),
        (lambda t: t.to_sparse_csr(), "has a torch.sparse_csr gradient"),
        (lambda t: t.to(torch.complex64), "has a complex gradient"),
        (lambda t: t.t(), r"has a gradient of shape \(3, 2\)"),
        (lambda t: t.to("meta"), "is on cpu but its gradient on meta"),
        (lambda t: t.long(), "has a gradient of dtype torch.int64"),
    ],
    ids=["sparse_coo", "sparse_csr", "complex", "shape", "device", "integer"],
)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
def test_check_gradient_names_what_a_flat_buffer_cannot_take(make, pattern: str) -> None:
    param = torch.nn.Parameter(torch.ones(2, 3))
    with pytest.raises(ValueError, match=f"^ELRA: p7 {pattern}"):
        check_gradient("p7", param, make(torch.ones(2, 3)))
    check_gradient("p7", param, torch.ones(2, 3, dtype=torch.float64))  # cast by the copy


def test_a_sparse_gradient_is_refused_before_the_buffer_changes() -> None:
    """A sparse gradient has no data pointer: the clear error, and neither the buffer nor
    any other ``.grad`` changed (a gradient from elsewhere earlier in the buffer stays)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    params = [*linear.parameters(), embedding.weight]
    (buffer,) = build_flat_buffers([{"params": params}], lambda g, i, p: f"p{i}")
    buffer.grad.fill_(7.0)
    elsewhere = torch.ones(2, 3)
    linear.weight.grad = elsewhere
    linear.bias.grad = None
    embedding.weight.grad = None
    embedding(torch.tensor([1, 3])).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(ValueError, match="^ELRA: p2 has a sparse gradient"):
        buffer.gather_grads()
    assert torch.equal(buffer.grad, torch.full_like(buffer.grad, 7.0))
    assert linear.weight.grad is elsewhere and linear.bias.grad is None
    assert embedding.weight.grad.is_sparse


def _embedding_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))


def _loss(model: torch.nn.Module, step_index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step_index)
    tokens = torch.randint(0, 10, (8,), generator=gen)
    target = torch.randn(8, 1, generator=gen)
    loss = torch.nn.functional.mse_loss(model(tokens), target)
    loss.backward()
    return loss


@pytest.mark.parametrize("wd", [1.0, 0.999])
def test_flat_optimizer_refuses_a_sparse_gradient_and_trains_on_once_fixed(wd: float) -> None:
    """``nn.Embedding(sparse=True)`` after ``model.zero_grad()`` (``.grad`` None, so
    autograd hands over a sparse gradient): the README's clear error before anything
    changes -- weights, state dict, control state -- and once the user zeroes with
    ``opt.zero_grad()`` (dense views) training goes on exactly like a twin's."""
    model, twin_model = _embedding_model(), _embedding_model()
    opt, twin = (
        ELRA(m.parameters(), wd=wd, flat=True, backend=BACKEND) for m in (model, twin_model)
    )

    def step(opt: ELRA, model: torch.nn.Module, step_index: int) -> None:
        opt.zero_grad()
        opt.step(_loss(model, step_index))

    for step_index in range(3):
        step(opt, model, step_index)
        step(twin, twin_model, step_index)
    weights = [p.detach().clone() for p in model.parameters()]
    prev = [t.clone() for entry in opt.state_dict()["state"].values() for t in entry.values()]
    control_state = opt.control_state.clone()
    model.zero_grad()  # set_to_none: the embedding's gradient comes back sparse
    loss = _loss(model, 3)
    with pytest.raises(ValueError, match="parameter 0 of param group 0 .* has a sparse gradient"):
        opt.step(loss)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    state = [t for entry in opt.state_dict()["state"].values() for t in entry.values()]
    assert all(torch.equal(a, b) for a, b in zip(state, prev, strict=True))
    assert torch.equal(opt.control_state, control_state)
    for step_index in range(3, 8):
        step(opt, model, step_index)
        step(twin, twin_model, step_index)
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opt.control_state, twin.control_state)
