"""The control law against hand-computed values (paper sections 3.1, 3.2, 3.5)."""

from __future__ import annotations

import math

import pytest
import torch

from elra_fused import control, control_runner
from elra_fused.control import ControlConfig

F64 = torch.float64


def t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def running_state(
    alpha: float = 0.5, grad_prev_sq: float = 4.0, loss_prev: float = 1.0, loss_first: float = 2.0
) -> torch.Tensor:
    """A state after some accepted steps: alpha_{t-1}, Ga, f_{t-1}, f_0."""
    state = control.initial_state(ControlConfig(), "cpu")
    state[control.ALPHA] = alpha
    state[control.GRAD_PREV_SQ] = grad_prev_sq
    state[control.LOSS_PREV] = loss_prev
    state[control.LOSS_FIRST] = loss_first
    state[control.ACCEPTED] = 3
    return state


def step(state, loss, grad_sq, dot, **config):
    """One step of the law; the hand-computed values below are eq. 4 uncropped."""
    config.setdefault("step_crop", None)
    return control.control_step(state, t(loss), t(grad_sq), t(dot), ControlConfig(**config))


def test_kappa_matches_paper_formula() -> None:
    for a in (0.0, 0.3, 1.0, 7.0):
        assert control.kappa(t(a), 0.15).item() == pytest.approx(1 + 0.15 / (1 + a * a))


def test_accept_alpha_hand_computed() -> None:
    # alpha = 0.5 * Ga / (Ga - S) * kappa(0.5) = 0.5 * 4/3 * (1 + 0.15/1.25)
    new_state, decision = step(running_state(), loss=0.9, grad_sq=9.0, dot=1.0)
    expected = 0.5 * 4.0 / 3.0 * (1 + 0.15 / 1.25)
    assert decision.accept.item() == 1.0
    assert decision.alpha.item() == pytest.approx(expected, rel=1e-15)
    assert decision.back.item() == 0.0
    assert new_state[control.ALPHA].item() == pytest.approx(expected, rel=1e-15)
    # G_t becomes G_{t-1}: Ga <- <G_t, G_t>, f_{t-1} <- f_t.
    assert new_state[control.GRAD_PREV_SQ].item() == 9.0
    assert new_state[control.LOSS_PREV].item() == 0.9
    assert new_state[control.ACCEPTED].item() == 4
    assert new_state[control.LAST_RETRACED].item() == 0.0


def test_negative_dot_shrinks_alpha() -> None:
    # Zig-zag (S < 0) must decelerate: ratio 4 / (4 + 4) = 0.5, no kappa.
    _, decision = step(running_state(), loss=0.9, grad_sq=4.0, dot=-4.0, kappa_gain=0.0)
    assert decision.alpha.item() == pytest.approx(0.25, rel=1e-15)


def test_growth_is_capped_by_gamma_max() -> None:
    # Ga / (Ga - S) = 4 / 0.1 = 40 > gamma_max = 10.
    _, decision = step(running_state(), loss=0.9, grad_sq=4.0, dot=3.9)
    assert decision.alpha.item() == pytest.approx(0.5 * 10.0)
    # S >= Ga: the parabola has no minimum ahead, keep accelerating at the cap.
    _, decision = step(running_state(), loss=0.9, grad_sq=4.0, dot=5.0, gamma_max=3.0)
    assert decision.alpha.item() == pytest.approx(0.5 * 3.0)


def test_alpha_bounds() -> None:
    _, decision = step(running_state(alpha=1e-8), loss=0.9, grad_sq=4.0, dot=-1e6)
    assert decision.alpha.item() == pytest.approx(1e-8)
    _, decision = step(running_state(alpha=9e5), loss=0.9, grad_sq=4.0, dot=5.0)
    assert decision.alpha.item() == pytest.approx(1e6)


def test_step_crop_and_warmup_floor() -> None:
    # ||G|| = 10: cropping alpha <= 2/10 = 0.2.
    _, decision = step(running_state(), loss=0.9, grad_sq=100.0, dot=1.0, step_crop=2.0)
    assert decision.alpha.item() == pytest.approx(0.2)
    # floor alpha >= 0.1/||G|| = 0.1 with ||G|| = 1 while in warm-up.
    small = running_state(alpha=1e-4)
    _, decision = step(small, loss=0.9, grad_sq=1.0, dot=0.0, kappa_gain=0.0, warmup_steps=10)
    assert decision.alpha.item() == pytest.approx(0.1)
    # after the warm-up (step index 3 >= 2) no floor.
    _, decision = step(small, loss=0.9, grad_sq=1.0, dot=0.0, kappa_gain=0.0, warmup_steps=2)
    assert decision.alpha.item() == pytest.approx(1e-4)


