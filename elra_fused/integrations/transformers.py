"""ELRA in Hugging Face ``transformers.Trainer``.

The optimizer plugs in the ordinary ways: ``Trainer(..., optimizers=(ELRA(model.parameters()),
None))`` (Trainer then builds its default schedule, a ``LambdaLR`` on the groups' ``lr``:
the step is ``lr * alpha``), or ``Trainer(..., optimizer_cls_and_kwargs=(ELRA, {...}))``
(Trainer builds the groups, with ``weight_decay`` = ``args.weight_decay`` and 0.0 for
biases and norms). What Trainer lacks is the loss: ``optimizer.step()`` gets no argument,
and callbacks (``TrainerCallback``) never see the loss. So the trainer itself records it.

How Trainer (5.x) calls the optimizer, per optimizer step (``Trainer._run_epoch``)::

    for each of gradient_accumulation_steps micro-batches:
        loss = training_step(model, inputs, num_items_in_batch)
            # compute_loss; divided by the accumulation steps unless the model already
            # normalised it by num_items_in_batch (the tokens of the whole accumulated
            # batch); accelerator.backward(loss); returns loss.detach()
    accelerator.clip_grad_norm_(params, max_grad_norm)   # max_grad_norm=1.0 by default
    optimizer.step()            # accelerate's AcceleratedOptimizer -> ELRA.step()
    lr_scheduler.step(); model.zero_grad()
    ... on_epoch_end callbacks at the end of each epoch

``training_step`` returns exactly the tensor it back-propagated (detached), so the sum of
what it returns over the micro-batches of one step is the loss of the accumulated
gradient, whichever of the two scalings Trainer used: that is what
:class:`ELRATrainerMixin` records.

Why a mixin and not a callback: callbacks do not receive the loss. Why a mixin and not
only a subclass: projects already subclass ``Trainer`` (``Seq2SeqTrainer``, trl's
``SFTTrainer``, their own); ``class MyTrainer(ELRATrainerMixin, SFTTrainer)`` composes,
a fixed subclass would not. :class:`ELRATrainer` is the mixin on plain ``Trainer``.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from . import end_cycle, record_loss

__all__ = ["ELRATrainerMixin", "ELRATrainer", "ELRACycleCallback"]


class ELRACycleCallback(transformers.TrainerCallback):
    """Closes ELRA's control cycle at each epoch end (paper: the cycle is an epoch);
    ELRAs built with ``cycle_steps`` close their own cycles and are left alone."""

    def on_epoch_end(
        self,
        args: transformers.TrainingArguments,
        state: transformers.TrainerState,
        control: transformers.TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if optimizer is not None:
            end_cycle(optimizer)


class ELRATrainerMixin:
    """Put before a ``transformers.Trainer`` class in the bases: records the loss of every
    micro-batch with ELRA (``record_loss``) and closes a control cycle at each epoch end.

    With another optimizer it changes nothing. Use ``ELRATrainer`` for plain ``Trainer``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(ELRACycleCallback)  # type: ignore[attr-defined]

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Trainer's training step, then the loss it back-propagated is recorded (a 0-d
        tensor, detached, not read back: no host sync)."""
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        record_loss(self.optimizer, loss)  # type: ignore[attr-defined]
        return loss


class ELRATrainer(ELRATrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that feeds ELRA its loss (see :class:`ELRATrainerMixin`)."""
