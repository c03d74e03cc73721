"""Mixed precision with ``torch.amp.GradScaler``, without an unscaling pass or a host sync.

ELRA sets ``_step_supports_amp_scaling``: ``scaler.step(opt)`` then does not unscale the
gradients (one pass over every gradient) but hands the optimizer ``grad_scale`` (s_t, the
factor the gradients carry; None once ``scaler.unscale_(opt)`` ran) and ``found_inf``.
The scales are powers of two, so folding them into the step is exact:

* dots: <G_t, G_t> / s_t^2 and <G_{t-1}, G_t> / (s_{t-1} s_t), where s_{t-1} is the scale
  of the gradient kept as G_{t-1} (a point store recovers G_{t-1} unscaled: / s_t only);
* update: the step coefficient alpha / s_t, the retrace coefficient back / s_{t-1};
* ``found_inf`` makes ||G_t||^2 NaN: the law retraces, as for any non-finite gradient
  (GradScaler then lowers its scale as usual).

1 / s_{t-1} lives on the device (:class:`AmpScales`), follows accepted steps and travels
in the state dict. Without a GradScaler none of this runs (the step is bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .control import Decision


@dataclass(slots=True)
class GradScales:
    """One step's scale factors (0-d float64 tensors on the state's device, or floats
    with a host law): ``inv`` = 1 / s_t, ``inv_prev`` = 1 / s_{t-1}, ``found_inf``."""

    inv: Any
    inv_prev: Any
    found_inf: Any


class AmpScales:
    """1 / s_{t-1}, the inverse scale of the gradient kept as G_{t-1}."""

    def __init__(self) -> None:
        self.inv_prev: torch.Tensor | None = None  # None: the kept gradient is unscaled

    def for_step(
        self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, device: torch.device
    ) -> GradScales | None:
        """This step's :class:`GradScales` (None without a GradScaler: nothing to fold)."""
        if grad_scale is None and found_inf is None and self.inv_prev is None:
            return None
        one = torch.ones((), dtype=torch.float64, device=device)
        inv = one if grad_scale is None else 1.0 / grad_scale.to(device, torch.float64)
        inv_prev = one if self.inv_prev is None else self.inv_prev
        found = torch.zeros_like(one) if found_inf is None else found_inf.to(device, torch.float64)
        return GradScales(inv.reshape(()), inv_prev, found.reshape(()))

    def after_step(self, scales: GradScales | None, decision: Decision) -> None:
        """An accepted step keeps G_t (scaled by s_t) as the next G_{t-1}."""
        if scales is None:
            return
        accepted = torch.as_tensor(decision.accept, dtype=torch.float64).to(scales.inv.device)
        self.inv_prev = torch.where(accepted > 0, scales.inv, scales.inv_prev)

    def state_dict(self) -> torch.Tensor | None:
        return None if self.inv_prev is None else self.inv_prev.detach().clone()

    def load_state_dict(self, saved: torch.Tensor | None, device: torch.device) -> None:
        self.inv_prev = None if saved is None else saved.to(device, torch.float64).reshape(())
