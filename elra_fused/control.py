"""The ELRA control law: the scalar per-step logic of paper sections 3.1, 3.2 and 3.5.

Everything here is a pure function over a packed float64 state and scalars, written with
``xp.where`` instead of Python branches on values. This is the one implementation of the
law: every backend (reference, triton, cpp) runs it between its ``dots`` and ``update``
passes, in one of two number systems with the same bits (:mod:`elra_fused.control_math`:
0-d device tensors, sync-free and graph-capturable, or Python floats for CPU parameters,
~25 instead of ~150 us per step). Bit-identity is by construction (the same IEEE double
operations in the same order; a scalar divided by a tensor is written ``k * (1.0 / x)``,
which is what torch computes for ``k / x``) and is tested step by step. On a GPU the ~200
tensor ops would be ~200 launches per step; ``compiled_control_step`` is the same law
through ``torch.compile`` (fused into a few kernels; on the CPU 157 -> 33 us per call,
bit-identical). :mod:`elra_fused.control_runner` picks among the three each step.

Notation (paper numbering): x_t parameters, G_t gradient, f_t loss, alpha_t step size,
``Ga = ||G_{t-1}||^2``, ``S = <G_{t-1}, G_t>``.

* first step:  x_1 = wd * x_0 - alpha_0 * G_0 ; f_0 remembered.
* accept step (eq. 4):
      alpha_t = alpha_{t-1} * min(Ga / (Ga - S) * kappa(alpha_{t-1}), gamma_max),
      kappa(a) = 1 + k / (1 + a^2),
  where ``Ga - S <= 0`` (the gradient did not turn: keep accelerating) uses gamma_max,
  then optional warm-up floor alpha_t >= m / ||G_t|| (footnote 5), optional step
  cropping alpha_t <= c / ||G_t|| (section 3.5), bounds [alpha_min, alpha_max];
  x_{t+1} = wd * x_t - alpha_t * G_t.
* retrace (section 3.2) when f_t or G_t is not finite, f_t > mean + 5 sigma of the last
  closed control cycle, or (before the first cycle closes) f_t > f_0 + 0.1 |f_0|:
      alpha_t = alpha_{t-1} * 1/2 * alpha_{t-1} Ga / (f_t - f_{t-1} + alpha_{t-1} Ga),
  the minimiser of the parabola through f_{t-1} with slope -Ga and through f_t (the
  paper prints ||G_{t-1}|| where the derivation needs Ga = ||G_{t-1}||^2). A non-finite
  or non-positive result falls back to alpha_{t-1} / 100, and the result never exceeds
  alpha_{t-1} / 2 (the paper's "at least by the factor 0.5").
  x_{t+1} = x_t + (alpha_{t-1} - alpha_t) * G_{t-1}: back on the line of the previous
  step, no extra weight decay. G_t is discarded; G_{t-1}, Ga and f_{t-1} stay.

Learning rate (not in the paper; for torch's LR schedulers): the step taken is lr * alpha_t
(``Decision.alpha``). alpha follows eq. (4) at the points reached; a retrace fits its
parabola along the step actually taken, lr_{t-1} alpha_{t-1} (``LR_TAKEN``), and moves
back by the difference of the steps taken. lr = 1 gives the paper's law bit for bit.

The ``f_0 + 0.1 |f_0|`` form of the initial rule equals the paper's ``1.1 f_0`` for a
positive f_0 and stays a "10 % worse" test when f_0 is negative (e.g. the saddle).

Guards the paper does not print (it calls the retrace rule "delicate"), each from the
authors' code (GitHub ``alex77g2/solver_icml``, ``lib_grad_solve.py``), each a
:class:`ControlConfig` field with their value as default:

* ``min_cycle_losses`` (100): a cycle closes only with this many accepted losses, so mean
  and sigma never come from a handful of mini-batches (``GradientMerge``: the statistics
  are refreshed every 100 steps, ``step_cnt % 100``);
* ``sigma_inflation`` (1.05): the rule's sigma grows by this factor per retrace and
  shrinks by it per accept, never below the measured sigma (``p2min_step``:
  ``lastDev *= 1.05``);
* ``retrace_min_step`` (1e-4): after a retrace alpha_t >= 1e-4 / ||G_{t-1}||, so data
  noise (f_t - f_{t-1} >> alpha Ga) cannot collapse alpha in one retrace
  (``__alpha_opt_version``); unlike theirs capped at alpha_{t-1}: a retrace never steps
  further along a direction that just failed;
* ``max_retraces`` (25, where they grow the batch; we restart): the 25th retrace in a row
  returns to the last accepted point (back = alpha_{t-1}: x_{t+1} = wd x_{t-1} up to
  rounding), restores that step's alpha, forgets the statistics (the next step starts
  afresh like a first step) and counts a restart (the runner warns once). No input can
  lock the law in endless retraces.

Cycle statistics are shifted, scaled sums of u = (f - K) / S, K the cycle's first
accepted loss, S the largest |f - K| so far (at least |K|, 1 if K = 0; the sums are
rescaled by S_old / S_new when S grows): mean = K + S E[u], sigma = S sqrt(Var u). |u| <=
1, so nothing overflows at any finite loss (raw sums of f^2 did at |f| >= 1e154), and the
shift avoids cancellation when sigma << |mean|. Saved raw sums read as K = 0, S = 1.

The 2-D preset (opt-in, ``ELRA(..., preset="2d")``, :data:`control_config.PRESETS`): the
authors' path for exact gradients in few dimensions (``lib_grad_solve.py`` at commit
d6cefd0, ``SelfConstOptim.p2min_step`` for len(x) <= 20; learnt from, not copied), which
the paper's Tables 1 and 2 come from. alpha_0 = 1e-5, kappa_gain = 0, no step crop, no
retrace floor, and two dampers, each a :class:`ControlConfig` field (None = off):

* ``growth_damper`` d (their ``growth_func``): the growth cap of eq. (4) is
  min(gamma_max, 1e6 / (1 + d)) with d updated first: d / 3.9 on an accepted step; on a
  retrace d * 16 (d + 16 when d <= 1), or back to the start value 855000 once d >= 1e6 / 16.
  From d = 855000 the cap grows 4.6, 18, 69, 270, ... over the first accepted steps: slow
  from alpha_0 = 1e-5 at first, then effectively uncapped until a retrace damps it again.
* ``error_damper`` e (their ``CalcErrorTolerance`` and ``UpdateErrorDamper``): the retrace
  rule becomes f_t >= 1.1 T best, T = 25 + (2500 + 71 sqrt(best)) / (1 + sqrt(e)), best
  the best loss so far, relaxed x1.1 on every step that does not improve it; in place of
  the 5-sigma rule (``initial_retrace_factor`` still applies where set; the preset drops
  it, as their 2-D path has none). e / 1.69 on every step except an accepted rise of f,
  which gives e * 16 (e + 16 when e < 1), at most the start value 500000. A lax rule
  (T ~ 28 at the start, up to ~2500): only a jump of f far above the best retraces.
  For a negative best (their code assumes f > 0) "1.1 T best" reads best + (1.1 T - 1)
  |best| and the relaxation best + 0.1 |best|: the same rule measured from |best|.

They are state entries, started at the first accepted step (and again after a restart);
the retrace parabola is the paper's (capped at alpha_{t-1} / 2, where their 2-D path has
no cap; it makes no difference on the paper's problems). Off (the defaults), the law is
the same bits as without them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from . import control_config
from .control_math import FLOAT_MATH as FLOAT_MATH  # re-exported: control.FLOAT_MATH
from .control_math import TENSOR_MATH, Math, all_finite

# The law's constants live in :mod:`elra_fused.control_config`; re-exported here
# (``control.ControlConfig``, ``control.MAX_RETRACES``, ...).
ALPHA0 = control_config.ALPHA0
ALPHA_MAX = control_config.ALPHA_MAX
ALPHA_MIN = control_config.ALPHA_MIN
GAMMA_MAX = control_config.GAMMA_MAX
INITIAL_RETRACE_FACTOR = control_config.INITIAL_RETRACE_FACTOR
KAPPA_GAIN = control_config.KAPPA_GAIN
MAX_RETRACES = control_config.MAX_RETRACES
MIN_CYCLE_LOSSES = control_config.MIN_CYCLE_LOSSES
RETRACE_FALLBACK_SHRINK = control_config.RETRACE_FALLBACK_SHRINK
RETRACE_MAX_SHRINK = control_config.RETRACE_MAX_SHRINK
RETRACE_MIN_STEP = control_config.RETRACE_MIN_STEP
RETRACE_SIGMAS = control_config.RETRACE_SIGMAS
SIGMA_INFLATION = control_config.SIGMA_INFLATION
STEP_CROP = control_config.STEP_CROP
WARMUP_MIN_STEP = control_config.WARMUP_MIN_STEP
ControlConfig = control_config.ControlConfig
PRESETS = control_config.PRESETS
with_preset = control_config.with_preset

# ---------------------------------------------------------------------------------------
# Packed control state: one float64 vector on the parameters' device. One tensor means
# one in-place write per step (graph-capturable) and one entry in the state_dict.
# ---------------------------------------------------------------------------------------
ALPHA = 0  # alpha_{t-1}: the law's line-optimal step of the last step (taken: lr * alpha)
GRAD_PREV_SQ = 1  # Ga = ||G_{t-1}||^2
LOSS_PREV = 2  # f_{t-1}
LOSS_FIRST = 3  # f_0
ACCEPTED = 4  # number of accepted steps (first step included)
RETRACES = 5  # number of retraced (or skipped first) steps
LAST_RETRACED = 6  # 1.0 if the last step() retraced
CYCLE_COUNT = 7  # accepted losses seen in the current control cycle
CYCLE_SUM = 8  # sum of their u = (f - K) / S (module docstring)
CYCLE_SUMSQ = 9  # sum of u^2
CYCLE_MEAN = 10  # mean of f over the last closed cycle
CYCLE_STD = 11  # its standard deviation sigma (measured, before inflation)
CYCLE_CLOSED = 12  # 1.0 once a cycle has closed (since the start or the last restart)
CYCLE_LAST_COUNT = 13  # accepted losses of the cycle the last end_cycle closed (0: none)
#: A state of this size (saved before the guards) loads with the entries below added.
LEGACY_STATE_SIZE = 14
CYCLE_SHIFT = 14  # K: the first accepted loss of the current cycle
CYCLE_SCALE = 15  # S: the largest |f - K| of the cycle (at least |K|, or 1 if K = 0)
SIGMA_SCALE = 16  # sigma inflation factor (>= 1) of the 5-sigma rule
RETRACE_RUN = 17  # retraces in a row
RESTARTS = 18  # restarts after max_retraces retraces in a row
ALPHA_ACCEPTED = 19  # alpha set by the last accepted step (restored by a restart)
RESTART_PENDING = 20  # 1.0: the next step starts afresh, like a first step
#: A state of this size (saved before the learning rate) loads with LR_TAKEN = 1.
GUARDS_STATE_SIZE = 21
LR_TAKEN = 21  # lr of the last step taken: that step was LR_TAKEN * ALPHA long
#: A state of this size (saved before the 2-D preset) loads with the entries below 0: the
#: preset (if on) starts them at its next step.
LR_STATE_SIZE = 22
BEST_LOSS = 22  # the 2-D preset's best loss so far (relaxed x1.1 per step not improving it)
GROWTH_DAMPER = 23  # its growth damper d
ERROR_DAMPER = 24  # its error damper e
DAMPERS_STARTED = 25  # 1.0 once the three entries above hold values (else: start values)
STATE_SIZE = 26
#: The largest finite float64: the scale S is clamped to it (|f - K| can overflow).
FLOAT64_MAX = 1.7976931348623157e308


def initial_state(config: ControlConfig, device: torch.device | str) -> torch.Tensor:
    """Control state before the first step: alpha = alpha_0, no statistics."""
    state = torch.zeros(STATE_SIZE, dtype=torch.float64, device=device)
    state[ALPHA] = config.alpha0
    state[ALPHA_ACCEPTED] = config.alpha0
    state[SIGMA_SCALE] = 1.0
    state[CYCLE_SCALE] = 1.0
    state[LR_TAKEN] = 1.0
    return state


class Decision(NamedTuple):
    """What the kernels need from one control step (0-d float64 tensors, or floats with
    :data:`FLOAT_MATH`).

    accept: 1.0 for an accepted step (x <- wd x - step G), 0.0 for a retrace or a
        skipped first step (x <- x + back * G_{t-1}).
    alpha: the step taken, lr * alpha_t (alpha_t itself with lr = 1).
    back: on a retrace the step taken last minus the one taken now, 0.0 otherwise.
    """

    accept: Any
    alpha: Any
    back: Any


def kappa(alpha: Any, gain: float) -> Any:
    """kappa(a) = 1 + k / (1 + a^2), the paper's empirical noise correction (3.1)."""
    return 1.0 + gain * (1.0 / (1.0 + alpha * alpha))


