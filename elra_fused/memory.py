"""Where the optimizer keeps what it needs from the previous step (paper section 3.6).

ELRA needs <G_{t-1}, G_t> every step and G_{t-1} again on a retrace. Three ways to keep
that, one extra vector each at most (Adam keeps two):

* ``"standard"``: G_{t-1} itself, on the parameters' device (:class:`GradPrevStore`),
  optionally in a compact dtype (``state_dtype=torch.bfloat16``: 2 bytes per parameter).
* ``"recover"``: x_{t-1} instead (:class:`PointPrevStore`). Since
  x_t = wd x_{t-1} - alpha_{t-1} G_{t-1}, the previous gradient is recovered per element,
  G_{t-1,i} = (wd x_{t-1,i} - x_{t,i}) / alpha_{t-1}, inside the dots kernel -- never as
  the difference of two large dot products, which cancels catastrophically in float32.
  A retrace moves x back along that recovered direction. After a retrace x_{t-1} stays
  and alpha_{t-1} becomes the retrace's alpha, so the relation keeps holding.
* ``"offload"``: like recover, with x_{t-1} in (pinned) host memory, streamed through
  two device chunks (:class:`elra_fused.offload.OffloadedPrev`).

Every store has the same two methods, called once per flat buffer (or parameter) per
step: ``dots(kernels, x, grad, coeffs)`` and ``update_(kernels, x, grad, coeffs)``.
"""

from __future__ import annotations

import torch

from .ops import KernelSet

MEMORY_MODES = ("standard", "recover", "offload")
#: Modes that keep the previous point x_{t-1} rather than the previous gradient.
POINT_MODES = ("recover", "offload")
#: Per-parameter state key of each kind of store (what state_dict() holds).
GRAD_PREV_KEY = "grad_prev"
X_PREV_KEY = "x_prev"


class GradPrevStore:
    """G_{t-1} kept as a tensor on the parameters' device (``memory="standard"``)."""

    state_key = GRAD_PREV_KEY

    def __init__(self, grad_prev: torch.Tensor) -> None:
        self.tensor = grad_prev

    def dots(self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs) -> torch.Tensor:
        return kernels.dots(grad, self.tensor)

    def update_(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        kernels.update_(x, grad, self.tensor, coeffs)

    def synchronize(self) -> None:
        """Nothing in flight: the tensor is always current."""


class PointPrevStore:
    """x_{t-1} kept on the parameters' device (``memory="recover"``)."""

    state_key = X_PREV_KEY

    def __init__(self, x_prev: torch.Tensor) -> None:
        self.tensor = x_prev

    def dots(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        return kernels.dots_recover(self.tensor, x, grad, coeffs)

    def update_(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        kernels.update_recover_(x, grad, self.tensor, coeffs)

    def synchronize(self) -> None:
        """Nothing in flight: the tensor is always current."""
