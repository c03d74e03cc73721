"""The authors' guards of the retrace rule and the statistics (elra_fused.control): the
retrace floor, sigma inflation, the minimum cycle, the restart after max_retraces
retraces in a row, overflow-free cycle statistics and the legacy state layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elra_fused import control
from elra_fused.control import ControlConfig
from elra_fused.control_runner import upgrade_state

F64 = torch.float64
#: The paper's law without the guards.
NO_GUARDS = {
    "min_cycle_losses": 1,
    "sigma_inflation": 1.0,
    "retrace_min_step": 0.0,
    "max_retraces": None,
}


def t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def step(state, loss, grad_sq=4.0, dot=0.0, **config):
    return control.control_step(state, t(loss), t(grad_sq), t(dot), ControlConfig(**config))


def accepted_state(alpha: float = 0.5, grad_prev_sq: float = 4.0, **config) -> torch.Tensor:
    """After a first step at f = 1: alpha_{t-1}, Ga set; statistics open."""
    state = control.initial_state(ControlConfig(alpha0=alpha, **config), "cpu")
    state, decision = step(state, 1.0, grad_prev_sq, **config)
    assert decision.accept.item() == 1.0
    return state


def test_retrace_floor_is_the_authors_min_step_capped_at_alpha_prev() -> None:
    # Pure data noise: f_t - f_{t-1} >> alpha Ga collapses the parabola's alpha ...
    state = accepted_state(alpha=0.01, grad_prev_sq=4.0)
    _, plain = step(state, 1e6, **NO_GUARDS)
    assert plain.alpha.item() < 1e-8 * 10
    # ... the floor keeps alpha_t ||G_{t-1}|| >= 1e-4: alpha >= 1e-4 / 2.
    _, guarded = step(state, 1e6)
    assert guarded.accept.item() == 0.0
    assert guarded.alpha.item() == pytest.approx(5e-5)
    assert guarded.back.item() == pytest.approx(0.01 - 5e-5)
    # A floor above alpha_{t-1} is capped there: the retrace stays (back = 0), it never
    # steps further along the direction that failed.
    tiny = accepted_state(alpha=1e-6, grad_prev_sq=4.0)
    _, capped = step(tiny, 1e6)
    assert capped.alpha.item() == 1e-6 and capped.back.item() == 0.0


def test_sigma_inflates_per_retrace_and_deflates_per_accept_down_to_measured() -> None:
    state = accepted_state()
    state[control.CYCLE_MEAN], state[control.CYCLE_STD] = 1.0, 0.1
    state[control.CYCLE_CLOSED] = 1.0
    # threshold 1 + 5 * 0.1 = 1.5: 1.52 retraces, then the inflated sigma lets it pass.
    state, first = step(state, 1.52)
    assert first.accept.item() == 0.0
    assert state[control.SIGMA_SCALE].item() == pytest.approx(1.05)
    state, second = step(state, 1.52)
    assert second.accept.item() == 1.0
    assert state[control.SIGMA_SCALE].item() == pytest.approx(1.0)  # 1.05 / 1.05
    state, _ = step(state, 1.0)
    assert state[control.SIGMA_SCALE].item() == 1.0  # never below the measured sigma
    _, without = step(state, 1.52, **NO_GUARDS)
    assert without.accept.item() == 0.0


def test_a_cycle_closes_only_with_enough_losses() -> None:
    state = accepted_state()
    for loss in (1.0, 0.9):
        state, _ = step(state, loss)
    short = control.close_cycle(state, min_losses=4)
    assert short[control.CYCLE_CLOSED].item() == 0.0
    assert short[control.CYCLE_LAST_COUNT].item() == 0.0
    assert torch.equal(
        short[control.CYCLE_COUNT : control.CYCLE_SUMSQ + 1],
        state[control.CYCLE_COUNT : control.CYCLE_SUMSQ + 1],
    )  # goes on
    state, _ = step(short, 0.8)
    closed = control.close_cycle(state, min_losses=4)
    assert closed[control.CYCLE_CLOSED].item() == 1.0
    assert closed[control.CYCLE_LAST_COUNT].item() == 4.0
    assert closed[control.CYCLE_MEAN].item() == pytest.approx((1.0 + 1.0 + 0.9 + 0.8) / 4)


def test_max_retraces_in_a_row_restart_at_the_last_accepted_point() -> None:
    config = {"max_retraces": 3}
    state = accepted_state(alpha=0.2, **config)
    state, _ = step(state, 0.9, dot=1.0, **config)  # accepted: alpha grows
    alpha_accepted = state[control.ALPHA].item()
    assert state[control.ALPHA_ACCEPTED].item() == alpha_accepted
    alphas = [alpha_accepted]
    for _ in range(2):
        state, decision = step(state, 50.0, **config)
        assert decision.accept.item() == 0.0
        alphas.append(decision.alpha.item())
    assert state[control.RETRACE_RUN].item() == 2.0
    state, restart = step(state, 50.0, **config)
    # All the way back along G_{t-1}: back = alpha_{t-1} (x_{t+1} = wd x_{t-1}).
    assert restart.accept.item() == 0.0
    assert restart.back.item() == alphas[-1]
    assert restart.alpha.item() == alpha_accepted
    assert state[control.RESTARTS].item() == 1.0
    assert state[control.RESTART_PENDING].item() == 1.0
    assert state[control.RETRACE_RUN].item() == 0.0
    assert state[control.CYCLE_CLOSED].item() == 0.0 and state[control.CYCLE_COUNT].item() == 0
    # The next step starts afresh: accepted whatever its loss (it is the new f_0).
    state, fresh = step(state, 40.0, **config)
    assert fresh.accept.item() == 1.0 and fresh.alpha.item() == alpha_accepted
    assert state[control.LOSS_FIRST].item() == 40.0
    assert state[control.RESTART_PENDING].item() == 0.0


@pytest.mark.parametrize("level", [1e-200, 1e-3, 1.0, 1e8, 1e154, 1e200, 1e300])
def test_cycle_statistics_neither_overflow_nor_cancel(level: float) -> None:
    """Losses level * (1 + d), d ~ 1e-6: mean and sigma to rounding at every magnitude
    (raw sums of f^2 overflow at 1e154 and lose sigma to cancellation at 1e8)."""
    deviations = [0.0, 1e-6, -2e-6, 3e-6, 0.5e-6]
    state = control.initial_state(ControlConfig(), "cpu")
    for d in deviations:
        state, decision = step(state, level * (1 + d), initial_retrace_factor=None)
        assert decision.accept.item() == 1.0
    closed = control.close_cycle(state)
    values = [level * (1 + d) for d in deviations]
    mean = sum(v / level for v in values) / len(values) * level
    sigma = level * math.sqrt(sum((v / level - mean / level) ** 2 for v in values) / len(values))
    assert closed[control.CYCLE_MEAN].item() == pytest.approx(mean, rel=1e-12)
    assert closed[control.CYCLE_STD].item() == pytest.approx(sigma, rel=1e-6)


def test_a_legacy_state_loads_with_the_same_statistics() -> None:
    legacy = torch.zeros(control.LEGACY_STATE_SIZE, dtype=F64)
    legacy[control.ALPHA] = 0.3
    legacy[control.ACCEPTED] = 5
    legacy[control.CYCLE_COUNT] = 2
    legacy[control.CYCLE_SUM] = 3.0  # raw sums of 1 and 2
    legacy[control.CYCLE_SUMSQ] = 5.0
    state = upgrade_state(legacy)
    assert state.shape == (control.STATE_SIZE,)
    assert state[control.SIGMA_SCALE].item() == 1.0
    assert state[control.ALPHA_ACCEPTED].item() == 0.3
    closed = control.close_cycle(state)
    assert closed[control.CYCLE_MEAN].item() == 1.5 and closed[control.CYCLE_STD].item() == 0.5
    with pytest.raises(ValueError, match="control state must be a tensor of"):
        upgrade_state(torch.zeros(7, dtype=F64))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_cycle_losses": 0},
        {"min_cycle_losses": 2.5},
        {"max_retraces": 0},
        {"max_retraces": True},
        {"sigma_inflation": 0.9},
        {"retrace_min_step": -1.0},
        {"retrace_min_step": math.inf},
    ],
)
def test_bad_guard_values_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ELRA"):
        ControlConfig(**kwargs)


EXTREME = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-310, 1e-300, 1e300, 1.7e308, math.inf, math.nan]),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(EXTREME, EXTREME, EXTREME), min_size=1, max_size=120),
    st.sampled_from([ControlConfig(), ControlConfig(max_retraces=2, min_cycle_losses=3)]),
)
def test_any_input_keeps_alpha_in_bounds_and_the_state_finite(rows, config) -> None:
    """Extremes, denormals, +-inf, NaN: alpha finite and within bounds, the statistics
    finite, and the host (float) law takes the tensor law's bits."""
    tensor_state = control.initial_state(config, "cpu")
    float_state = tensor_state.tolist()
    for index, (loss, grad_sq, dot) in enumerate(rows):
        grad_sq = abs(grad_sq)  # a squared norm (NaN stays NaN)
        tensor_state, decision = control.control_step(
            tensor_state, t(loss), t(grad_sq), t(dot), config
        )
        float_state, _ = control.control_step(
            float_state, loss, grad_sq, dot, config, control.FLOAT_MATH
        )
        alpha = tensor_state[control.ALPHA].item()
        assert config.alpha_min <= alpha <= config.alpha_max
        assert math.isfinite(decision.back.item())
        finite = [control.CYCLE_MEAN, control.CYCLE_STD, control.SIGMA_SCALE, control.CYCLE_SHIFT]
        assert torch.isfinite(tensor_state[finite]).all()
        assert torch.equal(tensor_state, torch.tensor(float_state, dtype=F64)), index
        if index % 7 == 6:
            tensor_state = control.close_cycle(tensor_state, config.min_cycle_losses)
            float_state = tensor_state.tolist()


def test_a_gradient_above_max_grad_norm_is_not_stepped_on() -> None:
    state = accepted_state(max_grad_norm=10.0)
    _, small = step(state, 0.9, grad_sq=99.0, max_grad_norm=10.0)
    assert small.accept.item() == 1.0
    _, large = step(state, 0.9, grad_sq=101.0, max_grad_norm=10.0)
    assert large.accept.item() == 0.0  # a retrace, as for a non-finite gradient
    first = control.initial_state(ControlConfig(max_grad_norm=10.0), "cpu")
    _, skipped = step(first, 1.0, grad_sq=101.0, max_grad_norm=10.0)
    assert skipped.accept.item() == 0.0 and skipped.back.item() == 0.0