def accept_alpha(
    alpha_prev: Any,
    grad_prev_sq: Any,
    grad_dot_prev: Any,
    config: ControlConfig,
    xp: Math = TENSOR_MATH,
    cap: Any = None,
) -> Any:
    """Eq. (4): alpha_t = alpha_{t-1} * min(Ga / (Ga - S) * kappa, gamma_max).

    ``Ga - S <= 0`` means the gradient did not turn against the last step: the parabola
    ansatz has no minimum ahead, so the growth is the cap. ``Ga == 0`` (the last gradient
    was zero) carries no information about the landscape: alpha is kept. ``cap`` (the
    2-D preset's :func:`growth_cap`) replaces gamma_max where given.
    """
    denom = grad_prev_sq - grad_dot_prev
    turned = denom > 0
    if cap is None:
        ratio = xp.where(turned, grad_prev_sq / xp.where(turned, denom, 1.0), config.gamma_max)
        growth = xp.clamp(ratio * kappa(alpha_prev, config.kappa_gain), hi=config.gamma_max)
    else:
        ratio = xp.where(turned, grad_prev_sq / xp.where(turned, denom, 1.0), cap)
        growth = xp.minimum(ratio * kappa(alpha_prev, config.kappa_gain), cap)
    return alpha_prev * xp.where(grad_prev_sq > 0, growth, 1.0)


