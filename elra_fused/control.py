"""The ELRA control law: the scalar per-step logic of paper sections 3.1, 3.2 and 3.5.

Everything here is a pure function over a packed float64 state and scalars, written with
``xp.where`` instead of Python branches on values. This is the one implementation of the
law: every backend (reference, triton, cpp) runs it between its ``dots`` and ``update``
passes, in one of two number systems with the same bits (:mod:`elra_fused.control_math`:
0-d device tensors, sync-free and graph-capturable, or Python floats for CPU parameters,
~25 instead of ~150 us per step). Bit-identity is by construction (the same IEEE double
operations in the same order; a scalar divided by a tensor is written ``k * (1.0 / x)``,
which is what torch computes for ``k / x``) and is tested step by step. On a GPU the ~200
tensor ops would be ~200 launches per step; :func:`compiled_control_step` is the same law
through ``torch.compile`` (fused into a few kernels; on the CPU 157 -> 33 us per call,
bit-identical). :class:`ControlRunner`, at the end, picks among the three each step.

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

The ``f_0 + 0.1 |f_0|`` form of the initial rule equals the paper's ``1.1 f_0`` for a
positive f_0 and stays a "10 % worse" test when f_0 is negative (e.g. the saddle).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .control_math import FLOAT_MATH, TENSOR_MATH, Math, all_finite

# ---------------------------------------------------------------------------------------
# Paper constants (defaults of the constructor arguments).
# ---------------------------------------------------------------------------------------
#: Initial step size alpha_0 (section 3.1: "We chose alpha_0 = 1e-3").
ALPHA0 = 1e-3
#: Gain k of the noise correction kappa(a) = 1 + k / (1 + a^2) (section 3.1).
KAPPA_GAIN = 0.15
#: Cap of the growth ratio alpha_t / alpha_{t-1} (section 3.1, footnote 4: "for neural
#: networks gamma_max = 10 is probably sufficient").
GAMMA_MAX = 10.0
#: Hard bounds 1e-8 < alpha < 1e6 (section 3.1).
ALPHA_MIN = 1e-8
ALPHA_MAX = 1e6
#: Step cropping constant c in alpha_t * ||G_t|| <= c (section 3.5, "we use c = 2").
STEP_CROP = 2.0
#: Warm-up floor m in alpha_t * ||G_t|| >= m (section 3.1, footnote 5).
WARMUP_MIN_STEP = 0.1
#: Retrace when f_t > mean + 5 sigma of the last control cycle (section 3.2).
RETRACE_SIGMAS = 5.0
#: Before the first cycle closes: retrace when f_t > 1.1 f_0 (section 3.2).
INITIAL_RETRACE_FACTOR = 1.1
#: A retrace reduces alpha at least by this factor (section 3.2).
RETRACE_MAX_SHRINK = 0.5
#: Fallback shrink when the parabola formula gives no usable step (issue spec: alpha/100).
RETRACE_FALLBACK_SHRINK = 0.01


@dataclass(frozen=True)
class ControlConfig:
    """Constants of the control law; every default is the paper's value.

    ``step_crop`` and ``warmup_steps`` are off by default (the paper enables them per
    problem); ``initial_retrace_factor=None`` drops the ``f_t > 1.1 f_0`` rule, as the
    paper suggests for pre-trained starting points.
    """

    alpha0: float = ALPHA0
    kappa_gain: float = KAPPA_GAIN
    gamma_max: float = GAMMA_MAX
    alpha_min: float = ALPHA_MIN
    alpha_max: float = ALPHA_MAX
    step_crop: float | None = None
    warmup_steps: int = 0
    warmup_min_step: float = WARMUP_MIN_STEP
    retrace_sigmas: float = RETRACE_SIGMAS
    initial_retrace_factor: float | None = INITIAL_RETRACE_FACTOR

    def __post_init__(self) -> None:
        positive = {
            "alpha0": self.alpha0,
            "gamma_max": self.gamma_max,
            "alpha_min": self.alpha_min,
            "alpha_max": self.alpha_max,
            "warmup_min_step": self.warmup_min_step,
            "retrace_sigmas": self.retrace_sigmas,
        }
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
                raise ValueError(f"ELRA: {name} must be a finite positive number, got {value!r}")
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"ELRA: need alpha_min < alpha_max, got {self.alpha_min} and {self.alpha_max}"
            )
        if not self.alpha_min <= self.alpha0 <= self.alpha_max:
            raise ValueError(
                f"ELRA: alpha0={self.alpha0} lies outside [alpha_min, alpha_max] = "
                f"[{self.alpha_min}, {self.alpha_max}]"
            )
        if not (isinstance(self.kappa_gain, (int, float)) and self.kappa_gain >= 0):
            raise ValueError(f"ELRA: kappa_gain must be >= 0, got {self.kappa_gain!r}")
        if self.step_crop is not None and not self.step_crop > 0:
            raise ValueError(f"ELRA: step_crop must be > 0 or None, got {self.step_crop!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"ELRA: warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.initial_retrace_factor is not None and not self.initial_retrace_factor >= 1:
            raise ValueError(
                "ELRA: initial_retrace_factor must be >= 1 or None, "
                f"got {self.initial_retrace_factor!r}"
            )

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Packed control state: one float64 vector on the parameters' device. One tensor means
# one in-place write per step (graph-capturable) and one entry in the state_dict.
# ---------------------------------------------------------------------------------------
ALPHA = 0  # alpha of the last step taken (alpha_{t-1} when step t starts)
GRAD_PREV_SQ = 1  # Ga = ||G_{t-1}||^2
LOSS_PREV = 2  # f_{t-1}
LOSS_FIRST = 3  # f_0
ACCEPTED = 4  # number of accepted steps (first step included)
RETRACES = 5  # number of retraced (or skipped first) steps
LAST_RETRACED = 6  # 1.0 if the last step() retraced
CYCLE_COUNT = 7  # accepted losses seen in the current control cycle
CYCLE_SUM = 8  # their sum
CYCLE_SUMSQ = 9  # their sum of squares
CYCLE_MEAN = 10  # mean of f over the last closed cycle
CYCLE_STD = 11  # its standard deviation sigma
CYCLE_CLOSED = 12  # 1.0 once a cycle with at least one loss has closed
CYCLE_LAST_COUNT = 13  # accepted losses in the cycle that closed last (0: it was empty)
STATE_SIZE = 14


def initial_state(config: ControlConfig, device: torch.device | str) -> torch.Tensor:
    """Control state before the first step: alpha = alpha_0, everything else zero."""
    state = torch.zeros(STATE_SIZE, dtype=torch.float64, device=device)
    state[ALPHA] = config.alpha0
    return state


class Decision(NamedTuple):
    """What the kernels need from one control step (0-d float64 tensors, or floats with
    :data:`FLOAT_MATH`).

    accept: 1.0 for an accepted step (x <- wd x - alpha G), 0.0 for a retrace or a
        skipped first step (x <- x + back * G_{t-1}).
    alpha: the new alpha_t (the step length of an accepted step).
    back: alpha_{t-1} - alpha_t on a retrace, 0.0 otherwise.
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
) -> Any:
    """Eq. (4): alpha_t = alpha_{t-1} * min(Ga / (Ga - S) * kappa, gamma_max).

    ``Ga - S <= 0`` means the gradient did not turn against the last step: the parabola
    ansatz has no minimum ahead, so the growth is the cap. ``Ga == 0`` (the last gradient
    was zero) carries no information about the landscape: alpha is kept.
    """
    denom = grad_prev_sq - grad_dot_prev
    turned = denom > 0
    ratio = xp.where(turned, grad_prev_sq / xp.where(turned, denom, 1.0), config.gamma_max)
    growth = xp.clamp(ratio * kappa(alpha_prev, config.kappa_gain), hi=config.gamma_max)
    return alpha_prev * xp.where(grad_prev_sq > 0, growth, 1.0)


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
    alpha_{t-1} / 100; s* is capped at alpha_{t-1} / 2 and floored at alpha_min.
    """
    linear_drop = alpha_prev * grad_prev_sq
    denom = loss - loss_prev + linear_drop
    candidate = xp.div(alpha_prev * 0.5 * linear_drop, denom)
    usable = all_finite(candidate) & (candidate > 0)
    fallback = alpha_prev * RETRACE_FALLBACK_SHRINK
    alpha = xp.where(usable, candidate, fallback)
    alpha = xp.minimum(alpha, alpha_prev * RETRACE_MAX_SHRINK)
    return xp.clamp(alpha, config.alpha_min, config.alpha_max)


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
    (with :data:`FLOAT_MATH`) a sequence of floats.
    """
    not_finite = xp.logical_not(all_finite(loss, grad_sq, grad_dot_prev))
    cycle_closed = state[CYCLE_CLOSED] > 0
    threshold = state[CYCLE_MEAN] + config.retrace_sigmas * state[CYCLE_STD]
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
) -> tuple[Any, Decision]:
    """One step of the law. Returns the new packed state and the kernels' decision.

    Args:
        state: packed float64 control state (see the index constants); a sequence of
            floats with :data:`FLOAT_MATH`, which then returns a list.
        loss: f_t, 0-d float64 on the state's device (or a float).
        grad_sq: <G_t, G_t>.
        grad_dot_prev: <G_{t-1}, G_t> (ignored on the first step).
        xp: :data:`TENSOR_MATH` or :data:`FLOAT_MATH`.
    """
    state = xp.unpack(state)
    alpha_prev = state[ALPHA]
    grad_prev_sq = state[GRAD_PREV_SQ]
    loss_prev = state[LOSS_PREV]
    has_prev = state[ACCEPTED] > 0
    step_index = state[ACCEPTED] + state[RETRACES]
    finite_now = all_finite(loss, grad_sq)

    # First step: x_1 = wd x_0 - alpha_0 G_0; a non-finite start is skipped (no move).
    first_alpha = limit_alpha(alpha_prev, grad_sq, step_index, config, xp)

    retrace = needs_retrace(state, loss, grad_sq, grad_dot_prev, config, xp)
    later_accept_alpha = limit_alpha(
        accept_alpha(alpha_prev, grad_prev_sq, grad_dot_prev, config, xp),
        grad_sq,
        step_index,
        config,
        xp,
    )
    later_retrace_alpha = retrace_alpha(alpha_prev, grad_prev_sq, loss, loss_prev, config, xp)

    accept = xp.where(has_prev, xp.logical_not(retrace), finite_now)
    moved_back = has_prev & retrace
    alpha_new = xp.where(
        has_prev,
        xp.where(retrace, later_retrace_alpha, later_accept_alpha),
        xp.where(finite_now, first_alpha, alpha_prev),
    )
    back = xp.where(moved_back, alpha_prev - alpha_new, 0.0)

    accept_f = xp.as_float(accept)
    reject_f = 1.0 - accept_f
    first_accept = accept & xp.logical_not(has_prev)
    # Only finite, accepted losses enter the cycle statistics: a retraced spike is the
    # outlier the statistics exist to detect.
    safe_loss = xp.where(accept, loss, 0.0)
    new_state = xp.pack(
        [
            alpha_new,
            xp.where(accept, grad_sq, grad_prev_sq),
            xp.where(accept, loss, loss_prev),
            xp.where(first_accept, loss, state[LOSS_FIRST]),
            state[ACCEPTED] + accept_f,
            state[RETRACES] + reject_f,
            reject_f,
            state[CYCLE_COUNT] + accept_f,
            state[CYCLE_SUM] + safe_loss,
            state[CYCLE_SUMSQ] + safe_loss * safe_loss,
            state[CYCLE_MEAN],
            state[CYCLE_STD],
            state[CYCLE_CLOSED],
            state[CYCLE_LAST_COUNT],
        ]
    )
    return new_state, Decision(accept_f, alpha_new, back)


