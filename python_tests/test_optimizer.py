"""The reference ELRA optimizer: the algorithm end to end and the user API.

Every optimizer here is built with ``backend="reference"`` (per-parameter plain-torch
passes, float64-capable), the backend of the oracle the fused backends are compared
with (``_lockstep.py``, ``test_optimizer_backends.py``).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import pytest
import torch
from _lockstep import data, forward_backward, make_model, mlp_setup, mlp_step, no_host_reads

import elra_fused

ELRA = functools.partial(elra_fused.ELRA, backend="reference")

F64 = torch.float64


def quartic(x: torch.Tensor) -> torch.Tensor:
    """A non-quadratic, rotation-covariant test landscape: f(x) = sum c_i x_i^2 + |x|^4 / 4."""
    weights = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    return (weights * x * x).sum() + 0.25 * (x * x).sum() ** 2


def run(param: torch.nn.Parameter, objective, opt: ELRA, steps: int) -> list[torch.Tensor]:
    iterates = [param.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        loss = objective(param)
        loss.backward()
        opt.step(loss)
        iterates.append(param.detach().clone())
    return iterates


def test_second_step_lands_on_line_minimum_of_a_parabola() -> None:
    # f = c |x|^2: the gradient line through x_1 is a parabola with its minimum at 0.
    c = 3.5
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    opt = ELRA([param], alpha0=1e-3, kappa_gain=0.0, gamma_max=1e6, step_crop=None)
    iterates = run(param, lambda x: c * (x * x).sum(), opt, 2)
    assert torch.linalg.vector_norm(iterates[1]) > 0.9
    assert torch.linalg.vector_norm(iterates[2]) < 1e-12
    assert opt.alpha == pytest.approx(1 / (2 * c), rel=1e-12)


def test_accept_step_is_wd_x_minus_alpha_g() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    opt = ELRA([param], alpha0=0.1, wd=0.9)
    loss = (param * param).sum()
    loss.backward()
    opt.step(loss)
    # x_1 = 0.9 x_0 - 0.1 * 2 x_0 = 0.7 x_0
    torch.testing.assert_close(param.detach(), torch.tensor([0.7, 1.4], dtype=F64))


def test_rotation_invariance() -> None:
    torch.manual_seed(1)
    dim = 5
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64))
    x0 = torch.randn(dim, dtype=F64) * 2
    plain = torch.nn.Parameter(x0.clone())
    rotated = torch.nn.Parameter(q.T @ x0)
    opt_plain = ELRA([plain])
    opt_rotated = ELRA([rotated])
    steps = 60
    plain_iterates = run(plain, quartic, opt_plain, steps)
    rotated_iterates = run(rotated, lambda y: quartic(q @ y), opt_rotated, steps)
    assert opt_plain.retrace_count == opt_rotated.retrace_count
    for x, y in zip(plain_iterates, rotated_iterates, strict=True):
        torch.testing.assert_close(y, q.T @ x, rtol=0, atol=1e-10)


def test_retrace_returns_to_the_previous_line() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -1.0, 2.0], dtype=F64))
    opt = ELRA([param], alpha0=0.05)
    objective = quartic
    run(param, objective, opt, 3)
    # Step t-1 (accepted): remember x_{t-1} and G_{t-1}.
    opt.zero_grad()
    loss = objective(param)
    loss.backward()
    x_prev = param.detach().clone()
    grad_prev = param.grad.detach().clone()
    opt.step(loss)
    assert not opt.last_step_retraced
    # Step t: a loss spike forces a retrace.
    opt.zero_grad()
    objective(param).backward()
    opt.step(torch.tensor(1e9, dtype=F64))
    assert opt.last_step_retraced
    s = opt.alpha
    torch.testing.assert_close(param.detach(), x_prev - s * grad_prev, rtol=0, atol=1e-12)


def test_nan_gradient_retraces_and_keeps_weights_finite() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    for _ in range(5):
        mlp_step(model, data, target, opt)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(data), target)
    loss.backward()
    model[0].weight.grad[0, 0] = math.nan
    opt.step(loss)
    assert opt.last_step_retraced
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, b) or p.grad is None  # moved back along G_{t-1}


def test_zero_gradient_changes_nothing() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = ELRA([param])
    for _ in range(3):
        param.grad = torch.zeros_like(param)
        opt.step(torch.tensor(1.0))
    assert torch.equal(param.detach(), torch.tensor([1.0, 2.0, 3.0]))
    assert math.isfinite(opt.alpha)
    assert opt.retrace_count == 0


def test_params_without_grad_are_skipped() -> None:
    model, data, target = mlp_setup()
    unused = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.full((2,), 5.0), requires_grad=False)
    opt = ELRA([*model.parameters(), unused, frozen], wd=0.5)
    for _ in range(4):
        mlp_step(model, data, target, opt)
    assert torch.equal(unused.detach(), torch.ones(3))
    assert torch.equal(frozen.detach(), torch.full((2,), 5.0))


def test_param_groups_have_their_own_wd() -> None:
    a = torch.nn.Parameter(torch.tensor([1.0], dtype=F64))
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=F64))
    opt = ELRA([{"params": [a], "wd": 0.5}, {"params": [b]}], alpha0=0.1)
    a.grad = torch.zeros_like(a)
    b.grad = torch.zeros_like(b)
    opt.step(torch.tensor(1.0))
    assert a.item() == 0.5
    assert b.item() == 1.0


def test_closure_and_float_loss() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(data), target)
    loss.backward()
    value = float(loss.detach())
    assert opt.step(value) == value


def test_learns_a_small_regression() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters(), cycle_steps=20)
    losses = [mlp_step(model, data, target, opt).item() for _ in range(200)]
    assert losses[-1] < 0.1 * losses[0]


def test_state_dict_round_trip_continues_bit_identically() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters(), wd=0.999, cycle_steps=7)
    for _ in range(10):
        mlp_step(model, data, target, opt)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    reference_losses = [mlp_step(model, data, target, opt) for _ in range(15)]
    reference_params = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, _, _ = mlp_setup(seed=123)
    model2.load_state_dict(saved["model"])
    opt2 = ELRA(model2.parameters(), wd=0.999, cycle_steps=7)
    opt2.load_state_dict(saved["opt"])
    losses = [mlp_step(model2, data, target, opt2) for _ in range(15)]
    for a, b in zip(losses, reference_losses, strict=True):
        assert torch.equal(a, b)
    for p, r in zip(model2.parameters(), reference_params, strict=True):
        assert torch.equal(p.detach(), r)
    assert opt2.alpha == opt.alpha
    assert opt2.retrace_count == opt.retrace_count


def test_load_state_dict_of_another_optimizer_fails_clearly() -> None:
    model, _, _ = mlp_setup()
    adam = torch.optim.Adam(model.parameters())
    opt = ELRA(model.parameters())
    with pytest.raises(ValueError, match="no ELRA control state"):
        opt.load_state_dict(adam.state_dict())


def test_step_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters(), cycle_steps=3)
    opt.host_control = False  # the law as device tensor ops, as on a GPU
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        losses.append(loss)
        opt.step(loss)

    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(data), target)
    loss.backward()
    model[0].weight.grad[1, 1] = math.nan  # exercise the retrace branch as well
    with no_host_reads(monkeypatch):
        opt.step(loss)
        opt.step(loss * 1e6)
        opt.end_cycle()
    assert opt.retrace_count == 2


def test_cycle_steps_closes_cycles() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters(), cycle_steps=4, min_cycle_losses=4)
    for _ in range(4):
        mlp_step(model, data, target, opt)
    from elra_fused import control

    assert opt.control_state[control.CYCLE_CLOSED].item() == 1.0
    assert opt.control_state[control.CYCLE_COUNT].item() == 0.0


def test_cycle_statistics_skip_empty_cycles() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters(), min_cycle_losses=5)
    assert opt.cycle_statistics() is None
    losses = [mlp_step(model, data, target, opt).item() for _ in range(3)]
    opt.end_cycle()  # 3 < min_cycle_losses: the cycle goes on
    assert opt.cycle_statistics() is None
    losses += [mlp_step(model, data, target, opt).item() for _ in range(2)]
    opt.end_cycle()
    mean, sigma = opt.cycle_statistics()
    assert mean == pytest.approx(sum(losses) / 5)
    assert sigma == pytest.approx(float(torch.tensor(losses, dtype=F64).std(correction=0)))
    opt.end_cycle()  # a cycle without accepted steps: nothing new to report
    assert opt.cycle_statistics() is None
    assert opt.alpha_tensor.dtype == F64 and opt.alpha_tensor.item() == opt.alpha


# ------------------------------------------------------------------ failed steps
FAILING_LAYOUTS = {
    "lists": {"flat": False},
    "flat": {"flat": True},
    "swap": {"flat": True, "reuse_grad_buffer": True},
    "recover": {"memory": "recover"},
}


def _snapshot(opt: ELRA, model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter, every state tensor and the control state, as copies."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for entry in opt.state_dict()["state"].values():
        tensors.extend(v.detach().clone() for v in entry.values() if isinstance(v, torch.Tensor))
    return [*tensors, opt.control_state.clone()]


def _assert_same(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("layout", list(FAILING_LAYOUTS))
def test_a_kernel_failing_after_the_law_ran_changes_nothing(layout: str) -> None:
    """The law commits its state before the update pass runs; if that pass raises, the
    state is restored: alpha, counters and statistics, the parameters and G_{t-1} are as
    before, and the run continues exactly as a run that never saw the failure."""
    model, twin = make_model(), make_model()
    kwargs = {"cycle_steps": 4, **FAILING_LAYOUTS[layout]}
    opt, opt_twin = ELRA(model.parameters(), **kwargs), ELRA(twin.parameters(), **kwargs)
    inputs, target = data()
    for step_index in range(6):
        for net, optimizer in ((model, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            optimizer.step(forward_backward(net, inputs, target, step_index))

    def boom(*args: object) -> None:
        raise RuntimeError("injected kernel failure")

    kernels = opt._kernels
    opt._kernels = kernels._replace(
        **{name: boom for name in kernels._fields if name.startswith("update")}
    )
    opt.zero_grad()
    loss = forward_backward(model, inputs, target, 6)
    before = _snapshot(opt, model)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(loss)
    _assert_same(before, _snapshot(opt, model))
    opt._kernels = kernels
    opt.step(loss)  # the same step, now for real
    opt_twin.zero_grad()
    opt_twin.step(forward_backward(twin, inputs, target, 6))
    for step_index in range(7, 12):
        for net, optimizer in ((model, opt), (twin, opt_twin)):
            optimizer.zero_grad()
            optimizer.step(forward_backward(net, inputs, target, step_index))
    _assert_same(_snapshot(opt_twin, twin), _snapshot(opt, model))


def test_a_parameter_replaced_by_a_gapped_view_fails_before_anything_moves() -> None:
    """lists: ``p.data = <a view with gaps>`` after construction cannot be stepped in
    place; the step says so before the law runs (no phantom step)."""
    model = make_model()
    opt = ELRA(model.parameters(), flat=False)
    inputs, target = data()
    for step_index in range(3):
        opt.zero_grad()
        opt.step(forward_backward(model, inputs, target, step_index))
    weight = model[0].weight
    weight.data = torch.cat([weight.detach(), weight.detach()], dim=1)[:, ::2]
    opt.zero_grad()
    loss = forward_backward(model, inputs, target, 3)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match="gaps or overlaps"):
        opt.step(loss)
    _assert_same(before, _snapshot(opt, model))


# ------------------------------------------------------------------ lr and schedulers
def _scheduler_cases() -> dict[str, Callable[[ELRA], object]]:
    sched = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: sched.LambdaLR(o, lambda s: 1 / (1 + s)),
        "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda s: 0.9),
        "StepLR": lambda o: sched.StepLR(o, step_size=3),
        "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[2, 5]),
        "ConstantLR": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=4),
        "LinearLR": lambda o: sched.LinearLR(o, start_factor=0.2, total_iters=5),
        "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.8),
        "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=8),
        "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=10),
        "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=4),
        "CyclicLR": lambda o: sched.CyclicLR(o, 0.1, 1.0, step_size_up=3, cycle_momentum=False),
        "OneCycleLR": lambda o: sched.OneCycleLR(o, 1.0, total_steps=20, cycle_momentum=False),
        "SequentialLR": lambda o: sched.SequentialLR(
            o, [sched.ConstantLR(o, 0.5, 2), sched.ExponentialLR(o, 0.9)], milestones=[2]
        ),
        "ChainedScheduler": lambda o: sched.ChainedScheduler(
            [sched.ConstantLR(o, 0.5, 2), sched.ExponentialLR(o, 0.9)]
        ),
        "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, patience=0, factor=0.5),
    }


@pytest.mark.parametrize("name", list(_scheduler_cases()))
def test_every_lr_scheduler_drives_the_step(name: str) -> None:
    """Each of torch's schedulers (without momentum cycling) builds on ELRA, steps, and
    changes the trajectory: the step taken is lr * alpha."""
    inputs, target = data()
    runs = []
    for scheduled in (False, True):
        model = make_model()
        opt = ELRA(model.parameters(), cycle_steps=5)
        scheduler = _scheduler_cases()[name](opt) if scheduled else None
        for step_index in range(12):
            opt.zero_grad()
            loss = forward_backward(model, inputs, target, step_index)
            opt.step(loss)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(1.0)  # never improves: the lr halves every step
            elif scheduler is not None:
                scheduler.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        assert all(torch.isfinite(p).all() for p in runs[-1])
    assert any(not torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("name", ["OneCycleLR", "CyclicLR"])
def test_momentum_cycling_schedulers_say_elra_has_no_momentum(name: str) -> None:
    opt = ELRA(make_model().parameters())
    sched = torch.optim.lr_scheduler
    with pytest.raises(ValueError, match="momentum"):
        if name == "OneCycleLR":
            sched.OneCycleLR(opt, 1.0, total_steps=10)
        else:
            sched.CyclicLR(opt, 0.1, 1.0)


def test_lr_scales_the_first_step_exactly() -> None:
    """x_1 = x_0 - lr alpha_0 G_0 (float64 parameters, reference backend)."""
    steps = []
    for lr in (1.0, 0.25):
        param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        opt = ELRA([param], lr=lr, step_crop=None)
        loss = (param * param).sum()
        loss.backward()
        opt.step(loss)
        steps.append(param.detach() - torch.tensor([1.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(steps[1], 0.25 * steps[0], rtol=0, atol=1e-15)  # ulp of x


def test_groups_with_different_lr_are_a_clear_error() -> None:
    """At construction, and when a schedule with per-group factors sets them apart."""
    model = make_model()
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.5},
        {"params": list(model[2].parameters())},
    ]
    with pytest.raises(ValueError, match="same lr"):
        ELRA(groups)
    opt = ELRA(groups, lr=0.5)
    torch.optim.lr_scheduler.LambdaLR(opt, [lambda step: 1.0, lambda step: 0.1])
    inputs, target = data()
    loss = forward_backward(model, inputs, target, 0)
    with pytest.raises(ValueError, match="same lr"):
        opt.step(loss)


def test_weight_decay_is_torchs_name_for_one_minus_wd() -> None:
    params = list(make_model().parameters())
    opt = ELRA(
        [
            {"params": params[:2], "weight_decay": 0.1},
            {"params": params[2:], "weight_decay": 0.0},
        ]
    )
    assert [g["wd"] for g in opt.param_groups] == [0.9, 1.0]
    assert ELRA(make_model().parameters(), weight_decay=3e-4).param_groups[0]["wd"] == 1 - 3e-4
    with pytest.raises(ValueError, match="give wd or weight_decay"):
        ELRA(make_model().parameters(), wd=0.9, weight_decay=0.1)