# ---------------------------------------------------------------------------------------
# The 2-D preset's dampers (module docstring, "The 2-D preset"; constants in
# :mod:`elra_fused.control_config`). Scalars divided by a value are written k * (1.0 / x)
# (the tensor and float laws then round alike).
# ---------------------------------------------------------------------------------------
def next_growth_damper(damper: Any, retrace: Any, config: ControlConfig, xp: Math) -> Any:
    """d after this step (``growth_func``): / 3.9 on an accept; on a retrace * 16 (+ 16
    when d <= 1), or back to the start value once d >= 1e6 / 16."""
    jump = control_config.DAMPER_JUMP
    start = config.growth_damper
    worse = xp.where(
        damper > 1.0,
        xp.where(damper < control_config.GROWTH_DAMPER_SCALE / jump, damper * jump, start),
        damper + jump,
    )
    return xp.where(retrace, worse, damper * (1.0 / control_config.GROWTH_DAMPER_DECAY))


def growth_cap(damper: Any, config: ControlConfig, xp: Math) -> Any:
    """The cap of eq. (4) under growth damper d: min(gamma_max, 1e6 / (1 + d))."""
    damped = control_config.GROWTH_DAMPER_SCALE * (1.0 / (1.0 + damper))
    return xp.clamp(damped, hi=config.gamma_max)


