"""Fused backends in the optimizer: same decisions and parameters as the reference.

The fused optimizer (flat buffers + ``cpp`` / ``triton`` kernels) is checked against the
float64 reference optimizer in lock step (see ``_lockstep.py``).
"""

from __future__ import annotations

import os

import pytest
import torch
from _lockstep import (
    NAN_GRAD,
    SPIKES,
    Shadow,
    assert_round_trip,
    data,
    forward_backward,
    make_model,
    no_host_reads,
)

from elra_fused import ELRA, ops
from elra_fused.flat import ParameterMovedError

IN_CI = os.environ.get("CI", "").lower() == "true"


def fused_backends() -> list[str]:
    """Backends to test on CPU; in CI the C++ backend must be there."""
    found = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
    if IN_CI:
        assert "cpp" in found, ops.cpp_extension_status()
    return [*found, "reference"]


BACKENDS = fused_backends()
#: Steps per backend: the triton interpreter is slow, 300 steps of a tiny MLP is cheap.
STEPS = 300


@pytest.mark.parametrize("backend", BACKENDS)
def test_lockstep_against_float64_reference(backend: str) -> None:
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=True, wd=0.9999, cycle_steps=25)
    shadow = Shadow(opt, cycle_steps=25)
    decisions = []
    for step_index in range(STEPS):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index))
        shadow.assert_matches(step_index)
        decisions.append(opt.last_step_retraced)
    assert decisions[SPIKES[0]] and decisions[NAN_GRAD] and decisions[SPIKES[1]]
    assert opt.retrace_count >= 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_makes_no_host_sync(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=True, cycle_steps=2)
    for step_index in range(3):
        opt.zero_grad()
        opt.step(forward_backward(model, inputs, target, step_index))
    opt.zero_grad()
    loss = forward_backward(model, inputs, target, NAN_GRAD)

    with no_host_reads(monkeypatch):
        opt.step(loss)
        opt.zero_grad()
    assert opt.last_step_retraced


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_is_bit_identical(backend: str) -> None:
    assert_round_trip(lambda model: ELRA(model.parameters(), backend=backend, cycle_steps=6))


def test_auto_backend_choice() -> None:
    opt = ELRA(make_model().parameters())
    expected = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"
    assert opt.backend == expected
    assert opt.flat == (expected != "reference")
    assert ELRA(make_model(torch.float64).parameters()).backend == "reference"
    with pytest.raises(ValueError, match="float64"):
        ELRA(make_model(torch.float64).parameters(), backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        ELRA(make_model().parameters(), backend="cuda-magic")


def test_flat_zero_grad_keeps_buffer_views() -> None:
    model = make_model()
    opt = ELRA(model.parameters(), backend="reference", flat=True)
    inputs, target = data()
    forward_backward(model, inputs, target, 0)
    opt.zero_grad()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)
    forward_backward(model, inputs, target, 0)
    assert all(g.abs().sum() > 0 for g in grads)  # autograd accumulated into the views


def test_set_to_none_grads_give_the_same_step() -> None:
    results = []
    for set_to_none in (False, True):
        model = make_model()
        inputs, target = data()
        opt = ELRA(model.parameters(), backend="reference", flat=True)
        for step_index in range(5):
            if set_to_none:
                model.zero_grad(set_to_none=True)
            else:
                opt.zero_grad()
            opt.step(forward_backward(model, inputs, target, step_index))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_flat_skips_params_without_grad_even_with_weight_decay() -> None:
    model = make_model()
    extra = torch.nn.Parameter(torch.ones(4))
    opt = ELRA([*model.parameters(), extra], backend="reference", flat=True, wd=0.5)
    inputs, target = data()
    for step_index in range(4):
        model.zero_grad(set_to_none=True)
        extra.grad = None
        opt.step(forward_backward(model, inputs, target, step_index))
    assert torch.equal(extra.detach(), torch.ones(4))


