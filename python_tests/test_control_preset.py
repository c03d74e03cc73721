"""The opt-in 2-D preset (``preset="2d"``): the authors' 2-D path in the control law.

Its rules against their docstrings (:mod:`elra_fused.control`, "The 2-D preset"), the
same bits in every number system, restarts, and loading states saved before it existed.
The steps it takes on the paper's 2-D problems: ``test_paper_2d.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from elra_fused import ELRA, control, control_config, control_runner
from elra_fused.control import ControlConfig
from elra_fused.control_config import (
    ALPHA0_2D,
    ERROR_DAMPER_START,
    GROWTH_DAMPER_START,
    PRESETS,
    with_preset,
)

F64 = torch.float64
PRESET = with_preset(ControlConfig(), "2d")
FM = control.FLOAT_MATH


def t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


# ---------------------------------------------------------------------------------------
# The preset itself
# ---------------------------------------------------------------------------------------
def test_preset_sets_the_authors_2d_fields_and_defaults_stay_off() -> None:
    assert PRESET.alpha0 == ALPHA0_2D == 1e-5
    assert PRESET.growth_damper == GROWTH_DAMPER_START == 855000.0
    assert PRESET.error_damper == ERROR_DAMPER_START == 500000.0
    assert PRESET.kappa_gain == 0.0 and PRESET.step_crop is None
    assert PRESET.retrace_min_step == 0.0 and PRESET.initial_retrace_factor is None
    default = ControlConfig()
    assert default.growth_damper is None and default.error_damper is None
    # A default config saves the same keys as before the preset existed (no load warning).
    assert "growth_damper" not in default.as_dict() and "error_damper" not in default.as_dict()
    assert PRESET.as_dict()["growth_damper"] == GROWTH_DAMPER_START
    assert with_preset(default, None) is default


def test_explicit_arguments_win_over_the_preset() -> None:
    config = with_preset(ControlConfig(alpha0=1e-4, step_crop=3.0), "2d")
    assert config.alpha0 == 1e-4 and config.step_crop == 3.0
    assert config.growth_damper == GROWTH_DAMPER_START
    opt = ELRA([torch.nn.Parameter(torch.zeros(2, dtype=F64))], preset="2d", max_retraces=5)
    assert opt.config == with_preset(ControlConfig(max_retraces=5), "2d")
    assert set(PRESETS) == {"2d"}


@pytest.mark.parametrize("bad", ["3d", "", 2])
def test_an_unknown_preset_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="preset must be None or one of"):
        ELRA([torch.nn.Parameter(torch.zeros(2))], preset=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["growth_damper", "error_damper"])
@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, True])
def test_a_bad_damper_raises(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=field):
        ControlConfig(**{field: bad})


# ---------------------------------------------------------------------------------------
# The rules, each as its docstring says
# ---------------------------------------------------------------------------------------
def test_growth_damper_rule() -> None:
    """/3.9 per accept; per retrace x16 (1 < d < 1e6/16), back to the start (d >= 1e6/16),
    +16 (d <= 1)."""
    rule = control.next_growth_damper
    assert rule(3.9, False, PRESET, FM) == 3.9 * (1.0 / 3.9)
    assert rule(100.0, True, PRESET, FM) == 1600.0
    assert rule(62499.0, True, PRESET, FM) == 62499.0 * 16
    assert rule(62500.0, True, PRESET, FM) == GROWTH_DAMPER_START
    assert rule(0.5, True, PRESET, FM) == 16.5
    assert rule(1.0, True, PRESET, FM) == 17.0


def test_growth_cap_from_the_start_value() -> None:
    """The cap 1e6 / (1 + d) over the first accepted steps: 4.6, 18, 69, 270, ... and
    never above gamma_max."""
    damper, caps = GROWTH_DAMPER_START, []
    for _ in range(4):
        damper = control.next_growth_damper(damper, False, PRESET, FM)
        caps.append(control.growth_cap(damper, PRESET, FM))
    assert caps == pytest.approx([4.561, 17.79, 69.38, 270.5], rel=1e-3)
    assert control.growth_cap(0.0, ControlConfig(gamma_max=10.0), FM) == 10.0


def test_error_damper_rule() -> None:
    """An accepted rise: x16 (+16 below 1), at most the start value; otherwise /1.69."""
    rule = control.next_error_damper
    assert rule(1.69, False, PRESET, FM) == 1.69 * (1.0 / 1.69)
    assert rule(0.5, True, PRESET, FM) == 16.5
    assert rule(10.0, True, PRESET, FM) == 160.0
    assert rule(400000.0, True, PRESET, FM) == 6.4e6  # as theirs: capped on the next rise
    assert rule(6.4e6, True, PRESET, FM) == ERROR_DAMPER_START


def test_tolerance_threshold() -> None:
    """1.1 T best, T = 25 + (2500 + 71 sqrt(best)) / (1 + sqrt(e)); for a negative best
    best + (1.1 T - 1) |best|."""
    tol = 25 + (2500 + 71 * 2.0) / (1 + math.sqrt(ERROR_DAMPER_START))
    threshold = control.tolerance_threshold(4.0, ERROR_DAMPER_START, FM)
    assert threshold == pytest.approx(1.1 * tol * 4.0, rel=1e-15)
    assert 100 < threshold < 130  # ~28.5 x the best at the start: a lax rule
    negative = control.tolerance_threshold(-4.0, ERROR_DAMPER_START, FM)
    assert negative == pytest.approx(-4.0 + (1.1 * tol - 1) * 4.0, rel=1e-15)
    assert control.tolerance_threshold(0.0, 1.0, FM) == 0.0


def test_best_loss_rule() -> None:
    """Below the best and finite: taken; otherwise relaxed by 10 %, finite."""
    assert control.next_best(0.5, 1.0, FM) == 0.5
    assert control.next_best(2.0, 1.0, FM) == 1.1
    assert control.next_best(-1.0, -2.0, FM) == pytest.approx(-1.8, rel=1e-15)
    assert control.next_best(math.nan, 1.0, FM) == 1.1
    assert control.next_best(-math.inf, 1.0, FM) == 1.1
    assert control.next_best(1e308, 1.7e308, FM) == 1e308
    assert control.next_best(math.inf, 1.7e308, FM) == control.FLOAT64_MAX
    # A best of exactly 0 (an exact minimum) becomes a floor above 0, never 0 again.
    assert control.next_best(0.0, 0.0, FM) == control_config.BEST_FLOOR > 0.0
    assert control.next_best(0.0, 1.0, FM) == control_config.BEST_FLOOR


def test_an_exact_minimum_does_not_retrace_for_ever() -> None:
    """Best = 0 gives a threshold of 0: the loss 0 itself retraces once, then the relaxed
    best (BEST_FLOOR) lets it pass."""
    state = later_state(best=0.0)
    decisions = []
    for _ in range(4):
        state, decision = control.control_step(state, t(0.0), t(0.0), t(0.0), PRESET)
        decisions.append(decision.accept.item())
    assert decisions[1:] == [1.0, 1.0, 1.0], decisions


def later_state(best: float = 1.0, error_damper: float = ERROR_DAMPER_START) -> torch.Tensor:
    """A preset state after some accepted steps (dampers started)."""
    state = control.initial_state(PRESET, "cpu")
    state[control.ALPHA] = 0.01
    state[control.ALPHA_ACCEPTED] = 0.01
    state[control.GRAD_PREV_SQ] = 4.0
    state[control.LOSS_PREV] = 1.0
    state[control.LOSS_FIRST] = 3.0
    state[control.ACCEPTED] = 5
    state[control.BEST_LOSS] = best
    state[control.GROWTH_DAMPER] = 1000.0
    state[control.ERROR_DAMPER] = error_damper
    state[control.DAMPERS_STARTED] = 1.0
    return state


def test_the_tolerance_rule_replaces_the_sigma_rule() -> None:
    """A closed cycle with a tiny sigma would retrace f = 2 (mean 1 + 5 sigma); the preset
    retraces only at 1.1 T best."""
    state = later_state()
    state[control.CYCLE_CLOSED] = 1.0
    state[control.CYCLE_MEAN] = 1.0
    state[control.CYCLE_STD] = 1e-3
    threshold = control.tolerance_threshold(1.0, ERROR_DAMPER_START, FM)
    args = (t(9.0), t(1.0), PRESET)
    assert not control.needs_retrace(state, t(2.0), *args)
    assert not control.needs_retrace(state, t(math.nextafter(threshold, 0.0)), *args)
    assert control.needs_retrace(state, t(threshold), *args)
    assert control.needs_retrace(state, t(math.nan), *args)
    assert control.needs_retrace(state, t(2.0), t(9.0), t(1.0), ControlConfig())


def test_first_step_starts_the_dampers_and_a_later_step_updates_them() -> None:
    state = control.initial_state(PRESET, "cpu")
    state, decision = control.control_step(state, t(5.0), t(4.0), t(0.0), PRESET)
    assert decision.accept.item() == 1.0 and decision.alpha.item() == 1e-5
    assert state[control.DAMPERS_STARTED].item() == 1.0
    assert state[control.BEST_LOSS].item() == 5.0
    assert state[control.GROWTH_DAMPER].item() == GROWTH_DAMPER_START
    assert state[control.ERROR_DAMPER].item() == ERROR_DAMPER_START
    # Gradient not turned (S = Ga): the growth is the damped cap, 1e6 / (1 + d / 3.9).
    state, decision = control.control_step(state, t(4.0), t(4.0), t(4.0), PRESET)
    damper = GROWTH_DAMPER_START * (1.0 / 3.9)
    assert decision.accept.item() == 1.0
    assert decision.alpha.item() == pytest.approx(1e-5 * 1e6 / (1 + damper), rel=1e-15)
    assert state[control.GROWTH_DAMPER].item() == damper
    assert state[control.ERROR_DAMPER].item() == ERROR_DAMPER_START * (1.0 / 1.69)
    assert state[control.BEST_LOSS].item() == 4.0
    # A rise that is accepted: the error damper jumps (capped at its start), best relaxes.
    state, decision = control.control_step(state, t(4.5), t(4.0), t(1.0), PRESET)
    assert decision.accept.item() == 1.0
    assert state[control.ERROR_DAMPER].item() == ERROR_DAMPER_START * (1.0 / 1.69) * 16
    assert state[control.BEST_LOSS].item() == 4.0 * 1.1
    # A jump far above the best: a retrace, the growth damper x16.
    growth = state[control.GROWTH_DAMPER].item()
    state, decision = control.control_step(state, t(1e4), t(4.0), t(1.0), PRESET)
    assert decision.accept.item() == 0.0
    assert state[control.GROWTH_DAMPER].item() == growth * 16


def test_off_the_damper_entries_pass_through_unstarted() -> None:
    """Preset off: the entries are kept but marked not started, so a preset state that
    passed through a run without the preset starts afresh if the preset comes back (a
    stale best loss would retrace every step)."""
    state = later_state()
    new_state, _ = control.control_step(state, t(0.9), t(4.0), t(1.0), ControlConfig())
    kept = slice(control.LR_STATE_SIZE, control.DAMPERS_STARTED)
    assert torch.equal(new_state[kept], state[kept])
    assert new_state[control.DAMPERS_STARTED].item() == 0.0


def test_a_restart_starts_the_dampers_afresh() -> None:
    config = with_preset(ControlConfig(max_retraces=2), "2d")
    state = later_state(best=1.0)
    for _ in range(2):  # two retraces in a row: the second restarts
        state, decision = control.control_step(state, t(1e6), t(4.0), t(1.0), config)
        assert decision.accept.item() == 0.0
    assert state[control.RESTARTS].item() == 1.0
    assert state[control.DAMPERS_STARTED].item() == 0.0
    state, decision = control.control_step(state, t(2.0), t(4.0), t(1.0), config)
    assert decision.accept.item() == 1.0
    assert state[control.DAMPERS_STARTED].item() == 1.0
    assert state[control.BEST_LOSS].item() == 2.0
    assert state[control.GROWTH_DAMPER].item() == GROWTH_DAMPER_START
    assert state[control.ERROR_DAMPER].item() == ERROR_DAMPER_START


def _inputs(steps: int, seed: int) -> list[tuple[float, float, float]]:
    """(loss, <G,G>, <G_prev,G>) with drifts, far jumps, negative losses, non-finite values."""
    gen = torch.Generator().manual_seed(seed)
    rows, loss = [], 3.0
    for i in range(steps):
        u = torch.rand(5, generator=gen, dtype=F64).tolist()
        loss = loss * (0.85 + 0.2 * u[0]) - (0.5 if i > steps // 2 else 0.0)
        grad_sq = 10 ** (4 * u[1] - 2)
        row = [loss * (1e4 if u[3] < 0.1 else 1.0), grad_sq, grad_sq * (2 * u[2] - 1.2)]
        if u[4] < 0.04:
            row[i % 3] = (math.nan, math.inf, -math.inf)[i % 3]
        rows.append((row[0], row[1], row[2]))
    return rows


def test_float_and_compiled_laws_give_the_tensor_bits() -> None:
    """300 steps with the preset (max_retraces 3, so restarts happen): every state entry
    and decision bit-identical in floats, eager tensors and ``torch.compile``."""
    config = with_preset(ControlConfig(max_retraces=3), "2d")
    compiled = control_runner.compiled_control_step()
    tensor_state = compiled_state = control.initial_state(config, "cpu")
    float_state = tensor_state.tolist()
    retraces = 0
    for index, (loss, grad_sq, dot) in enumerate(_inputs(300, seed=3)):
        new_t, dec_t = control.control_step(tensor_state, t(loss), t(grad_sq), t(dot), config)
        new_f, dec_f = control.control_step(float_state, loss, grad_sq, dot, config, FM)
        new_c, dec_c = compiled(compiled_state, t(loss), t(grad_sq), t(dot), config)
        assert torch.equal(new_t, torch.tensor(new_f, dtype=F64)), index
        assert torch.equal(torch.stack(list(dec_t)), torch.tensor(list(dec_f), dtype=F64)), index
        assert torch.equal(new_t, new_c), index
        assert torch.equal(torch.stack(list(dec_t)), torch.stack(list(dec_c))), index
        retraces += dec_f.accept == 0.0
        tensor_state, compiled_state, float_state = new_t, new_c, new_f
    assert 20 < retraces < 280
    assert tensor_state[control.RESTARTS].item() > 0
    assert all(math.isfinite(v) for v in tensor_state.tolist())


# ---------------------------------------------------------------------------------------
# States saved before the preset existed
# ---------------------------------------------------------------------------------------
def test_a_state_saved_before_the_preset_loads_unstarted() -> None:
    saved = later_state()
    saved[control.LR_TAKEN] = 0.5
    saved = saved[: control.LR_STATE_SIZE].clone()
    upgraded = control_runner.upgrade_state(saved)
    assert upgraded.shape == (control.STATE_SIZE,)
    assert torch.equal(upgraded[: control.LR_STATE_SIZE], saved)  # lr 0.5 kept
    assert not upgraded[control.LR_STATE_SIZE :].any()
    # The preset starts from it: best = f_{t-1}, the dampers' start values.
    best, growth, error = control.damper_inputs(upgraded.tolist(), PRESET, FM)
    assert (best, growth, error) == (1.0, GROWTH_DAMPER_START, ERROR_DAMPER_START)


def _rosenbrock_opt(**kwargs: object) -> tuple[ELRA, torch.nn.Parameter]:
    param = torch.nn.Parameter(torch.tensor([-3.0, -2.0], dtype=F64))
    return ELRA([param], **kwargs), param  # type: ignore[arg-type]


def _run(opt: ELRA, param: torch.nn.Parameter, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        x, y = param
        loss = (1 - x) ** 2 + 100 * (y - x**2) ** 2
        loss.backward()
        opt.step(loss)


@pytest.mark.parametrize(
    "size", [control.LR_STATE_SIZE, control.GUARDS_STATE_SIZE, control.LEGACY_STATE_SIZE]
)
def test_old_state_dicts_load_into_a_preset_optimizer(size: int) -> None:
    """A state dict saved by a default optimizer, its control state cut to an older size
    and its config without the preset's keys (as saved before them): loads without a
    warning into a default optimizer and, with one naming the dampers, into a preset one,
    which then goes on stepping."""
    source, param = _rosenbrock_opt()
    _run(source, param, 5)
    saved = source.state_dict()
    saved["elra_control"]["control"] = saved["elra_control"]["control"][:size].clone()
    assert "growth_damper" not in saved["elra_control"]["config"]
    default, default_param = _rosenbrock_opt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default.load_state_dict(saved)
    assert torch.equal(
        default.control_state, control_runner.upgrade_state(saved["elra_control"]["control"])
    )
    opt, opt_param = _rosenbrock_opt(preset="2d")
    with pytest.warns(UserWarning, match="growth_damper: saved '<absent>', here 855000.0"):
        opt.load_state_dict(saved)
    with torch.no_grad():
        opt_param.copy_(param)
    _run(opt, opt_param, 5)
    state = opt.control_state
    assert state[control.DAMPERS_STARTED].item() == 1.0
    assert all(math.isfinite(v) for v in state.tolist())