def next_error_damper(damper: Any, rose: Any, config: ControlConfig, xp: Math) -> Any:
    """e after this step (``UpdateErrorDamper``): an accepted step with f_t > f_{t-1}
    (``rose``) gives e * 16 (+ 16 when e < 1; at most the start value), any other step
    e / 1.69."""
    jump = control_config.DAMPER_JUMP
    top = config.error_damper
    worse = xp.where(damper < 1.0, damper + jump, xp.where(damper < top, damper * jump, top))
    return xp.where(rose, worse, damper * (1.0 / control_config.ERROR_DAMPER_DECAY))


def tolerance_threshold(best: Any, error_damper: Any, xp: Math) -> Any:
    """The loss at which the 2-D preset retraces: 1.1 T best (``CalcErrorTolerance`` and
    ``p2min_step``), T = 25 + (2500 + 71 sqrt(|best|)) / (1 + sqrt(e)); for a negative
    best, best + (1.1 T - 1) |best| (module docstring)."""
    cc = control_config
    spread = cc.TOLERANCE_SPAN + cc.TOLERANCE_ROOT * xp.sqrt(abs(best))
    tolerance = cc.TOLERANCE_BASE + xp.div(spread, 1.0 + xp.sqrt(error_damper))
    factor = cc.TOLERANCE_MARGIN * tolerance
    return best * xp.where(best >= 0.0, factor, 2.0 - factor)


