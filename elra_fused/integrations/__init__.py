"""ELRA in the training frameworks: Hugging Face ``Trainer``, Lightning, accelerate.

ELRA decides accept-or-retrace from the LOSS of the step, which no framework hands to
``optimizer.step()`` (torch's step takes at most a closure). The optimizer therefore
collects it: ``ELRA.record_loss(loss)`` adds one micro-batch loss (scaled the way the
framework scales it for gradient accumulation), and ``step()`` judges their sum, the loss
of the accumulated gradient. What each framework needs on top is where to call it:

* :mod:`elra_fused.integrations.transformers`: :class:`ELRATrainerMixin` /
  ``ELRATrainer`` record the loss ``Trainer.training_step`` back-propagates and close a
  control cycle at every epoch end.
* :mod:`elra_fused.integrations.lightning`: ``ELRACallback`` records the loss in
  ``on_before_backward`` and closes a cycle in ``on_train_epoch_end``.
* :mod:`elra_fused.integrations.accelerate`: :func:`~elra_fused.integrations.accelerate.backward`
  back-propagates through the ``Accelerator`` and records the loss it scaled.

Each submodule imports its framework when it is imported itself, so ``import elra_fused``
(and this package) never needs one. The helpers here are framework-free: frameworks wrap
the optimizer (accelerate's ``AcceleratedOptimizer.optimizer``, Lightning's
``LightningOptimizer._optimizer``), and :func:`unwrap_elra` finds the ELRA inside.
"""

from __future__ import annotations

from typing import Any

import torch

from ..optimizer import ELRA

__all__ = ["unwrap_elra", "record_loss", "end_cycle"]

# Attributes under which the frameworks keep the optimizer they wrap: accelerate's
# AcceleratedOptimizer and SageMaker's DistributedOptimizer use ``optimizer``,
# Lightning's LightningOptimizer ``_optimizer``.
_WRAPPED_ATTRIBUTES = ("optimizer", "_optimizer")
_MAX_WRAPPERS = 8  # a wrapper that wraps itself must not loop forever


def unwrap_elra(optimizer: Any) -> ELRA | None:
    """The :class:`~elra_fused.ELRA` inside ``optimizer`` (itself, or reached through the
    frameworks' wrappers), or None when there is none.

    None rather than an error, so a framework helper given another optimizer (a user
    trying Adam in the same script) behaves as the plain framework does.
    """
    for _ in range(_MAX_WRAPPERS):
        if isinstance(optimizer, ELRA):
            return optimizer
        inner = None
        for name in _WRAPPED_ATTRIBUTES:
            inner = getattr(optimizer, name, None)
            if inner is not None and inner is not optimizer:
                break
            inner = None
        if inner is None:
            return None
        optimizer = inner
    return None


def record_loss(optimizer: Any, loss: torch.Tensor | float) -> bool:
    """Record one micro-batch loss with the ELRA in ``optimizer`` (see
    :meth:`elra_fused.ELRA.record_loss`: a tensor is detached there, never read back).
    Pass the loss as it was back-propagated, not yet detached: ELRA recognises a loss
    still multiplied by a GradScaler's scale from its autograd node and divides it back
    (:func:`elra_fused.losses.without_grad_scale`).

    Returns whether an ELRA was found (False: ``optimizer`` is some other optimizer and
    nothing was recorded).
    """
    elra = unwrap_elra(optimizer)
    if elra is None:
        return False
    elra.record_loss(loss)
    return True


def end_cycle(optimizer: Any, *, respect_cycle_steps: bool = True) -> bool:
    """Close the control cycle of the ELRA in ``optimizer`` (paper: once per epoch).

    With ``respect_cycle_steps`` an ELRA built with ``cycle_steps=N`` is left alone: it
    closes its cycles itself every N steps, and an extra close at the epoch end would
    cut one short. Returns whether a cycle was closed.
    """
    elra = unwrap_elra(optimizer)
    if elra is None or (respect_cycle_steps and elra.cycle_steps is not None):
        return False
    elra.end_cycle()
    return True
