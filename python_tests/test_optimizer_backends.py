"""Fused backends in the optimizer: same decisions and parameters as the reference.

The fused optimizer (``cpp`` / ``triton`` kernels, in both layouts: flat buffers and
per-parameter tensor lists) is checked against the float64 reference optimizer in lock
step (see ``_lockstep.py``).
"""

from __future__ import annotations

import io
import os
import warnings

import pytest
import torch
from _lockstep import (
    NAN_GRAD,
    SPIKES,
    Shadow,
    assert_nan_step_makes_no_host_sync,
    assert_round_trip,
    data,
    forward_backward,
    free_port,
    make_model,
    run_steps,
)

from elra_fused import ELRA, control, ops
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


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lockstep_against_float64_reference(backend: str, flat: bool) -> None:
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=flat, wd=0.9999, cycle_steps=25)
    shadow = Shadow(opt)
    decisions = []
    for step_index in range(STEPS):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index))
        shadow.assert_matches(step_index)
        decisions.append(opt.last_step_retraced)
    assert decisions[SPIKES[0]] and decisions[NAN_GRAD] and decisions[SPIKES[1]]
    assert opt.retrace_count >= 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
def test_host_control_is_bit_identical_to_the_device_law(flat: bool) -> None:
    """On CPU the law runs on Python floats; the tensor-op law (what a GPU runs), eager
    and through torch.compile (the GPU default), takes the same decisions and gives the
    same bits, retraces and NaN gradient included."""
    runs = []
    for host, compiled in ((True, False), (False, False), (False, True)):
        model = make_model()
        opt = ELRA(
            model.parameters(),
            backend=BACKENDS[0],
            flat=flat,
            wd=0.999,
            cycle_steps=25,
            compile_control=compiled,
        )
        assert opt.host_control  # the CPU default
        opt.host_control = host
        decisions = run_steps(opt, model, range(STEPS))
        assert opt.compile_control == compiled  # compiled without falling back
        runs.append(
            (decisions, opt.control_state.clone(), [p.detach().clone() for p in model.parameters()])
        )
    (d_host, c_host, p_host), *device_runs = runs
    assert sum(d_host) >= 3
    for d_dev, c_dev, p_dev in device_runs:
        assert d_host == d_dev
        assert torch.equal(c_host, c_dev)
        assert all(torch.equal(a, b) for a, b in zip(p_host, p_dev, strict=True))