@functools.cache
def compiled_control_step() -> Callable[..., tuple[torch.Tensor, Decision]]:
    """:func:`control_step` on :data:`TENSOR_MATH` through ``torch.compile`` (one per
    process; compiled at its first call, again for another device or config).

    The law is pure pointwise math on 0-d tensors, so it compiles as one graph
    (``fullgraph=True``) into fused kernels: no host sync, capturable in a CUDA graph
    once it has compiled (call it before capturing, as the warm-up steps do).
    """
    return torch.compile(control_step, fullgraph=True, dynamic=False)


def close_cycle(state: torch.Tensor) -> torch.Tensor:
    """End a control cycle: its mean and sigma become the retrace reference (3.2, 3.3).

    A cycle that saw no accepted loss leaves the previous statistics in place.
    """
    count = state[CYCLE_COUNT]
    has_losses = count > 0
    safe_count = torch.where(has_losses, count, torch.ones_like(count))
    mean = state[CYCLE_SUM] / safe_count
    variance = torch.clamp(state[CYCLE_SUMSQ] / safe_count - mean * mean, min=0.0)
    new_state = state.clone()
    new_state[CYCLE_MEAN] = torch.where(has_losses, mean, state[CYCLE_MEAN])
    new_state[CYCLE_STD] = torch.where(has_losses, torch.sqrt(variance), state[CYCLE_STD])
    new_state[CYCLE_CLOSED] = torch.where(has_losses, torch.ones_like(count), state[CYCLE_CLOSED])
    new_state[CYCLE_LAST_COUNT] = count
    new_state[CYCLE_COUNT] = 0.0
    new_state[CYCLE_SUM] = 0.0
    new_state[CYCLE_SUMSQ] = 0.0
    return new_state


