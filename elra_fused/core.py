"""The functional core: one ELRA step over segments, with no optimizer object.

Like torch's ``adam()`` (and torchao's ``single_param_adam``), :func:`elra_step` is the
whole per-step algorithm as one function of its inputs:

1. ``dots`` over every segment: the partial [<G_t, G_t>, <G_{t-1}, G_t>] of each
   (fp64, in segment order);
2. the control law (:class:`elra_fused.control_runner.ControlRunner`) on f_t and the summed
   partials: accept (eq. 4) or retrace (section 3.2), committing the new control state;
3. ``update`` over every segment: x <- wd x - alpha_t G_t (accept) or
   x <- x + (alpha_{t-1} - alpha_t) G_{t-1} (retrace), with G_{t-1} rolled forward.

Steps 1-2 and the update coefficients are :func:`plan_step`, which writes nothing but the
law's state; step 3 is :class:`StepUpdates`, the first write. The optimizer restores the
law's state when a step fails before that, and defers a Ctrl-C from there to the step's
end (:func:`elra_fused.interrupts.uninterrupted`), so a step is taken whole or not at all
for every failure but a kernel failing after another has written.

A segment is one flat buffer, or one tensor list of the per-parameter layout
(:mod:`elra_fused.layouts` gathers them); its store (:mod:`elra_fused.memory`) builds the
kernel coefficients of its memory mode. None of it reads a device value back to the host
unless the law runs there (``ControlRunner.host``). The float64 oracle of the tests is
this same function on the ``reference`` kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .amp import GradScales
from .control import Decision
from .control_runner import ControlRunner
from .memory import PrevStore
from .ops import KernelSet


@dataclass(slots=True)
class Segment:
    """What one pass of each kernel works on.

    Attributes:
        x: the parameters: one flat buffer, or a list of the parameters' tensors.
        grad: G_t in the same form.
        store: what is kept from the previous step, and its coefficients.
        wd: the multiplicative weight decay of the segment's param group.
        device: where x lives (the coefficients go there).
        weight: the weight of its partial sums, 1 / (ranks holding each element): below 1
            for replicated shards (:mod:`elra_fused.sharding`).
    """

    x: torch.Tensor | list[torch.Tensor]
    grad: torch.Tensor | list[torch.Tensor]
    store: PrevStore
    wd: float
    device: torch.device
    weight: float = 1.0


#: A param group list and an optimizer's per-parameter state, as the layouts take them.
ParamGroups = list[dict[str, Any]]
OptimizerState = dict[torch.Tensor, dict[str, Any]]


class StepWork:
    """What one step works on: the segments and the parameters that had no gradient
    (``skipped``: what the layout's ``finish`` needs to fix them up)."""

    __slots__ = ("segments", "skipped")

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.skipped: list[tuple[torch.Tensor, torch.Tensor]] = []


def decision_tensors(decision: Decision) -> Decision:
    """The decision as 0-d float64 tensors (a host law gives floats)."""
    return Decision(*(torch.as_tensor(v, dtype=torch.float64) for v in decision))


def elra_step(
    segments: Sequence[Segment],
    loss: float | torch.Tensor,
    law: ControlRunner,
    kernels: KernelSet,
    lr: float | torch.Tensor = 1.0,
    scales: GradScales | None = None,
) -> Decision:
    """One ELRA step over ``segments``; returns the law's decision (floats with a host law,
    0-d device tensors otherwise): :func:`plan_step`, then its :class:`StepUpdates`.

    ``loss`` is f_t as :meth:`ControlRunner.loss_value` gives it; ``lr`` scales the step
    taken (lr * alpha); ``scales`` fold a GradScaler's scale into the dots and the
    update (:mod:`elra_fused.amp`).
    """
    decision, updates = plan_step(segments, loss, law, kernels, lr, scales)
    updates.apply(kernels)
    return decision


def plan_step(
    segments: Sequence[Segment],
    loss: float | torch.Tensor,
    law: ControlRunner,
    kernels: KernelSet,
    lr: float | torch.Tensor = 1.0,
    scales: GradScales | None = None,
) -> tuple[Decision, StepUpdates]:
    """Everything of a step before its first write: the ``dots`` passes, the law (which
    commits its new state), and every segment's update coefficients, built once per
    (memory kind, wd, device) and shared by the segments that match. Nothing of the
    parameters or the stores has changed when it returns (or raises), so a caller that
    restores the law's state has undone it all."""
    alpha_prev = law.alpha_prev() if any(seg.store.needs_alpha_prev for seg in segments) else None
    dots_coeffs: dict[tuple[str, float, torch.device], Any] = {}
    partials = []
    for seg in segments:
        key = (seg.store.coeff_kind, seg.wd, seg.device)
        if key not in dots_coeffs:
            dots_coeffs[key] = seg.store.dots_coeffs(seg.wd, alpha_prev, seg.device)
        partial = seg.store.dots(kernels, seg.x, seg.grad, dots_coeffs[key])
        partial = seg.store.unscale(partial, scales)
        partials.append(partial if seg.weight == 1.0 else partial * seg.weight)

    decision = law.step(loss, partials, lr, None if scales is None else scales.found_inf)

    update_coeffs: dict[tuple[str, float, torch.device], torch.Tensor] = {}
    passes = []
    for seg in segments:
        key = (seg.store.coeff_kind, seg.wd, seg.device)
        if key not in update_coeffs:
            update_coeffs[key] = seg.store.update_coeffs(
                decision, seg.wd, alpha_prev, seg.device, scales
            )
        passes.append((seg, update_coeffs[key]))
    return decision, StepUpdates(passes)


class StepUpdates:
    """The ``update`` passes of one step, one per segment, with their coefficients built
    (:func:`plan_step`): running them allocates nothing in Python. Each kernel checks its
    tensors before it writes, so while :attr:`applied` is 0 nothing has been written."""

    __slots__ = ("applied", "passes")

    def __init__(self, passes: list[tuple[Segment, torch.Tensor]]) -> None:
        self.passes = passes
        #: Passes that have run (a failure in the next one leaves the earlier ones done).
        self.applied = 0

    def apply(self, kernels: KernelSet) -> None:
        """Run the passes not run yet, in segment order."""
        for seg, coeffs in self.passes[self.applied :]:
            seg.store.update_(kernels, seg.x, seg.grad, coeffs)
            self.applied += 1