def test_compiled_law_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing torch.compile costs a warning, not the step: same results as eager."""

    def broken_compile():
        def law(*args):
            raise RuntimeError("no compiler here")

        return law

    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = ELRA(model.parameters(), backend=BACKENDS[0], compile_control=compiled)
        opt.host_control = False
        if compiled:
            monkeypatch.setattr(control, "compiled_control_step", broken_compile)
            with pytest.warns(UserWarning, match="compile of the control law failed"):
                decisions = run_steps(opt, model, range(1))
            assert not opt.compile_control
            decisions += run_steps(opt, model, range(1, 20))
        else:
            decisions = run_steps(opt, model, range(20))
        runs.append((decisions, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_step_makes_no_host_sync(
    backend: str, flat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    opt = ELRA(model.parameters(), backend=backend, flat=flat, cycle_steps=2)
    assert_nan_step_makes_no_host_sync(opt, model, monkeypatch)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_is_bit_identical(backend: str, flat: bool) -> None:
    assert_round_trip(
        lambda model: ELRA(model.parameters(), backend=backend, flat=flat, cycle_steps=6)
    )


@pytest.mark.parametrize("saved_flat", [True, False], ids=["flat_to_lists", "lists_to_flat"])
def test_state_dict_moves_between_layouts(saved_flat: bool) -> None:
    """A state saved in one layout loads into the other and continues the same run (up to
    the summation order of the dots, which differs between the layouts)."""
    model = make_model()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=saved_flat, cycle_steps=6)
    run_steps(opt, model, range(8))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    model2 = make_model(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = ELRA(model2.parameters(), backend=BACKENDS[0], flat=not saved_flat, cycle_steps=6)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    pairs = list(zip(model.parameters(), model2.parameters(), strict=True))
    assert all(torch.equal(opt.state[p]["grad_prev"], opt2.state[q]["grad_prev"]) for p, q in pairs)
    assert run_steps(opt, model, range(8, 12)) == run_steps(opt2, model2, range(8, 12))
    for p, q in pairs:
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert opt2.alpha == pytest.approx(opt.alpha, rel=1e-5)


def test_auto_backend_choice() -> None:
    opt = ELRA(make_model().parameters())
    expected = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"
    assert opt.backend == expected
    assert not opt.flat  # per-parameter lists on the CPU; flat buffers are the CUDA default
    assert ELRA(make_model().parameters(), memory="recover").flat

    def channels_last() -> torch.nn.Module:  # its weight is not contiguous
        return torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

    assert ELRA(channels_last().parameters()).flat
    with pytest.raises(ValueError, match="not contiguous"):
        ELRA(channels_last().parameters(), flat=False)
    assert ELRA(make_model(torch.float64).parameters()).backend == "reference"
    with pytest.raises(ValueError, match="float64"):
        ELRA(make_model(torch.float64).parameters(), backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        ELRA(make_model().parameters(), backend="cuda-magic")


# ---------------------------------------------------------------------------------------
# Per-parameter layout: G_{t-1} kept by reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_keep_the_gradient_as_grad_prev(backend: str) -> None:
    """After a step each G_{t-1} is the gradient tensor autograd made: no copy, no buffer."""
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=False, cycle_steps=25)
    for step_index in (0, 1, NAN_GRAD):  # accepts, then a retrace
        opt.zero_grad()
        loss = forward_backward(model, inputs, target, step_index)
        grads = [p.grad for p in model.parameters()]
        opt.step(loss)
        params = list(model.parameters())
        assert all(opt.state[p]["grad_prev"] is g for p, g in zip(params, grads, strict=True))
    assert opt.last_step_retraced
    # The retrace copied G_{t-1} back over the rejected (NaN) gradient.
    assert all(torch.isfinite(opt.state[p]["grad_prev"]).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_copy_gradients_that_are_views_into_a_shared_buffer(backend: str) -> None:
    """DDP with gradient_as_bucket_view=True makes each .grad a view into its bucket and
    rewrites the bucket in place in the next backward. Such a G_t is copied into ELRA's
    own G_{t-1} instead of kept by reference: the run equals one with ordinary gradients,
    retraces and the NaN gradient included."""
    inputs, target = data()
    runs = []
    for as_views in (False, True):
        model = make_model()
        params = list(model.parameters())
        opt = ELRA(params, backend=backend, flat=False, cycle_steps=25)
        bucket = torch.zeros(sum(p.numel() for p in params))  # reused every step
        decisions = []
        for step_index in range(130):
            opt.zero_grad()
            loss = forward_backward(model, inputs, target, step_index)
            if as_views:
                offset = 0
                for p in params:
                    view = bucket[offset : offset + p.numel()].view_as(p)
                    view.copy_(p.grad)
                    p.grad = view
                    offset += p.numel()
            opt.step(loss)
            decisions.append(opt.last_step_retraced)
            assert all(opt.state[p]["grad_prev"]._base is None for p in params)
        runs.append((decisions, [p.detach().clone() for p in params]))
    (d_plain, p_plain), (d_views, p_views) = runs
    assert d_plain == d_views and sum(d_plain) >= 2
    assert all(torch.equal(a, b) for a, b in zip(p_plain, p_views, strict=True))


@pytest.mark.parametrize("change", ["model_zero_grad_in_place", "backward_without_zero_grad"])
def test_lists_refuse_a_grad_prev_changed_in_place(change: str) -> None:
    """The tensor kept as G_{t-1} was written after the step: a clear error, nothing changed."""
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=False)
    opt.zero_grad()
    opt.step(forward_backward(model, inputs, target, 0))
    if change == "model_zero_grad_in_place":
        model.zero_grad(set_to_none=False)
    loss = forward_backward(model, inputs, target, 1)  # accumulates into G_{t-1}
    before = [p.detach().clone() for p in model.parameters()]
    state_before = opt.control_state.clone()
    with pytest.raises(RuntimeError, match="modified in place.*flat=True"):
        opt.step(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert torch.equal(opt.control_state, state_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_zero_grad_without_none_and_repeated_steps(backend: str) -> None:
    """opt.zero_grad(set_to_none=False) (new zero tensors, G_{t-1} untouched) and a second
    step on the same gradient (G_t = G_{t-1}, held apart by one copy): lock step with
    the float64 reference."""
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=False, cycle_steps=10)
    shadow = Shadow(opt)
    for step_index in range(40):
        opt.zero_grad(set_to_none=False)
        if step_index > 0:
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        loss = forward_backward(model, inputs, target, step_index)
        shadow.step(loss)
        shadow.assert_matches(step_index)
        if step_index % 7 == 3:  # no backward in between
            shadow.step(loss)
            shadow.assert_matches(step_index)


def test_lists_follow_a_model_moved_after_construction() -> None:
    """No buffer to fall out of: a parameter cast after the optimizer was built still
    trains (reference backend) or gets a clear dtype error (fused backends)."""
    inputs, target = data()

    def cast_and_backward(model: torch.nn.Module) -> torch.Tensor:
        model.double()
        loss = torch.nn.functional.mse_loss(model(inputs.double()), target.double())
        loss.backward()
        return loss

    model = make_model()
    opt = ELRA(model.parameters(), backend="reference", flat=False)
    loss = cast_and_backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if BACKENDS[0] == "reference":
        return
    model = make_model()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=False)
    loss = cast_and_backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="float64"):
        opt.step(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


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


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_train(dtype: torch.dtype, flat: bool) -> None:
    backend = BACKENDS[0]
    model = make_model(dtype)
    inputs, target = data(dtype)
    opt = ELRA(model.parameters(), backend=backend, flat=flat, cycle_steps=20)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        opt.step(loss)
        losses.append(loss.float().item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("flat", [True, False])
def test_torch_compile_model(flat: bool) -> None:
    backend = BACKENDS[0]
    model = make_model()
    compiled = torch.compile(model)
    opt = ELRA(model.parameters(), backend=backend, flat=flat)
    inputs, target = data()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(compiled(inputs), target)
        loss.backward()
        opt.step(loss)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if flat:
        assert opt.layout.buffers[0].gather_grads() == []  # gradients landed in the flat buffer


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
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", cuda_backends())
def test_cuda_step_has_no_sync(backend: str, flat: bool) -> None:
    model = make_model().cuda()
    inputs, target = (t.cuda() for t in data())
    opt = ELRA(model.parameters(), backend=backend, flat=flat)
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
    assert opt.compile_control  # the CUDA default: the law compiled, no eager fallback


@pytest.mark.cuda
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


@pytest.mark.cuda
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
    assert graphed.compile_control and eager.compile_control  # compiled law in the graph


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
def test_param_group_added_later(flat: bool) -> None:
    """A group added after construction gets its own flat buffer, or joins the lists."""
    model = make_model()
    opt = ELRA(list(model[0].parameters()), backend=BACKENDS[0], flat=flat)
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


# ---------------------------------------------------------------------------------------
# Data parallel (DDP, 2 CPU processes over gloo)
# ---------------------------------------------------------------------------------------
DDP_STEPS = 40
DDP_SPIKE = 12  # rank 1 alone reports a spiked loss at this step


def _ddp_shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, target = data()
    return inputs[rank::2], target[rank::2]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        inputs, target = _ddp_shard(rank)
        results = {}
        for variant in ("group", "bucket_view", "no_group"):
            model = make_model()
            ddp = torch.nn.parallel.DistributedDataParallel(
                model, gradient_as_bucket_view=variant == "bucket_view"
            )
            group = None if variant == "no_group" else dist.group.WORLD
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt = ELRA(model.parameters(), cycle_steps=10, process_group=group)
            warned = any("no process_group was given" in str(w.message) for w in caught)
            decisions = []
            for step_index in range(DDP_STEPS):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(ddp(inputs), target)
                loss.backward()
                if step_index == DDP_SPIKE and rank == 1:
                    loss = loss.detach() * 1e3
                opt.step(loss)
                decisions.append(opt.last_step_retraced)
            params = [p.detach().clone() for p in model.parameters()]
            results[variant] = (decisions, params, warned, loss.item())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_with_process_group_keeps_replicas_identical(tmp_path) -> None:
    """With process_group the ranks average f_t: a spike seen by one rank makes both
    retrace, the replicas stay bit-identical, and the run equals one process stepping on
    the whole batch (loss and gradient averaged over the two shards). Without it the
    ranks decide apart and drift (and the optimizer warned)."""
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # One process, whole batch: gradient of the mean of the shard losses, as DDP averages.
    model = make_model()
    opt = ELRA(model.parameters(), cycle_steps=10)
    shards = [_ddp_shard(r) for r in (0, 1)]
    decisions = []
    for step_index in range(DDP_STEPS):
        opt.zero_grad()
        losses = [torch.nn.functional.mse_loss(model(x), y) for x, y in shards]
        (0.5 * (losses[0] + losses[1])).backward()
        spike = 1e3 if step_index == DDP_SPIKE else 1.0
        opt.step(0.5 * (losses[0].detach() + losses[1].detach() * spike))
        decisions.append(opt.last_step_retraced)
    assert decisions[DDP_SPIKE]

    for variant in ("group", "bucket_view"):
        (d0, p0, warned0, _), (d1, p1, warned1, _) = (r[variant] for r in ranks)
        assert d0 == d1 == decisions, variant
        assert not (warned0 or warned1)
        for a, b, single in zip(p0, p1, model.parameters(), strict=True):
            assert torch.equal(a, b), variant  # the replicas never differ
            # 40 fp32 steps with gradients summed in another order: ~1e-5 of drift;
            # one decision taken apart would move the weights by ~1e-2.
            torch.testing.assert_close(a, single.detach(), rtol=1e-4, atol=3e-5)

    (d0, p0, warned0, _), (d1, p1, warned1, _) = (r["no_group"] for r in ranks)
    assert warned0 and warned1
    assert not d0[DDP_SPIKE] and d1[DDP_SPIKE]  # each rank judged its own loss
    drift = max((a - b).abs().max().item() for a, b in zip(p0, p1, strict=True))
    assert drift > 1e-3, drift  # far outside the tolerance used above