def next_best(loss: Any, best: Any, xp: Math) -> Any:
    """The best loss so far after a later step: f_t if finite and below it, else relaxed
    by 10 % (best * 1.1, or best * 0.9 when negative), at most the largest double; a
    non-negative best at least BEST_FLOOR (a best of 0 would retrace every loss >= 0)."""
    relax = control_config.BEST_RELAX
    relaxed = xp.where(best >= 0.0, best * relax, best * (2.0 - relax))
    improved = all_finite(loss) & (loss < best)
    new_best = xp.where(improved, loss, xp.clamp(relaxed, hi=FLOAT64_MAX))
    return xp.where(new_best >= 0.0, xp.clamp(new_best, lo=control_config.BEST_FLOOR), new_best)


def damper_inputs(state: Any, config: ControlConfig, xp: Math) -> tuple[Any, Any, Any]:
    """(best, d, e) before this step: the state's entries once started, else the start
    values (best = f_{t-1}; the start values of an unused damper are 0)."""
    started = state[DAMPERS_STARTED] > 0
    best = xp.where(started, state[BEST_LOSS], state[LOSS_PREV])
    growth = xp.where(started, state[GROWTH_DAMPER], config.growth_damper or 0.0)
    error = xp.where(started, state[ERROR_DAMPER], config.error_damper or 0.0)
    return best, growth, error


def limit_alpha(
    alpha: Any, grad_sq: Any, step_index: Any, config: ControlConfig, xp: Math = TENSOR_MATH
) -> Any:
    """Warm-up floor, step cropping and the hard bounds, in that order.

    The floor alpha >= m / ||G|| (footnote 5) holds while ``step_index < warmup_steps``;
    cropping alpha <= c / ||G|| (section 3.5) is a safety bound and wins over the floor;
    the bounds [alpha_min, alpha_max] (section 3.1) are final. A zero gradient gives no
    floor and no crop (m/0 and c/0 would be infinite).
    """
    if config.warmup_steps > 0 or config.step_crop is not None:
        alpha = _norm_limits(alpha, grad_sq, step_index, config, xp)
    return xp.clamp(alpha, config.alpha_min, config.alpha_max)


def _norm_limits(alpha: Any, grad_sq: Any, step_index: Any, config: ControlConfig, xp: Math) -> Any:
    """The warm-up floor and the step crop of :func:`limit_alpha` (both need ||G||)."""
    grad_norm = xp.sqrt(grad_sq)
    has_norm = grad_norm > 0
    inv_norm = 1.0 / xp.where(has_norm, grad_norm, 1.0)
    if config.warmup_steps > 0:
        in_warmup = step_index < config.warmup_steps
        floor = config.warmup_min_step * inv_norm
        alpha = xp.where(in_warmup & has_norm, xp.maximum(alpha, floor), alpha)
    if config.step_crop is not None:
        crop = config.step_crop * inv_norm
        alpha = xp.where(has_norm, xp.minimum(alpha, crop), alpha)
    return alpha


