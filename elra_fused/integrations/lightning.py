"""ELRA in PyTorch Lightning.

``configure_optimizers`` may return ELRA like any optimizer (with or without an
``lr_scheduler``: the step is ``lr * alpha``). Lightning's automatic optimization then
calls, per optimizer step (``_AutomaticOptimization.run``, precision plugin
``optimizer_step``)::

    for the first accumulate_grad_batches - 1 micro-batches:
        closure()                  # training_step; loss / accumulate_grad_batches;
                                   # on_before_backward(loss); backward
    optimizer.step(closure=closure)   # ELRA calls the closure: the last micro-batch,
                                      # then on_before_optimizer_step and clipping

The closure returns only the LAST micro-batch's loss, so without help ELRA would judge
the loss of one micro-batch against the gradient of all of them. :class:`ELRACallback`
records every micro-batch loss in ``on_before_backward`` (the loss exactly as it is
back-propagated, already divided by ``accumulate_grad_batches``), and ELRA judges their
sum. With ``precision="16-mixed"`` the precision plugin multiplies the loss by its
GradScaler's scale before that hook; the callback divides it out again (the unscaled
loss is what ELRA compares). It also closes a control cycle at each epoch end
(``on_train_epoch_end``), unless the ELRA was built with ``cycle_steps``.

Lightning is published as ``pytorch_lightning`` and as ``lightning.pytorch``; each checks
callbacks against its own ``Callback`` class. ``ELRACallback`` is built on whichever is
installed (``pytorch_lightning`` first); :func:`callback_class` gives it for the other.

Known limits: with ``precision="16-mixed"`` Lightning refuses ``gradient_clip_val`` for
an optimizer that unscales in its own step (``_step_supports_amp_scaling``, as ELRA does):
use ELRA's ``max_grad_norm`` instead. In manual optimization the callback records into
the one ELRA of the module (with several, call ``record_loss`` yourself).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

from .._torch_compat import grad_scaler_scale
from . import end_cycle, unwrap_elra

__all__ = ["ELRACallback", "callback_class"]

_PACKAGES = ("pytorch_lightning", "lightning.pytorch")


def _elras(trainer: Any) -> list[Any]:
    return [e for e in (unwrap_elra(o) for o in trainer.optimizers) if e is not None]


class _ELRACallbackMethods:
    """The callback's hooks, independent of which Lightning package's ``Callback`` base."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(_elras(trainer)) > 1:
            raise ValueError(
                "ELRACallback: the module has several ELRA optimizers, and a loss belongs "
                "to one of them; drop the callback and call opt.record_loss(loss) yourself"
            )

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        elras = _elras(trainer)
        if not elras:
            return
        loss = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss = loss / grad_scaler_scale(scaler).to(loss.device)  # no host sync
        elras[0].record_loss(loss)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        for optimizer in trainer.optimizers:
            end_cycle(optimizer)


@functools.cache
def callback_class(package: str = "pytorch_lightning") -> type:
    """``ELRACallback`` for the Lightning package ``package`` ("pytorch_lightning" or
    "lightning.pytorch"), whose ``Trainer`` only accepts its own ``Callback`` subclasses."""
    if package not in _PACKAGES:
        raise ValueError(f"callback_class: package must be one of {_PACKAGES}, got {package!r}")
    base = importlib.import_module(package).Callback
    return type(
        "ELRACallback",
        (_ELRACallbackMethods, base),
        {
            "__module__": __name__,
            "__doc__": "Records every micro-batch loss for ELRA and closes a control "
            "cycle at each epoch end (see :mod:`elra_fused.integrations.lightning`).",
        },
    )


def _default_package() -> str:
    for package in _PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            continue
        return package
    raise ImportError(
        "elra_fused.integrations.lightning needs pytorch-lightning (or lightning) installed"
    )


ELRACallback: type = callback_class(_default_package())