def test_retrace_alpha_hand_computed() -> None:
    # alpha = 0.5 * 0.5 * (0.5 * 4) / (3 - 1 + 0.5 * 4) = 0.125
    new_state, decision = step(running_state(), loss=3.0, grad_sq=9.0, dot=1.0)
    assert decision.accept.item() == 0.0
    assert decision.alpha.item() == pytest.approx(0.125, rel=1e-15)
    assert decision.back.item() == pytest.approx(0.5 - 0.125, rel=1e-15)
    # G_{t-1}, Ga and f_{t-1} stay; the retrace is counted.
    assert new_state[control.GRAD_PREV_SQ].item() == 4.0
    assert new_state[control.LOSS_PREV].item() == 1.0
    assert new_state[control.ACCEPTED].item() == 3
    assert new_state[control.RETRACES].item() == 1
    assert new_state[control.LAST_RETRACED].item() == 1.0


def test_retrace_shrinks_at_least_by_half() -> None:
    # A NaN gradient with a lower loss: the parabola gives 0.5*0.5*2/1.5 = 1/3 > 0.25.
    _, decision = step(running_state(), loss=0.5, grad_sq=math.nan, dot=math.nan)
    assert decision.accept.item() == 0.0
    assert decision.alpha.item() == pytest.approx(0.25)


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_retrace_with_non_finite_loss_falls_back_to_alpha_over_100(loss: float) -> None:
    _, decision = step(running_state(), loss=loss, grad_sq=9.0, dot=1.0)
    assert decision.accept.item() == 0.0
    assert decision.alpha.item() == pytest.approx(0.005)
    assert math.isfinite(decision.back.item())


@pytest.mark.parametrize(
    ("grad_sq", "dot"), [(math.nan, 1.0), (math.inf, 1.0), (9.0, math.nan), (9.0, -math.inf)]
)
def test_non_finite_gradient_triggers_retrace(grad_sq: float, dot: float) -> None:
    _, decision = step(running_state(), loss=0.9, grad_sq=grad_sq, dot=dot)
    assert decision.accept.item() == 0.0


def test_initial_rule_uses_f0() -> None:
    # f_0 = 2: f_t = 2.19 < 2.2 accepted, 2.21 > 2.2 retraced.
    _, decision = step(running_state(), loss=2.19, grad_sq=9.0, dot=1.0)
    assert decision.accept.item() == 1.0
    _, decision = step(running_state(), loss=2.21, grad_sq=9.0, dot=1.0)
    assert decision.accept.item() == 0.0
    _, decision = step(
        running_state(), loss=2.21, grad_sq=9.0, dot=1.0, initial_retrace_factor=None
    )
    assert decision.accept.item() == 1.0
    # A negative f_0 (e.g. the saddle) still means "10 % worse": -2 -> -1.8.
    negative = running_state(loss_first=-2.0)
    assert step(negative, loss=-1.81, grad_sq=9.0, dot=1.0)[1].accept.item() == 1.0
    assert step(negative, loss=-1.79, grad_sq=9.0, dot=1.0)[1].accept.item() == 0.0


def test_cycle_statistics_and_five_sigma_rule() -> None:
    state = running_state(loss_first=0.1)
    losses = [1.0, 2.0, 3.0, 4.0]
    for loss in losses:
        state, decision = step(state, loss=loss, grad_sq=4.0, dot=0.0, initial_retrace_factor=None)
        assert decision.accept.item() == 1.0
    state = control.close_cycle(state)
    mean = sum(losses) / 4
    sigma = math.sqrt(sum((v - mean) ** 2 for v in losses) / 4)
    assert state[control.CYCLE_MEAN].item() == pytest.approx(mean)
    assert state[control.CYCLE_STD].item() == pytest.approx(sigma)
    assert state[control.CYCLE_CLOSED].item() == 1.0
    assert state[control.CYCLE_COUNT].item() == 0.0
    limit = mean + 5 * sigma
    # Once a cycle closed, the initial f_0 rule (0.1 * 1.1 here) no longer applies.
    assert step(state, loss=limit - 1e-9, grad_sq=4.0, dot=0.0)[1].accept.item() == 1.0
    assert step(state, loss=limit + 1e-9, grad_sq=4.0, dot=0.0)[1].accept.item() == 0.0


def test_retraced_losses_stay_out_of_cycle_statistics() -> None:
    state, _ = step(running_state(), loss=1.0, grad_sq=4.0, dot=0.0)
    state, decision = step(state, loss=50.0, grad_sq=4.0, dot=0.0)
    assert decision.accept.item() == 0.0
    assert state[control.CYCLE_COUNT].item() == 1.0
    # The one accepted loss is the cycle's shift K; its scaled deviation u is 0.
    assert state[control.CYCLE_SHIFT].item() == 1.0
    assert state[control.CYCLE_SUM].item() == state[control.CYCLE_SUMSQ].item() == 0.0