def retrace_alpha(
    alpha_prev: Any,
    grad_prev_sq: Any,
    loss: Any,
    loss_prev: Any,
    config: ControlConfig,
    xp: Math = TENSOR_MATH,
) -> Any:
    """Soft restart (3.2): minimiser of the parabola h(s) = f(x_{t-1} - s G_{t-1}).

    h(0) = f_{t-1}, h'(0) = -Ga, h(alpha_{t-1}) = f_t give
    s* = alpha_{t-1} * 0.5 * alpha_{t-1} Ga / (f_t - f_{t-1} + alpha_{t-1} Ga).
    Non-finite or non-positive s* (f_t not finite, or a concave fit) falls back to
    alpha_{t-1} / 100; s* is capped at alpha_{t-1} / 2. Then the authors' floor
    s* >= retrace_min_step / ||G_{t-1}||, itself capped at alpha_{t-1} (a retrace never
    steps further than the step that failed), and the bounds [alpha_min, alpha_max].
    """
    linear_drop = alpha_prev * grad_prev_sq
    denom = loss - loss_prev + linear_drop
    candidate = xp.div(alpha_prev * 0.5 * linear_drop, denom)
    usable = all_finite(candidate) & (candidate > 0)
    fallback = alpha_prev * RETRACE_FALLBACK_SHRINK
    alpha = xp.where(usable, candidate, fallback)
    alpha = xp.minimum(alpha, alpha_prev * RETRACE_MAX_SHRINK)
    if config.retrace_min_step > 0:
        norm = xp.sqrt(grad_prev_sq)
        floor = config.retrace_min_step * (1.0 / xp.where(norm > 0, norm, 1.0))
        floor = xp.where(norm > 0, xp.minimum(floor, alpha_prev), 0.0)
        alpha = xp.maximum(alpha, floor)
    return xp.clamp(alpha, config.alpha_min, config.alpha_max)


def usable_gradient(loss: Any, grad_sq: Any, config: ControlConfig, xp: Math, *more: Any) -> Any:
    """Bool: f_t, ||G_t||^2 (and ``more``) finite, and ||G_t|| <= ``max_grad_norm``.

    A step on a larger gradient is not taken (a retrace or a skipped first step), as the
    authors skip gradients of norm >= 65e3 (``GradientMerge``, for fp16). ELRA sets it to
    the largest finite value of a compact ``state_dtype``: a G_{t-1} rounded to inf there
    could never be stepped back along."""
    usable = all_finite(loss, grad_sq, *more)
    if config.max_grad_norm is not None:
        usable = usable & xp.logical_not(grad_sq > config.max_grad_norm**2)
    return usable


def needs_retrace(
    state: Any,
    loss: Any,
    grad_sq: Any,
    grad_dot_prev: Any,
    config: ControlConfig,
    xp: Math = TENSOR_MATH,
) -> Any:
    """Bool: should step t retrace (section 3.2)?

    ``state`` is indexed by the entry constants: the packed vector, its ``unbind()`` or
    (with :data:`FLOAT_MATH`) a sequence of floats. With ``error_damper`` set (the 2-D
    preset) :func:`tolerance_threshold` replaces the 5-sigma rule.
    """
    not_finite = xp.logical_not(usable_gradient(loss, grad_sq, config, xp, grad_dot_prev))
    cycle_closed = state[CYCLE_CLOSED] > 0
    if config.error_damper is not None:  # the 2-D preset: against the best loss so far
        best, _, error = damper_inputs(state, config, xp)
        spike = loss >= tolerance_threshold(best, error, xp)
    else:
        sigma = state[CYCLE_STD] * state[SIGMA_SCALE]
        threshold = state[CYCLE_MEAN] + config.retrace_sigmas * sigma
        spike = cycle_closed & (loss > threshold)
    if config.initial_retrace_factor is not None:
        first = state[LOSS_FIRST]
        initial_limit = first + (config.initial_retrace_factor - 1.0) * abs(first)
        spike = spike | (xp.logical_not(cycle_closed) & (loss > initial_limit))
    return not_finite | spike


