"""ELRA with Hugging Face ``accelerate``.

``model, opt = accelerator.prepare(model, ELRA(model.parameters()))`` wraps ELRA in an
``AcceleratedOptimizer``, which (accelerate 1.x) does, per call::

    accelerator.backward(loss)   # loss / gradient_accumulation_steps, then backward
                                 # (through the GradScaler with mixed_precision="fp16")
    opt.step()                   # calls ELRA.step() only when accelerator.sync_gradients,
                                 # i.e. on the last micro-batch of an accumulate() window;
                                 # through scaler.step(ELRA) with fp16
    opt.zero_grad()              # likewise only on sync steps

So ELRA needs, per micro-batch, the loss that was back-propagated: the user's loss
divided by ``gradient_accumulation_steps``. :func:`backward` does both in one call.
The skipped ``opt.step()`` calls during accumulation do not reach ELRA, so the recorded
losses stay and the sync step judges their sum; that step clears them, so nothing is
counted twice. The ELRA is ``opt.optimizer``; :func:`elra_fused.integrations.end_cycle`
reaches it through the wrapper (call it at each epoch end).
"""

from __future__ import annotations

from typing import Any

import accelerate
import torch

from .. import checks
from . import end_cycle, record_loss, unwrap_elra

__all__ = ["backward", "record_loss", "end_cycle", "unwrap_elra"]


def backward(
    accelerator: accelerate.Accelerator, loss: torch.Tensor, optimizer: Any, **kwargs: Any
) -> None:
    """``accelerator.backward(loss, **kwargs)``, and record for the ELRA in ``optimizer``
    the loss it back-propagated: ``loss / accelerator.gradient_accumulation_steps``
    (unscaled: ELRA compares losses, and gets the GradScaler's scale in its step).

    Call it on every micro-batch, inside or outside ``accelerator.accumulate(model)``.
    DeepSpeed divides by its own accumulation steps inside ``backward``, which accelerate
    sets to the same number, so the recorded loss is right there too.
    """
    if unwrap_elra(optimizer) is not None:  # a loss ELRA cannot record: before backward
        checks.check_loss(loss, caller="elra_fused.integrations.accelerate.backward")
    accelerator.backward(loss, **kwargs)
    record_loss(optimizer, loss.detach() / accelerator.gradient_accumulation_steps)