# ---------------------------------------------------------------------------------------
# The runner: where and how the law runs each step.
# ---------------------------------------------------------------------------------------
class ControlRunner:
    """Owns the packed control state and runs the law once per step where it is cheapest.

    * ``host=True`` (the CPU default): :func:`control_step` on Python floats
      (:data:`FLOAT_MATH`, same bits as the tensor law). On the CPU the device is the
      host, so reading the values syncs nothing, and the law costs a few us instead of
      ~150 us of tiny tensor ops. Set on a GPU it works but reads the state back every
      step.
    * ``host=False, compiled=True`` (the CUDA default): :func:`compiled_control_step`,
      a few fused kernels; a compiler failure warns once and falls back to eager.
    * ``host=False, compiled=False``: the law as ~200 eager 0-d tensor ops.

    The device paths never read a value back to the host (CUDA-graph capturable).
    """

    def __init__(
        self, config: ControlConfig, device: torch.device, *, host: bool, compiled: bool
    ) -> None:
        self.config = config
        self.state = initial_state(config, device)
        self.host = host
        self.compiled = compiled

    def alpha_prev(self) -> float | torch.Tensor:
        """alpha_{t-1} (read before :meth:`step` commits): a float with ``host``, else a
        0-d device tensor (a copy, no host read)."""
        if self.host:
            return float(self.state.cpu()[ALPHA])
        return self.state[ALPHA].clone()

    def loss_value(self, loss: torch.Tensor | float, group: Any = None) -> float | torch.Tensor:
        """f_t as the law takes it: a Python float with ``host``, else a 0-d fp64 tensor on
        the state's device (no host read). With a process ``group`` (data parallel) it is
        the mean over the group: every rank receives the same sum and divides it by the
        same count, so all take bit-identical decisions, and a non-finite loss on any
        rank makes every rank retrace. ``loss`` has passed :func:`checks.check_loss`."""
        device = self.state.device
        if group is None and self.host:
            return float(loss.item()) if isinstance(loss, torch.Tensor) else float(loss)
        if isinstance(loss, torch.Tensor):
            # A copy when reducing: all_reduce works in place on what it is given.
            value = (
                loss.detach()
                .reshape(())
                .to(device, torch.float64, non_blocking=True, copy=group is not None)
            )
        else:
            value = torch.tensor(float(loss), dtype=torch.float64, device=device)
        if group is None:
            return value
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value /= dist.get_world_size(group)
        return float(value.item()) if self.host else value

    def step(self, loss: float | torch.Tensor, partials: Sequence[torch.Tensor]) -> Decision:
        """Sum the segments' [||G_t||^2, <G_t, G_{t-1}>] (in segment order, from zero, in
        fp64), run the law and commit the new state. The decision comes as 0-d device
        tensors, or as floats with ``host``."""
        if self.host:
            grad_sq = grad_dot_prev = 0.0
            for partial in partials:
                part_sq, part_dot = partial.tolist()
                grad_sq += part_sq
                grad_dot_prev += part_dot
            # The state goes in and out through a numpy view (one call each way: this
            # runs right after backward, when the CPU's caches are cold and every torch
            # call costs several us). On the CPU .cpu() is the tensor itself; on a GPU
            # it is a copy, written back below.
            host_state = self.state.cpu()
            state_view = host_state.numpy()
            state, decision = control_step(
                state_view.tolist(), loss, grad_sq, grad_dot_prev, self.config, FLOAT_MATH
            )
            state_view[:] = state
            if host_state is not self.state:
                self.state.copy_(host_state)
            return decision
        totals = torch.zeros(2, dtype=torch.float64, device=self.state.device)
        for partial in partials:
            totals += partial.to(self.state.device, non_blocking=True)
        args = (self.state, loss, totals[0], totals[1], self.config)
        # Inside a torch.compile of the user's own step, dynamo traces the plain law.
        if self.compiled and not torch.compiler.is_compiling():
            try:
                new_state, decision = compiled_control_step()(*args)
            except Exception as exc:  # any compiler failure: run the law eagerly
                # Compiling happens before the law runs, and the law itself changes
                # nothing in place: the eager call below starts from the same state.
                self.compiled = False
                warnings.warn(
                    f"ELRA: torch.compile of the control law failed ({type(exc).__name__}: "
                    f"{exc}); running it eagerly (~200 small ops per step). Pass "
                    "compile_control=False to skip the attempt.",
                    stacklevel=6,  # the user's opt.step call
                )
                new_state, decision = control_step(*args)
        else:
            new_state, decision = control_step(*args)
        self.state.copy_(new_state)
        return decision

    def close_cycle(self) -> None:
        """End the current control cycle (no host read)."""
        self.state.copy_(close_cycle(self.state))