def test_empty_cycle_keeps_previous_statistics() -> None:
    state = running_state()
    state[control.CYCLE_MEAN] = 3.0
    state[control.CYCLE_STD] = 0.5
    state[control.CYCLE_CLOSED] = 1.0
    closed = control.close_cycle(state)
    assert closed[control.CYCLE_MEAN].item() == 3.0
    assert closed[control.CYCLE_STD].item() == 0.5


def test_first_step_accepts_with_alpha0_and_remembers_f0() -> None:
    state = control.initial_state(ControlConfig(alpha0=0.01), "cpu")
    new_state, decision = control.control_step(state, t(5.0), t(4.0), t(123.0), ControlConfig())
    assert decision.accept.item() == 1.0
    assert decision.alpha.item() == 0.01
    assert new_state[control.LOSS_FIRST].item() == 5.0
    assert new_state[control.GRAD_PREV_SQ].item() == 4.0


def test_first_step_with_nan_is_skipped_without_moving() -> None:
    state = control.initial_state(ControlConfig(), "cpu")
    new_state, decision = control.control_step(state, t(math.nan), t(4.0), t(0.0), ControlConfig())
    assert decision.accept.item() == 0.0
    assert decision.back.item() == 0.0
    assert new_state[control.ACCEPTED].item() == 0
    assert new_state[control.RETRACES].item() == 1
    assert new_state[control.ALPHA].item() == ControlConfig().alpha0


def test_zero_previous_gradient_keeps_alpha() -> None:
    _, decision = step(running_state(grad_prev_sq=0.0), loss=0.9, grad_sq=4.0, dot=0.0)
    assert decision.alpha.item() == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha0": 0.0},
        {"alpha0": -1.0},
        {"gamma_max": 0.0},
        {"alpha_min": 1.0, "alpha_max": 0.5},
        {"kappa_gain": -0.1},
        {"step_crop": 0.0},
        {"warmup_steps": -1},
        {"initial_retrace_factor": 0.9},
        {"alpha0": float("nan")},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ELRA"):
        ControlConfig(**kwargs)


# ---------------------------------------------------------------------------------------
# One law, two number systems: FLOAT_MATH must give TENSOR_MATH's bits.
# ---------------------------------------------------------------------------------------
SPECIAL = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300)


def _random_inputs(gen: torch.Generator, steps: int) -> list[tuple[float, float, float]]:
    """(loss, <G,G>, <G_prev,G>) sequences with drifts, spikes, zeros and non-finite values."""
    rows = []
    loss = 2.0
    for i in range(steps):
        u = torch.rand(6, generator=gen, dtype=F64).tolist()
        loss = max(loss * (0.9 + 0.15 * u[0]), 1e-6)
        grad_sq = 10 ** (4 * u[1] - 2)
        dot = grad_sq * (2 * u[2] - 1.2)
        if u[3] < 0.08:  # spike
            loss_i = loss * 50
        else:
            loss_i = loss
        if u[4] < 0.05:  # a special value somewhere
            which = SPECIAL[int(u[5] * len(SPECIAL)) % len(SPECIAL)]
            slot = i % 3
            loss_i, grad_sq, dot = [
                which if k == slot else v for k, v in enumerate((loss_i, grad_sq, dot))
            ]
        rows.append((loss_i, grad_sq, dot))
    return rows


@pytest.mark.parametrize(
    "config",
    [
        ControlConfig(),
        ControlConfig(kappa_gain=0.0, gamma_max=1e6, initial_retrace_factor=None),
        ControlConfig(warmup_steps=40, warmup_min_step=0.1, step_crop=2.0),
        ControlConfig(alpha0=1e-6, alpha_min=1e-7, alpha_max=1.0, retrace_sigmas=1.0),
    ],
    ids=["paper", "noise_free", "warmup_crop", "tight_bounds"],
)
def test_float_math_gives_the_tensor_math_bits(config: ControlConfig) -> None:
    """400 steps, cycles closed every 25: every state entry and decision bit-identical."""
    gen = torch.Generator().manual_seed(7)
    tensor_state = control.initial_state(config, "cpu")
    float_state = tensor_state.tolist()
    retraces = 0
    for index, (loss, grad_sq, dot) in enumerate(_random_inputs(gen, 400)):
        new_t, dec_t = control.control_step(tensor_state, t(loss), t(grad_sq), t(dot), config)
        new_f, dec_f = control.control_step(
            float_state, loss, grad_sq, dot, config, control.FLOAT_MATH
        )
        assert torch.equal(new_t, torch.tensor(new_f, dtype=F64)), index
        assert torch.equal(torch.stack(list(dec_t)), torch.tensor(list(dec_f), dtype=F64)), index
        retraces += dec_f.accept == 0.0
        tensor_state, float_state = new_t, new_f
        if index % 25 == 24:
            tensor_state = control.close_cycle(tensor_state)
            float_state = tensor_state.tolist()
    assert 20 < retraces < 380  # both branches exercised


