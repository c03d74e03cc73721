"""Fused backends in the optimizer: same decisions and parameters as the reference.

The fused optimizer (``cpp`` / ``triton`` kernels, in both layouts: flat buffers and
per-parameter tensor lists) is checked against the float64 reference optimizer in lock
step (see ``_lockstep.py``).
"""

from __future__ import annotations

import pytest
import torch
from _backends import fused_backends
from _lockstep import (
    NAN_GRAD,
    SHORT_FAILURES,
    SPIKES,
    Shadow,
    assert_nan_step_makes_no_host_sync,
    assert_round_trip,
    data,
    forward_backward,
    make_model,
    mlp_step,
    run_steps,
    short_schedule,
)

from elra_fused import ELRA, control_runner, ops

BACKENDS = fused_backends()
#: Steps per backend: the triton interpreter is slow, 300 steps of a tiny MLP is cheap.
STEPS = 300


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lockstep_against_float64_reference(backend: str, flat: bool) -> None:
    model = make_model()
    inputs, target = data()
    # Every cycle closes (min_cycle_losses <= cycle_steps), so the spikes at steps 50 and
    # 200 meet the 5-sigma rule of recent statistics, not of the first 100 losses.
    opt = ELRA(
        model.parameters(),
        backend=backend,
        flat=flat,
        wd=0.9999,
        cycle_steps=25,
        min_cycle_losses=20,
    )
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


@pytest.mark.parametrize("host", [True, False], ids=["host_law", "device_law"])
def test_short_schedule_meets_every_injected_failure(host: bool) -> None:
    """The CPU replay of the GPU tests' 80 steps (test_cuda: host vs device law, lock
    step): the two spikes and the NaN gradient fall inside them and each retraces, so the
    GPU test's >= 3 retraces hold by construction, not by the landscape."""
    model = make_model()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], cycle_steps=25)  # as test_cuda
    opt.host_control = host
    decisions = run_steps(opt, model, short_schedule())
    assert len(decisions) == 80
    assert all(decisions[step] for step in SHORT_FAILURES), decisions
    assert sum(decisions) >= 3


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
            monkeypatch.setattr(control_runner, "compiled_control_step", broken_compile)
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


def test_auto_backend_choice() -> None:
    opt = ELRA(make_model().parameters())
    expected = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"
    assert opt.backend == expected
    assert not opt.flat  # per-parameter lists on the CPU; flat buffers are the CUDA default
    assert ELRA(make_model().parameters(), memory="recover").flat

    def channels_last() -> torch.nn.Module:  # its weight is dense, not contiguous
        return torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)

    assert not ELRA(channels_last().parameters()).flat  # stepped through its storage

    def gapped() -> list[torch.nn.Parameter]:  # every other column of a matrix
        return [torch.nn.Parameter(torch.randn(4, 6)[:, ::2])]

    assert ELRA(gapped()).flat
    with pytest.raises(ValueError, match="gaps or overlaps"):
        ELRA(gapped(), flat=False)
    assert ELRA(make_model(torch.float64).parameters()).backend == "reference"
    with pytest.raises(ValueError, match="float64"):
        ELRA(make_model(torch.float64).parameters(), backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        ELRA(make_model().parameters(), backend="cuda-magic")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_train(dtype: torch.dtype, flat: bool) -> None:
    backend = BACKENDS[0]
    model = make_model(dtype)
    inputs, target = data(dtype)
    opt = ELRA(model.parameters(), backend=backend, flat=flat, cycle_steps=20)
    losses = [mlp_step(model, inputs, target, opt).float().item() for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("flat", [True, False])
def test_torch_compile_model(flat: bool) -> None:
    backend = BACKENDS[0]
    model = make_model()
    compiled = torch.compile(model)
    opt = ELRA(model.parameters(), backend=backend, flat=flat)
    inputs, target = data()
    losses = [mlp_step(compiled, inputs, target, opt).item() for _ in range(20)]
    assert losses[-1] < losses[0]
    if flat:
        assert opt.layout.buffers[0].gather_grads() == []  # gradients landed in the flat buffer