def control_step(
    state: Any,
    loss: Any,
    grad_sq: Any,
    grad_dot_prev: Any,
    config: ControlConfig,
    xp: Math = TENSOR_MATH,
    lr: Any = 1.0,
) -> tuple[Any, Decision]:
    """One step of the law. Returns the new packed state and the kernels' decision.

    Args:
        state: packed float64 control state (see the index constants); a sequence of
            floats with :data:`FLOAT_MATH`, which then returns a list.
        loss: f_t, 0-d float64 on the state's device (or a float).
        grad_sq: <G_t, G_t>.
        grad_dot_prev: <G_{t-1}, G_t> (ignored on the first step).
        xp: :data:`TENSOR_MATH` or :data:`FLOAT_MATH`.
        lr: the param groups' learning rate (a float, or 0-d float64 on the state's
            device): the step taken is lr * alpha_t. alpha follows eq. (4) as before,
            measured at the points actually reached; a retrace fits its parabola along
            the step actually taken, lr_{t-1} alpha_{t-1}, and moves back by the
            difference of the steps taken. lr = 1 is the paper's law, bit for bit.
    """
    state = xp.unpack(state)
    alpha_prev = state[ALPHA]
    lr_prev = state[LR_TAKEN]
    taken_prev = alpha_prev * lr_prev  # the step that led to x_t
    grad_prev_sq = state[GRAD_PREV_SQ]
    loss_prev = state[LOSS_PREV]
    has_prev = (state[ACCEPTED] > 0) & (state[RESTART_PENDING] == 0)
    step_index = state[ACCEPTED] + state[RETRACES]
    finite_now = usable_gradient(loss, grad_sq, config, xp)

    # First step (and the step after a restart): x <- wd x - alpha G; a non-finite one is
    # skipped (no move).
    first_alpha = limit_alpha(alpha_prev, grad_sq, step_index, config, xp)

    retrace = needs_retrace(state, loss, grad_sq, grad_dot_prev, config, xp)
    damped = config.growth_damper is not None or config.error_damper is not None
    if damped:  # the 2-D preset (module docstring)
        best, growth_in, error_in = damper_inputs(state, config, xp)
        growth_damper, error_damper = growth_in, error_in
    cap = None
    if config.growth_damper is not None:
        growth_damper = next_growth_damper(growth_in, retrace, config, xp)
        cap = growth_cap(growth_damper, config, xp)
    later_accept_alpha = limit_alpha(
        accept_alpha(alpha_prev, grad_prev_sq, grad_dot_prev, config, xp, cap),
        grad_sq,
        step_index,
        config,
        xp,
    )
    later_retrace_alpha = retrace_alpha(taken_prev, grad_prev_sq, loss, loss_prev, config, xp)

    accept = xp.where(has_prev, xp.logical_not(retrace), finite_now)
    moved_back = has_prev & retrace
    retrace_run = xp.where(moved_back, state[RETRACE_RUN] + 1.0, 0.0)
    # The max_retraces-th retrace in a row restarts: all the way back (alpha 0 on the
    # line of G_{t-1}), the last accepted alpha, fresh statistics.
    restart = moved_back & (
        retrace_run >= (config.max_retraces if config.max_retraces is not None else math.inf)
    )
    alpha_new = xp.where(
        has_prev,
        xp.where(retrace, later_retrace_alpha, later_accept_alpha),
        xp.where(finite_now, first_alpha, alpha_prev),
    )
    back = xp.where(moved_back, taken_prev - xp.where(restart, 0.0, alpha_new * lr), 0.0)
    alpha_new = xp.where(restart, state[ALPHA_ACCEPTED], alpha_new)
    taken = alpha_new * lr

    accept_f = xp.as_float(accept)
    reject_f = 1.0 - accept_f
    keep_f = 1.0 - xp.as_float(restart)  # 0.0 clears what a restart forgets
    first_accept = accept & xp.logical_not(has_prev)
    # Only finite, accepted losses enter the cycle statistics: a retraced spike is the
    # outlier the statistics exist to detect. They are shifted and scaled by the cycle's
    # first loss K (module docstring).
    starting = accept & (state[CYCLE_COUNT] == 0)
    shift = xp.where(starting, loss, state[CYCLE_SHIFT])
    scale_before = xp.where(starting, xp.where(shift != 0, abs(shift), 1.0), state[CYCLE_SCALE])
    deviation = xp.where(accept, loss - shift, 0.0)
    scale = xp.clamp(xp.maximum(scale_before, abs(deviation)), hi=FLOAT64_MAX)
    ratio = scale_before / scale  # <= 1: the sums so far, in units of the new S
    unit = xp.clamp(xp.div(deviation, scale), -1.0, 1.0)
    scaled = state[SIGMA_SCALE]
    inflated = xp.where(moved_back, scaled * config.sigma_inflation, scaled)
    sigma_scale = xp.clamp(
        xp.where(accept, scaled * (1.0 / config.sigma_inflation), inflated), lo=1.0
    )
    if damped:  # a later step updates the dampers, the first (accepted) one starts them
        if config.error_damper is not None:
            rose = accept & (loss > loss_prev)
            error_damper = next_error_damper(error_in, rose, config, xp)
        best = xp.where(first_accept, loss, xp.where(has_prev, next_best(loss, best, xp), best))
        dampers = [  # a first step keeps the start values: the first accept starts them
            best,
            xp.where(has_prev, growth_damper, growth_in),
            xp.where(has_prev, error_damper, error_in),
            xp.where(restart, 0.0, xp.where(has_prev | first_accept, 1.0, state[DAMPERS_STARTED])),
        ]
    else:  # not started: a preset state loaded here starts afresh if the preset returns
        dampers = [
            state[BEST_LOSS],
            state[GROWTH_DAMPER],
            state[ERROR_DAMPER],
            state[DAMPERS_STARTED] * 0.0,
        ]
    new_state = xp.pack(
        [
            alpha_new,
            xp.where(accept, grad_sq, grad_prev_sq),
            xp.where(accept, loss, loss_prev),
            xp.where(first_accept, loss, state[LOSS_FIRST]),
            state[ACCEPTED] + accept_f,
            state[RETRACES] + reject_f,
            reject_f,
            (state[CYCLE_COUNT] + accept_f) * keep_f,
            (state[CYCLE_SUM] * ratio + unit) * keep_f,
            (state[CYCLE_SUMSQ] * (ratio * ratio) + unit * unit) * keep_f,
            state[CYCLE_MEAN],
            state[CYCLE_STD],
            state[CYCLE_CLOSED] * keep_f,
            state[CYCLE_LAST_COUNT],
            shift * keep_f,
            xp.where(restart, 1.0, scale),
            xp.where(restart, 1.0, sigma_scale),
            xp.where(restart, 0.0, retrace_run),
            state[RESTARTS] + (1.0 - keep_f),
            xp.where(accept, alpha_new, state[ALPHA_ACCEPTED]),
            xp.where(restart, 1.0, xp.where(first_accept, 0.0, state[RESTART_PENDING])),
            lr_prev * 0.0 + lr,  # as a state entry (a float lr joins a tensor state)
            *dampers,
        ]
    )
    return new_state, Decision(accept_f, taken, back)