@pytest.mark.parametrize(
    "config",
    [ControlConfig(), ControlConfig(warmup_steps=40, warmup_min_step=0.1, step_crop=2.0)],
    ids=["paper", "warmup_crop"],
)
def test_compiled_law_gives_the_eager_bits(config: ControlConfig) -> None:
    """compiled_control_step (torch.compile, the GPU default) on the random inputs above:
    every state entry and decision bit-identical to the eager tensor law."""
    compiled = control_runner.compiled_control_step()
    gen = torch.Generator().manual_seed(11)
    eager_state = compiled_state = control.initial_state(config, "cpu")
    for index, (loss, grad_sq, dot) in enumerate(_random_inputs(gen, 200)):
        new_e, dec_e = control.control_step(eager_state, t(loss), t(grad_sq), t(dot), config)
        new_c, dec_c = compiled(compiled_state, t(loss), t(grad_sq), t(dot), config)
        assert torch.equal(new_e, new_c), index
        assert torch.equal(torch.stack(list(dec_e)), torch.stack(list(dec_c))), index
        eager_state, compiled_state = new_e, new_c
        if index % 25 == 24:
            eager_state = control.close_cycle(eager_state)
            compiled_state = control.close_cycle(compiled_state)


def test_lr_scales_the_step_taken_and_alpha_follows_eq_4() -> None:
    """lr = 0.5: the accepted step is 0.5 alpha_t with alpha_t from eq. (4) as at lr = 1;
    the state remembers the lr of the step taken."""
    config = ControlConfig(step_crop=None)
    state = running_state()
    _, full = control.control_step(state, t(0.9), t(9.0), t(1.0), config)
    new_state, half = control.control_step(state, t(0.9), t(9.0), t(1.0), config, lr=t(0.5))
    assert half.accept.item() == 1.0
    assert new_state[control.ALPHA].item() == full.alpha.item()
    assert half.alpha.item() == 0.5 * full.alpha.item()
    assert new_state[control.LR_TAKEN].item() == 0.5


def test_a_retrace_fits_its_parabola_along_the_step_taken() -> None:
    """The failed step was lr_{t-1} alpha_{t-1} = 0.5 * 0.5 long: the parabola through
    f_{t-1} (slope -Ga) and f_t at 0.25 gives s* = 0.25 * 0.5 * 0.25 * 4 / (3 - 1 + 0.25 * 4)
    = 1/24; the retrace moves back by 0.25 - lr * s*."""
    state = running_state()
    state[control.LR_TAKEN] = 0.5
    config = ControlConfig(step_crop=None)
    new_state, decision = control.control_step(state, t(3.0), t(9.0), t(1.0), config, lr=t(0.5))
    assert decision.accept.item() == 0.0
    assert new_state[control.ALPHA].item() == pytest.approx(1 / 24, rel=1e-15)
    assert decision.alpha.item() == pytest.approx(0.5 / 24, rel=1e-15)
    assert decision.back.item() == pytest.approx(0.25 - 0.5 / 24, rel=1e-15)


def test_float_math_gives_the_tensor_math_bits_with_a_changing_lr() -> None:
    config = ControlConfig()
    gen = torch.Generator().manual_seed(8)
    tensor_state = control.initial_state(config, "cpu")
    float_state = tensor_state.tolist()
    lrs = torch.rand(300, generator=gen, dtype=F64).tolist()
    for index, ((loss, grad_sq, dot), lr) in enumerate(
        zip(_random_inputs(gen, 300), lrs, strict=True)
    ):
        new_t, dec_t = control.control_step(
            tensor_state, t(loss), t(grad_sq), t(dot), config, lr=t(lr)
        )
        new_f, dec_f = control.control_step(
            float_state, loss, grad_sq, dot, config, control.FLOAT_MATH, lr
        )
        assert torch.equal(new_t, torch.tensor(new_f, dtype=F64)), index
        assert torch.equal(torch.stack(list(dec_t)), torch.tensor(list(dec_f), dtype=F64)), index
        tensor_state, float_state = new_t, new_f
        if index % 25 == 24:
            tensor_state = control.close_cycle(tensor_state)
            float_state = tensor_state.tolist()


def test_a_state_saved_before_the_lr_loads_with_lr_one() -> None:
    saved = running_state()[: control.GUARDS_STATE_SIZE]
    upgraded = control_runner.upgrade_state(saved)
    assert upgraded.shape == (control.STATE_SIZE,)
    assert upgraded[control.LR_TAKEN].item() == 1.0
    assert torch.equal(upgraded[: control.GUARDS_STATE_SIZE], saved)
