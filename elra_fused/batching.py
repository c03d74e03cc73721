"""Dynamic batch size (paper 3.3), gradient decay (3.4) and micro-batch grouping (3.5).

ELRA grows the batch size instead of decaying a learning rate. The batch of step t is
``bs_t = m_t * bs_min``: ``m_t`` micro-batches of a fixed size ``bs_min`` whose gradients
are accumulated before one optimizer step. Once per *control cycle* (a fixed number of
samples, by default one epoch) the mean ``f_s`` and standard deviation ``sigma_s`` of the
loss over the cycle decide whether ``m`` changes. It grows by the factor 1.5 when any of

1. ``f_s > f_{s-1} + sigma_s / 10``  (the loss got worse by more than noise),
2. ``sigma_s / |f_s| > 1/2``          (the relative noise is large),
3. ``f_{s-3} < f_s, f_{s-1}, f_{s-2}`` (no progress for three cycles)

holds, and every third change is a decrease by 1/1.5 instead ("cascades": up, up, down,
up, up, down, ...).

Three layers, usable on their own:

* :class:`BatchSizeController` -- the pure rule. ``observe(mean, sigma)`` once per cycle
  returns a :class:`CycleDecision`; no optimizer, no tensors. This is what the tests
  drive with synthetic loss statistics.
* :class:`DynamicBatchSize` -- the wiring. ``end_cycle()`` closes the optimizer's control
  cycle (``opt.end_cycle()``), reads ``opt.cycle_statistics()`` (the same mean and sigma
  the retrace rule uses: one source, one host read per cycle) and feeds the controller.
* :class:`GroupedBatches` -- wraps any DataLoader (or iterable of batches) and yields one
  :class:`MicroBatchGroup` of ``m_t`` micro-batches per optimizer step. It reads ``m_t``
  at the start of every group (a change takes effect at the next group, also mid-epoch),
  skips the short last batch of every pass (3.5), counts samples and closes the control
  cycle through the :class:`DynamicBatchSize` when a cycle ends.

Data parallel (DDP, FSDP2): give each rank its ``DistributedSampler`` share and wrap that
loader as above. ``opt.cycle_statistics()`` is the same on every rank (ELRA averages the
loss over the group and shares its decisions), so every rank changes ``m_t`` at the same
step: the global batch is ``world * m_t * bs_min``.

Integer ``m_t``: the controller tracks the exact multiplier ``m_0 * 1.5**e`` (``e`` = ups
minus downs, so cascades never drift) and uses ``m_t = clamp(round_half_up(m_0 * 1.5**e),
m_min, m_max)``. With the paper's ``m_0 = 2`` the sequence of an up-up-down cascade is
2, 3, 5, 3, 5, 7, 5, 7, 10, ...

Gradient decay (3.4, optional): the step uses ``G~_t = G_t * m_0 / m_t``. It is applied as
a *loss scale for backward*: every micro-batch loss is multiplied by
``group.scale = (m_0 / m_t) / m_t`` before ``backward()``, so the accumulated gradient is
the decayed mean gradient; the loss passed to ``opt.step`` stays the unscaled mean loss
(the retrace rule and the cycle statistics see the true f). Without gradient decay
``group.scale = 1 / m_t`` (plain averaging).

The loop keeps the plain ELRA shape::

    from elra_fused import ELRA
    from elra_fused.batching import DynamicBatchSize, GroupedBatches

    opt = ELRA(model.parameters())
    sizer = DynamicBatchSize(opt, m0=2)                  # bs_0 = 2 x loader.batch_size
    grouped = GroupedBatches(loader, sizer)              # cycle = one pass over the loader
    for epoch in range(epochs):
        for group in grouped:                            # one group = one optimizer step
            total = 0.0
            for xb, yb in group:
                loss = loss_fn(model(xb), yb)
                (loss * group.scale).backward()          # averaging (+ gradient decay)
                total = total + loss.detach()
            opt.step(total / len(group))                 # unscaled mean loss, no sync
            opt.zero_grad()
        # the cycle closed right after the epoch's last step: sizer.m may have changed

Host work: the controller runs once per cycle (one host read of the statistics); per
group the wrapper only reads batch *shapes* (no device sync).

Notes:

* A group is a list: its ``m_t`` micro-batches are fetched from the loader before the
  group is handed out (memory: ``m_t`` input batches, not activations). This is what
  makes the short-last-batch test and exact group sizes possible for any iterable.
* At the end of a pass fewer than ``m_t`` micro-batches may remain. ``leftover="carry"``
  (default) keeps them and starts the next pass's first group with them: no data is lost
  and every step averages exactly ``m_t`` micro-batches. ``leftover="drop"`` discards
  them (counted in ``dropped_batches``).
* The control cycle closes when the wrapper resumes after the group that completed it,
  i.e. after the user's ``opt.step`` for that group. Breaking out of the loop early skips
  that close.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

#: Factor by which m_t (and bs_t = m_t * bs_min) changes (section 3.3: "by a factor of 1.5").
GROWTH_FACTOR = 1.5
#: Every third change is a decrease by 1 / GROWTH_FACTOR (section 3.3, "cascades").
CASCADE_PERIOD = 3
#: Condition (1): f_s > f_{s-1} + sigma_s / 10 (section 3.3).
WORSE_SIGMA_FRACTION = 0.1
#: Condition (2): sigma_s / f_s > 1/2 (section 3.3).
RELATIVE_NOISE_LIMIT = 0.5
#: Condition (3) compares f_s, f_{s-1}, f_{s-2} against f_{s-3} (section 3.3).
STALL_CYCLES = 3


@dataclass(frozen=True)
class CycleDecision:
    """What the controller did at the end of one control cycle.

    conditions: the three conditions of section 3.3, in the paper's order.
    change: +1 (m grew), -1 (cascade decrease), 0 (no condition held).
    """

    cycle: int
    mean: float
    sigma: float
    conditions: tuple[bool, bool, bool]
    change: int
    m_before: int
    m_after: int


def round_half_up(value: float) -> int:
    """Nearest integer, halves rounded up (2.5 -> 3; Python's round() would give 2)."""
    return int(math.floor(value + 0.5))


def is_count(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer >= ``minimum``. A bool is not a count: ``True``
    passing as 1 hides a flag given where a number was meant."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (int or float, possibly inf or NaN), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class BatchSizeController:
    """The batch size rule of paper section 3.3 as a pure, host-side state machine.

    Args:
        m0: initial number of micro-batches per step (the paper: 2, i.e. bs_0 = 2 x 32).
        m_min: floor of m_t (>= 1).
        m_max: optional cap of m_t (e.g. the number of micro-batches in a cycle).
        gradient_decay: scale gradients by m_0 / m_t (section 3.4).
        growth: the change factor (1.5).
        cascade_period: every ``cascade_period``-th change is a decrease (3).

    Feed it ``observe(mean, sigma)`` once per cycle; read ``m`` and ``grad_scale``.

    Bad arguments raise at construction (counts are ints, not bools; ``gradient_decay`` a
    bool; ``growth`` a finite number > 1), and :meth:`load_state_dict` checks the whole
    state before it changes anything.
    """

    def __init__(
        self,
        m0: int = 1,
        *,
        m_min: int = 1,
        m_max: int | None = None,
        gradient_decay: bool = False,
        growth: float = GROWTH_FACTOR,
        cascade_period: int = CASCADE_PERIOD,
    ) -> None:
        if not is_count(m_min, 1):
            raise ValueError(f"BatchSizeController: m_min must be an int >= 1, got {m_min!r}")
        if not is_count(m0, m_min):
            raise ValueError(
                f"BatchSizeController: m0 must be an int >= m_min ({m_min}), got {m0!r}"
            )
        if m_max is not None and not is_count(m_max, m0):
            raise ValueError(
                f"BatchSizeController: m_max must be None or an int >= m0 ({m0}), got {m_max!r}"
            )
        if not isinstance(gradient_decay, bool):
            raise ValueError(
                f"BatchSizeController: gradient_decay must be True or False, got {gradient_decay!r}"
            )
        # inf would overflow m at the first change; NaN would compare False everywhere.
        if not (is_real(growth) and math.isfinite(growth) and growth > 1):
            raise ValueError(
                f"BatchSizeController: growth must be a finite number > 1, got {growth!r}"
            )
        if not is_count(cascade_period, 1):
            raise ValueError(
                f"BatchSizeController: cascade_period must be an int >= 1, got {cascade_period!r}"
            )
        self.m0 = m0
        self.m_min = m_min
        self.m_max = m_max
        self.gradient_decay = gradient_decay
        self.growth = growth
        self.cascade_period = cascade_period
        self.exponent = 0  # ups minus downs
        self.changes = 0  # number of triggered changes (ups and downs)
        self.means: list[float] = []  # f_s of every observed cycle
        self.decisions: list[CycleDecision] = []

    # ------------------------------------------------------------------ read-outs
    @property
    def m(self) -> int:
        """m_t: micro-batches per optimizer step."""
        return self.m_at(self.exponent)

    def m_at(self, exponent: int) -> int:
        """m for ``exponent`` (ups minus downs): ``m_0 * growth**exponent``, rounded half
        up and clamped to [m_min, m_max]. OverflowError when the power exceeds a float."""
        m = max(self.m_min, round_half_up(self.m0 * float(self.growth) ** exponent))
        return m if self.m_max is None else min(m, self.m_max)

    @property
    def decay_factor(self) -> float:
        """m_0 / m_t with gradient decay (section 3.4), else 1."""
        return self.m0 / self.m if self.gradient_decay else 1.0

    @property
    def grad_scale(self) -> float:
        """Loss scale for each micro-batch's backward: decay_factor / m_t."""
        return self.decay_factor / self.m

    # ------------------------------------------------------------------ the rule
    def conditions(self, mean: float, sigma: float) -> tuple[bool, bool, bool]:
        """The three conditions of section 3.3 for a cycle with statistics (mean, sigma),
        against the history of earlier cycles (not modified)."""
        history = self.means
        worse = len(history) >= 1 and mean > history[-1] + WORSE_SIGMA_FRACTION * sigma
        # |f| makes the relative noise meaningful for losses that may be negative; for the
        # usual positive losses it is the paper's sigma_s / f_s.
        noisy = sigma > RELATIVE_NOISE_LIMIT * abs(mean)
        stalled = len(history) >= STALL_CYCLES and all(
            history[-STALL_CYCLES] < value for value in (mean, history[-1], history[-2])
        )
        return worse, noisy, stalled

    def observe(self, mean: float, sigma: float) -> CycleDecision:
        """Close one cycle with its loss statistics; maybe change m. Returns the decision."""
        mean, sigma = float(mean), float(sigma)
        conditions = self.conditions(mean, sigma)
        m_before = self.m
        change = 0
        # A non-finite statistic carries no information: record it, change nothing.
        if any(conditions) and math.isfinite(mean) and math.isfinite(sigma):
            self.changes += 1
            change = -1 if self.changes % self.cascade_period == 0 else 1
            # At a bound the exponent stays (no wind-up): held at m_max, every up would
            # otherwise raise it further, and the next down could not bring m below m_max.
            if change < 0:
                at_bound = m_before <= self.m_min
            else:
                at_bound = self.m_max is not None and m_before >= self.m_max
            if at_bound:
                change = 0
            self.exponent += change
        self.means.append(mean)
        decision = CycleDecision(
            cycle=len(self.means) - 1,
            mean=mean,
            sigma=sigma,
            conditions=conditions,
            change=change,
            m_before=m_before,
            m_after=self.m,
        )
        self.decisions.append(decision)
        return decision

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"exponent": self.exponent, "changes": self.changes, "means": list(self.means)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state. Everything is checked first: on a bad state
        a ValueError says what is wrong and the controller is left as it was.

        The checks: the three keys are present; ``changes`` is an int >= 0; ``exponent``
        an int with ``|exponent| <= changes`` (every change moves it by one) whose m is a
        number (not an overflow); ``means`` a list of real numbers (a non-finite mean is
        allowed: :meth:`observe` records those too)."""
        where = "BatchSizeController.load_state_dict"
        missing = sorted({"exponent", "changes", "means"} - set(state))
        if missing:
            raise ValueError(f"{where}: the state lacks {missing}")
        exponent, changes, means = state["exponent"], state["changes"], state["means"]
        if not is_count(changes, 0):
            raise ValueError(f"{where}: changes must be an int >= 0, got {changes!r}")
        if not (is_count(exponent, -changes) and exponent <= changes):
            raise ValueError(
                f"{where}: exponent must be an int within [-changes, changes] = "
                f"[{-changes}, {changes}] (each change moves it by one), got {exponent!r}"
            )
        try:
            self.m_at(exponent)
        except OverflowError:
            raise ValueError(
                f"{where}: exponent {exponent} overflows m = m0 * {self.growth}**exponent"
            ) from None
        if not (isinstance(means, (list, tuple)) and all(is_real(v) for v in means)):
            raise ValueError(f"{where}: means must be a list of numbers, got {means!r}")
        self.exponent = int(exponent)
        self.changes = int(changes)
        self.means = [float(v) for v in means]
        self.decisions = []


class CycleOptimizer(Protocol):
    """What :class:`DynamicBatchSize` needs from an optimizer (``ELRA`` has it)."""

    def end_cycle(self) -> None: ...

    def cycle_statistics(self) -> tuple[float, float] | None: ...


class DynamicBatchSize:
    """Wires a :class:`BatchSizeController` to an optimizer's control cycle.

    Args:
        optimizer: an ``ELRA`` (anything with ``end_cycle()`` and ``cycle_statistics()``).
        m0, m_min, m_max, gradient_decay: see :class:`BatchSizeController`.
        controller: use this controller instead of building one from the arguments above.

    ``end_cycle()`` closes the optimizer's cycle (its mean and sigma become the retrace
    reference) and feeds the very same statistics to the controller: one host read per
    cycle. :class:`GroupedBatches` calls it; call it yourself if you group batches by hand.
    """

    def __init__(
        self,
        optimizer: CycleOptimizer,
        m0: int = 1,
        *,
        m_min: int = 1,
        m_max: int | None = None,
        gradient_decay: bool = False,
        controller: BatchSizeController | None = None,
    ) -> None:
        if getattr(optimizer, "cycle_steps", None) is not None:
            raise ValueError(
                "DynamicBatchSize closes the optimizer's control cycles itself; build the "
                "optimizer with cycle_steps=None (the default)"
            )
        if controller is not None and not isinstance(controller, BatchSizeController):
            raise TypeError(
                f"DynamicBatchSize: controller must be a BatchSizeController or None, got "
                f"{controller!r} ({type(controller).__name__})"
            )
        self.optimizer = optimizer
        self.controller = controller or BatchSizeController(
            m0, m_min=m_min, m_max=m_max, gradient_decay=gradient_decay
        )

    @property
    def m(self) -> int:
        return self.controller.m

    @property
    def decay_factor(self) -> float:
        return self.controller.decay_factor

    @property
    def grad_scale(self) -> float:
        return self.controller.grad_scale

    def end_cycle(self) -> CycleDecision | None:
        """Close the control cycle; None when the optimizer has no statistics yet."""
        self.optimizer.end_cycle()
        stats = self.optimizer.cycle_statistics()
        if stats is None:
            return None
        return self.controller.observe(*stats)

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


class MicroBatchGroup(list):
    """The micro-batches of one optimizer step (a list), plus what the step needs.

    Attributes:
        scale: multiply each micro-batch loss by this before ``backward()``:
            ``decay_factor / len(group)`` (mean over micro-batches, gradient decay 3.4).
        samples: number of samples in the group.
        index: running index of the group (= optimizer step) since the wrapper was built.
        ends_cycle: with ``cycle_samples=N``, whether the control cycle closes after this
            group's step. In epoch mode (``cycle_samples=None``) the cycle closes when the
            pass ends, which the wrapper learns only after the last group: always False.
    """

    scale: float
    samples: int
    index: int
    ends_cycle: bool


def batch_length(batch: Any) -> int:
    """Samples in a batch: leading dimension of a tensor, or of the first element of a
    tuple/list/dict batch (e.g. ``(inputs, targets)``)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, dict):
        return batch_length(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return batch_length(batch[0])
    if hasattr(batch, "__len__"):
        return len(batch)
    raise TypeError(
        f"GroupedBatches: cannot tell the size of a batch of type {type(batch).__name__}; "
        "pass batch_len=callable"
    )


class GroupedBatches:
    """Groups the micro-batches of any loader into optimizer steps of ``m_t`` each.

    Args:
        loader: a DataLoader or any re-iterable of batches (one pass = one epoch).
        sizer: a :class:`DynamicBatchSize` (m_t read per group, cycles closed through it),
            a :class:`BatchSizeController` (m_t read per group; you close cycles), or a
            fixed int m >= 1. Anything else raises here, not at the first iteration.
        cycle_samples: control cycle length N in samples; None (default) = one pass over
            the loader (the paper's epoch). A cycle closes at the first step boundary at
            or after N samples.
        skip_short_last: skip the last batch of a pass when it has fewer samples than the
            pass's first batch (section 3.5). A full last batch is kept.
        leftover: "carry" (default) or "drop": what to do with the fewer than m_t
            micro-batches left at the end of a pass (see the module docstring).
        batch_len: how to count the samples of a batch (default :func:`batch_length`).

    Iterate once per epoch: ``for group in grouped: ...``.
    """

    def __init__(
        self,
        loader: Iterable[Any],
        sizer: DynamicBatchSize | BatchSizeController | int = 1,
        *,
        cycle_samples: int | None = None,
        skip_short_last: bool = True,
        leftover: str = "carry",
        batch_len: Callable[[Any], int] = batch_length,
    ) -> None:
        if isinstance(sizer, numbers.Integral):  # bools included, and refused
            if not is_count(sizer, 1):
                raise ValueError(f"GroupedBatches: a fixed m must be an int >= 1, got {sizer!r}")
        elif not isinstance(sizer, (DynamicBatchSize, BatchSizeController)):
            # Checked here: a float or a string would fail only at the first iteration.
            raise TypeError(
                "GroupedBatches: sizer must be a DynamicBatchSize, a BatchSizeController or "
                f"an int >= 1, got {sizer!r} ({type(sizer).__name__})"
            )
        if cycle_samples is not None and not is_count(cycle_samples, 1):
            raise ValueError(
                f"GroupedBatches: cycle_samples must be a positive int or None, "
                f"got {cycle_samples!r}"
            )
        if not isinstance(skip_short_last, bool):
            raise ValueError(
                f"GroupedBatches: skip_short_last must be True or False, got {skip_short_last!r}"
            )
        if leftover not in ("carry", "drop"):
            raise ValueError(
                f"GroupedBatches: leftover must be 'carry' or 'drop', got {leftover!r}"
            )
        if not callable(batch_len):
            raise TypeError(f"GroupedBatches: batch_len must be callable, got {batch_len!r}")
        self.loader = loader
        self.sizer = sizer
        self.cycle_samples = cycle_samples
        self.skip_short_last = skip_short_last
        self.leftover = leftover
        self.batch_len = batch_len
        self.groups = 0  # optimizer steps handed out
        self.samples_seen = 0
        self.samples_in_cycle = 0
        self.cycles_closed = 0
        self.skipped_batches = 0  # short last batches skipped
        self.dropped_batches = 0  # leftover micro-batches dropped (leftover="drop")
        self._carried: list[Any] = []

    # ------------------------------------------------------------------ read-outs
    @property
    def m(self) -> int:
        return int(self.sizer) if isinstance(self.sizer, numbers.Integral) else self.sizer.m

    @property
    def decay_factor(self) -> float:
        return 1.0 if isinstance(self.sizer, numbers.Integral) else self.sizer.decay_factor

    # ------------------------------------------------------------------ iteration
    def _full_batches(self) -> Iterator[Any]:
        """One pass over the loader without its short last batch (one-batch lookahead)."""
        iterator = iter(self.loader)
        try:
            previous = next(iterator)
        except StopIteration:
            return
        reference = self.batch_len(previous)
        for batch in iterator:
            yield previous
            previous = batch
        if self.skip_short_last and self.batch_len(previous) < reference:
            self.skipped_batches += 1
            return
        yield previous

    def _close_cycle(self) -> None:
        self.samples_in_cycle = 0
        self.cycles_closed += 1
        if isinstance(self.sizer, DynamicBatchSize):
            self.sizer.end_cycle()

    def __iter__(self) -> Iterator[MicroBatchGroup]:
        pending, self._carried = self._carried, []
        source = self._full_batches()
        exhausted = False
        while True:
            m = self.m  # read at the start of every group: changes apply to the next group
            while len(pending) < m and not exhausted:
                try:
                    pending.append(next(source))
                except StopIteration:
                    exhausted = True
            if len(pending) < m:
                break
            group = MicroBatchGroup(pending[:m])
            pending = pending[m:]
            group.samples = sum(self.batch_len(b) for b in group)
            group.scale = self.decay_factor / m
            group.index = self.groups
            self.groups += 1
            self.samples_seen += group.samples
            self.samples_in_cycle += group.samples
            group.ends_cycle = (
                self.cycle_samples is not None and self.samples_in_cycle >= self.cycle_samples
            )
            yield group
            # Resumed: the user's opt.step for ``group`` has run.
            if group.ends_cycle and self.cycle_samples is not None:
                self._close_cycle()
        if self.leftover == "carry":
            self._carried = pending
        else:
            self.dropped_batches += len(pending)
        if self.cycle_samples is None and self.samples_in_cycle > 0:
            self._close_cycle()