def test_param_groups_frozen_params_and_group_wd_in_flat_mode() -> None:
    model = make_model()
    model[2].bias.requires_grad_(False)
    frozen_before = model[2].bias.detach().clone()
    opt = ELRA(
        [
            {"params": list(model[0].parameters()), "wd": 0.9},
            {"params": list(model[2].parameters())},
        ],
        backend="reference",
        flat=True,
    )
    reference_model = make_model()
    reference_model[2].bias.requires_grad_(False)
    reference = ELRA(
        [
            {"params": list(reference_model[0].parameters()), "wd": 0.9},
            {"params": list(reference_model[2].parameters())},
        ],
        backend="reference",
    )
    inputs, target = data()
    for step_index in range(10):
        opt.zero_grad()
        reference.zero_grad()
        opt.step(forward_backward(model, inputs, target, step_index))
        reference.step(forward_backward(reference_model, inputs, target, step_index))
    for p, r in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert torch.equal(model[2].bias.detach(), frozen_before)


def test_moved_model_raises_and_keeps_weights() -> None:
    model = make_model()
    opt = ELRA(model.parameters(), backend="reference", flat=True)
    inputs, target = data()
    model.double()
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.mse_loss(model(inputs.double()), target.double())
    loss.backward()
    with pytest.raises(ParameterMovedError, match="moved or re-allocated"):
        opt.step(loss)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_train(dtype: torch.dtype) -> None:
    backend = BACKENDS[0]
    model = make_model(dtype)
    inputs, target = data(dtype)
    opt = ELRA(model.parameters(), backend=backend, flat=True, cycle_steps=20)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        opt.step(loss)
        losses.append(loss.float().item())
    assert losses[-1] < 0.5 * losses[0]


def test_torch_compile_model() -> None:
    backend = BACKENDS[0]
    model = make_model()
    compiled = torch.compile(model)
    opt = ELRA(model.parameters(), backend=backend)
    inputs, target = data()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(compiled(inputs), target)
        loss.backward()
        opt.step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt._buffers[0].gather_grads() == []  # gradients landed in the flat buffer


# ---------------------------------------------------------------------------------------
# GPU: run by benchmarks/gpu_check.sh on a CUDA machine; skipped cleanly without one.
# ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["cpp", "triton"]
    return [b for b in ("cpp", "triton") if b in ops.available_backends("cuda")]


def mse_step(model, opt, inputs, target) -> torch.Tensor:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(inputs), target)
    loss.backward()
    opt.step(loss)
    return loss


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_step_has_no_sync(backend: str) -> None:
    model = make_model().cuda()
    inputs, target = (t.cuda() for t in data())
    opt = ELRA(model.parameters(), backend=backend)
    mse_step(model, opt, inputs, target)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), target)
            loss.backward()
            opt.step(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_lockstep_against_reference(backend: str) -> None:
    model = make_model().cuda()
    inputs, target = (t.cuda() for t in data())
    opt = ELRA(model.parameters(), backend=backend, cycle_steps=25)
    shadow = Shadow(opt, cycle_steps=25)
    for step_index in range(80):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index % 60))
        shadow.assert_matches(step_index)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_graph_captures_a_training_step(backend: str) -> None:
    """Forward, backward and opt.step(loss) captured once, replayed like eager steps."""
    inputs, target = (t.cuda() for t in data())
    eager_model = make_model().cuda()
    graph_model = make_model().cuda()
    eager = ELRA(eager_model.parameters(), backend=backend)
    graphed = ELRA(graph_model.parameters(), backend=backend)
    warmup, replays = 3, 20
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            mse_step(graph_model, graphed, inputs, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = mse_step(graph_model, graphed, inputs, target)
    # Capturing records the step without running it; replay runs it.
    for _ in range(replays):
        graph.replay()
    for _ in range(warmup + replays):
        eager_loss = mse_step(eager_model, eager, inputs, target)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert graphed.alpha == pytest.approx(eager.alpha, rel=1e-5)


def test_param_group_added_later_gets_its_own_flat_buffer() -> None:
    model = make_model()
    opt = ELRA(list(model[0].parameters()), backend=BACKENDS[0], flat=True)
    opt.add_param_group({"params": list(model[2].parameters()), "wd": 0.5})
    before = model[2].weight.detach().clone()
    inputs, target = data()
    opt.zero_grad()
    opt.step(forward_backward(model, inputs, target, 0))
    # first step: x_1 = wd x_0 - alpha_0 G_0 with wd = 0.5 for the added group
    expected = 0.5 * before - opt.alpha * model[2].weight.grad
    torch.testing.assert_close(model[2].weight.detach(), expected, rtol=1e-6, atol=1e-7)
    if opt.backend != "reference":
        bad = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        with pytest.raises(ValueError, match="does not support"):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 2
