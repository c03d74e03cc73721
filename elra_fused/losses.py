"""The loss a step judges: passed to ``step``, returned by a closure, or recorded.

ELRA decides accept or retrace from f_t, the loss at the current parameters, so every
``step`` needs one. Frameworks call ``optimizer.step()`` with no argument (HF Trainer,
accelerate, ``GradScaler.step``) or with a closure that runs only the last micro-batch
(Lightning with ``accumulate_grad_batches``). :class:`LossRecord` collects the loss of
each micro-batch as it is computed (``opt.record_loss(loss)``: no host read, the tensor
stays on its device) and the step judges their sum -- with the usual 1/N scaling of
accumulated micro-batch losses, the loss of the accumulated gradient.

Which loss a step judges (:func:`judged_loss`):

1. an explicit loss (``opt.step(loss)`` or ``opt.step(loss=...)``) always wins;
2. else, if losses were recorded since the last step (before or during the closure),
   their sum: a closure returns only its own micro-batch's loss;
3. else the loss the closure returned;
4. else, when a closure returned None (it skipped the batch, as Lightning's
   ``training_step`` may), no step at all -- except Lightning's placeholder closure of
   manual optimization, which always returns None: that is the missing-loss error;
5. else the clear error of :func:`elra_fused.checks.check_loss`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from . import checks

LossValue = torch.Tensor | float | int
#: What ``ELRA.step`` takes as its closure or loss argument.
LossArg = LossValue | Callable[[], Any] | None
#: A :class:`LossRecord`'s content: (total, count, factors).
RecordSnapshot = tuple[torch.Tensor | float | None, int, list[torch.Tensor]]


def loss_factor(loss: LossValue) -> torch.Tensor | None:
    """The tensor ``loss`` was last multiplied by, when autograd still holds it (a
    ``MulBackward0`` node before backward frees it): how a loss scaled by
    ``GradScaler.scale`` is recognised."""
    grad_fn = getattr(loss, "grad_fn", None)
    if grad_fn is None or type(grad_fn).__name__ != "MulBackward0":
        return None
    try:
        other = grad_fn._saved_other
    except (AttributeError, RuntimeError):  # freed by backward, or not saved
        return None
    return other if isinstance(other, torch.Tensor) else None


class LossRecord:
    """Micro-batch losses recorded since the last step, summed on their device."""

    __slots__ = ("total", "count", "factors")

    def __init__(self) -> None:
        self.total: torch.Tensor | float | None = None
        self.count = 0
        #: What each recorded loss was multiplied by (see :func:`loss_factor`).
        self.factors: list[torch.Tensor] = []

    def add(self, loss: LossValue) -> None:
        """Add one micro-batch loss (checked first: a bad one records nothing)."""
        checks.check_loss(loss, caller="ELRA.record_loss")
        factor = loss_factor(loss)
        if isinstance(loss, torch.Tensor):
            value: torch.Tensor | float = loss.detach().reshape(()).to(torch.float64)
            if isinstance(self.total, torch.Tensor) and value.device != self.total.device:
                value = value.to(self.total.device, non_blocking=True)
        else:
            value = float(loss)
        self.total = value if self.total is None else self.total + value
        self.count += 1
        if factor is not None:
            self.factors.append(factor)

    def clear(self) -> None:
        self.total = None
        self.count = 0
        self.factors = []

    def snapshot(self) -> RecordSnapshot:
        """What is recorded now, for :meth:`restore` (a step that fails keeps the record
        as it was before the call: a closure's own records would otherwise count twice
        when the step is retried)."""
        return self.total, self.count, list(self.factors)

    def restore(self, snapshot: RecordSnapshot) -> None:
        self.total, self.count, self.factors = snapshot[0], snapshot[1], list(snapshot[2])


def without_grad_scale(
    loss: LossValue, factors: list[torch.Tensor], grad_scale: torch.Tensor | None
) -> LossValue:
    """``loss`` divided back by the GradScaler's scale when it is ``scaler.scale(loss)``
    (an easy mistake: ``scaler.step(opt, scaler.scale(loss))``). Scaled by 2^16 it would
    read as a spike every step (retraces, alpha at its floor). The loss qualifies when it
    was multiplied by a tensor equal to the scale -- decided on the device, no host
    read -- and, for recorded losses, when every one of them was."""
    if grad_scale is None or not factors or not isinstance(loss, torch.Tensor):
        return loss
    scale = grad_scale.to(loss.device, torch.float64).reshape(())
    scaled = torch.ones((), dtype=torch.bool, device=loss.device)
    for factor in factors:
        scaled = scaled & (factor.to(loss.device, torch.float64).reshape(()) == scale)
    return torch.where(scaled, loss / scale, loss)


def judged_loss(
    closure: Callable[[], Any] | LossValue | None,
    loss: LossValue | None,
    record: LossRecord,
) -> tuple[LossValue | None, Any, list[torch.Tensor]]:
    """(the loss the step judges, what ``step`` returns, the factors the judged loss
    was multiplied by) -- the rule of the module docstring. ``closure`` may also be the
    loss itself (``opt.step(loss)``, ELRA's original form). Calls the closure, with
    gradients enabled, when there is one."""
    if closure is not None and not callable(closure):
        if loss is not None:
            raise TypeError("ELRA.step: got a loss both as the first argument and as loss=")
        closure, loss = None, closure
    returned: Any = loss
    if closure is not None:
        with torch.enable_grad():
            returned = closure()
    if loss is not None:
        factor = loss_factor(loss)
        return loss, returned, [] if factor is None else [factor]
    if record.total is not None:
        every = record.count == len(record.factors)
        return record.total, returned, list(record.factors) if every else []
    if returned is not None:
        factor = loss_factor(returned)
        return returned, returned, [] if factor is None else [factor]
    if _is_lightning_placeholder(closure):
        raise TypeError(
            "ELRA.step: Lightning's manual optimization calls step() with a placeholder "
            "closure that returns no loss, and no loss was recorded, so ELRA has no f_t to "
            "judge the step by. Call opt.step(loss=loss) after self.manual_backward(loss), "
            "or add elra_fused.integrations.lightning.ELRACallback() to the Trainer's "
            "callbacks (it records each training_step's loss)."
        )
    return None, returned, []


def _is_lightning_placeholder(closure: Any) -> bool:
    """Whether ``closure`` is Lightning's ``do_nothing_closure``, which
    ``LightningOptimizer.step()`` passes in manual optimization: it returns None because
    it runs nothing, not because a ``training_step`` skipped its batch (automatic
    optimization's closure, whose None means no step). The precision plugin hands it on
    wrapped in a ``functools.partial`` (``_wrap_closure``, with the closure among its
    arguments), so partials are looked into."""
    if isinstance(closure, functools.partial):
        return any(map(_is_lightning_placeholder, (closure.func, *closure.args)))
    return getattr(closure, "__name__", None) == "do_nothing_closure" and getattr(
        closure, "__module__", ""
    ).startswith(("lightning", "pytorch_lightning"))
