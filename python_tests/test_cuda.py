"""The optimizer on a GPU: run by benchmarks/gpu_check.sh on a CUDA machine, skipped
cleanly without one."""

from __future__ import annotations

import pytest
import torch
from _backends import cuda_backends, needs_cuda
from _lockstep import (
    SHORT_FAILURES,
    Shadow,
    data,
    forward_backward,
    make_model,
    mlp_step,
    short_schedule,
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
    for step, step_index in enumerate(short_schedule()):  # spikes and a NaN gradient
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index))
        shadow.assert_matches(step)


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
        for step_index in short_schedule():  # two spikes and a NaN gradient: 3 retraces
            opt.zero_grad()
            opt.step(forward_backward(model, inputs, target, step_index))
            decisions.append(opt.last_step_retraced)
        runs.append(
            (decisions, opt.control_state.cpu(), [p.detach().cpu() for p in model.parameters()])
        )
    (d_host, c_host, p_host), (d_dev, c_dev, p_dev) = runs
    assert d_host == d_dev
    assert all(d_host[step] for step in SHORT_FAILURES) and sum(d_host) >= 3
    torch.testing.assert_close(c_host, c_dev, rtol=1e-9, atol=0.0)
    for a, b in zip(p_host, p_dev, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("memory", ["standard", "recover"])
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_graph_captures_a_training_step(backend: str, memory: str) -> None:
    """Forward, backward and opt.step(loss) captured once, replayed like eager steps
    (offload refuses capture: the test below)."""
    inputs, target = (t.cuda() for t in data())
    eager_model = make_model().cuda()
    graph_model = make_model().cuda()
    eager = ELRA(eager_model.parameters(), backend=backend, memory=memory)
    graphed = ELRA(graph_model.parameters(), backend=backend, memory=memory)
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


@needs_cuda
def test_cuda_offload_takes_the_recover_steps_with_reused_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """memory="offload" on a GPU (copy stream, events, pinned host x_{t-1}): from the same
    state it takes the recover mode's step, and its steps create no CUDA event (one per
    staging slot, made once)."""
    inputs, target = (t.cuda() for t in data())
    model, twin = make_model().cuda(), make_model().cuda()
    backend = cuda_backends()[0]
    recover = ELRA(model.parameters(), backend=backend, memory="recover", wd=0.999)
    offload = ELRA(twin.parameters(), backend=backend, memory="offload", wd=0.999, offload_chunk=37)
    made = []
    real_event = torch.cuda.Event

    def counted_event(*args, **kwargs):
        made.append(step)
        return real_event(*args, **kwargs)

    for step, step_index in enumerate(short_schedule()[:70]):
        offload.load_state_dict(recover.state_dict())
        for mine, theirs in zip(twin.parameters(), model.parameters(), strict=True):
            mine.data.copy_(theirs.detach())
        recover.zero_grad()
        offload.zero_grad()
        recover.step(forward_backward(model, inputs, target, step_index))
        loss = forward_backward(twin, inputs, target, step_index)
        if step >= 2:  # after the law's compile: only the offload step is counted
            monkeypatch.setattr(torch.cuda, "Event", counted_event)
        offload.step(loss)
        monkeypatch.setattr(torch.cuda, "Event", real_event)
        assert recover.last_step_retraced == offload.last_step_retraced, step_index
        for mine, theirs in zip(twin.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert made == []
    assert recover.retrace_count >= 2


@needs_cuda
def test_cuda_graph_capture_of_offload_is_refused_before_anything_moves() -> None:
    """memory="offload" cannot be captured (README, CUDA graphs): the step raises a clear
    error while capturing, before it enqueues any work; eager steps go on afterwards."""
    inputs, target = (t.cuda() for t in data())
    model = make_model().cuda()
    opt = ELRA(model.parameters(), backend=cuda_backends()[0], memory="offload")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            mlp_step(model, inputs, target, opt)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    params = [p.detach().clone() for p in model.parameters()]
    opt.layout.synchronize()
    x_prev = opt.layout.stores[0].tensor.clone()
    state = opt.control_state.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        with pytest.raises(RuntimeError, match=r"offload.*cannot be captured"):
            opt.step(loss)
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert torch.equal(opt.layout.stores[0].tensor, x_prev)
    assert torch.equal(opt.control_state, state)
    mlp_step(model, inputs, target, opt)  # eager steps still work
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
