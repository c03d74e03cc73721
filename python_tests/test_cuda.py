"""The optimizer on a GPU: run by benchmarks/gpu_check.sh on a CUDA machine, skipped
cleanly without one."""

from __future__ import annotations

import pytest
import torch
from _backends import cuda_backends, needs_cuda
from _lockstep import (
    Shadow,
    data,
    forward_backward,
    make_model,
    mlp_step,
)

from elra_fused import ELRA


@needs_cuda
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_step_has_no_sync(backend: str, flat: bool) -> None:
    model = make_model().cuda()
    inputs, target = (t.cuda() for t in data())
    opt = ELRA(model.parameters(), backend=backend, flat=flat)
    mlp_step(model, inputs, target, opt)
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
    assert opt.compile_control  # the CUDA default: the law compiled, no eager fallback


@needs_cuda
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_lockstep_against_reference(backend: str, flat: bool) -> None:
    model = make_model().cuda()
    inputs, target = (t.cuda() for t in data())
    opt = ELRA(model.parameters(), backend=backend, flat=flat, cycle_steps=25)
    shadow = Shadow(opt)
    for step_index in range(80):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index % 60))
        shadow.assert_matches(step_index)


@needs_cuda
def test_cuda_host_control_takes_the_device_laws_decisions() -> None:
    """host_control set by hand on a GPU: the law on floats, state read back each step.
    Same decisions as the device law; values close (CUDA's fp64 exp/log may differ from
    the host's libm in the last bit)."""
    inputs, target = (t.cuda() for t in data())
    runs = []
    for host in (True, False):
        model = make_model().cuda()
        opt = ELRA(model.parameters(), backend=cuda_backends()[0], cycle_steps=25)
        assert not opt.host_control  # the GPU default
        opt.host_control = host
        decisions = []
        for step_index in range(80):
            opt.zero_grad()
            opt.step(forward_backward(model, inputs, target, step_index % 60))
            decisions.append(opt.last_step_retraced)
        runs.append(
            (decisions, opt.control_state.cpu(), [p.detach().cpu() for p in model.parameters()])
        )
    (d_host, c_host, p_host), (d_dev, c_dev, p_dev) = runs
    assert d_host == d_dev and sum(d_host) >= 3
    torch.testing.assert_close(c_host, c_dev, rtol=1e-9, atol=0.0)
    for a, b in zip(p_host, p_dev, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
            mlp_step(graph_model, inputs, target, graphed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = mlp_step(graph_model, inputs, target, graphed)
    # Capturing records the step without running it; replay runs it.
    for _ in range(replays):
        graph.replay()
    for _ in range(warmup + replays):
        eager_loss = mlp_step(eager_model, inputs, target, eager)
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert graphed.alpha == pytest.approx(eager.alpha, rel=1e-5)
    assert graphed.compile_control and eager.compile_control  # compiled law in the graph