def close_cycle(state: torch.Tensor, min_losses: int = 1) -> torch.Tensor:
    """End a control cycle: its mean and sigma become the retrace reference (3.2, 3.3).

    A cycle with fewer than ``min_losses`` accepted losses does not close: its sums go on
    into the next cycle and the previous statistics stay (``CYCLE_LAST_COUNT`` = 0 says
    so). mean = K + S E[u], sigma = S sqrt(max(E[u^2] - E[u]^2, 0)) from the shifted,
    scaled sums (module docstring). No host read.
    """
    count = state[CYCLE_COUNT]
    closes = (count >= min_losses) & (count > 0)
    safe_count = torch.where(closes, count, torch.ones_like(count))
    shift = state[CYCLE_SHIFT]
    scale = state[CYCLE_SCALE]
    mean_unit = state[CYCLE_SUM] / safe_count
    variance_unit = torch.clamp(state[CYCLE_SUMSQ] / safe_count - mean_unit * mean_unit, min=0.0)
    zero = torch.zeros_like(count)
    new_state = state.clone()
    new_state[CYCLE_MEAN] = torch.where(closes, shift + scale * mean_unit, state[CYCLE_MEAN])
    new_state[CYCLE_STD] = torch.where(closes, scale * torch.sqrt(variance_unit), state[CYCLE_STD])
    new_state[CYCLE_CLOSED] = torch.where(closes, torch.ones_like(count), state[CYCLE_CLOSED])
    new_state[CYCLE_LAST_COUNT] = torch.where(closes, count, zero)
    for entry in (CYCLE_COUNT, CYCLE_SUM, CYCLE_SUMSQ, CYCLE_SHIFT):
        new_state[entry] = torch.where(closes, zero, state[entry])
    new_state[CYCLE_SCALE] = torch.where(closes, torch.ones_like(count), scale)
    return new_state
