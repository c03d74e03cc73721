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

``reuse_grad_buffer=True`` (standard mode, :class:`SwapGradPrevStore`) makes G_t become
G_{t-1} by swapping the roles of the gradient and G_{t-1} buffers instead of copying:
the accept pass then reads x and G and writes only x (12 instead of 16 bytes per fp32
parameter). The price: after ``step()`` the parameters' ``.grad`` views point at the
recycled buffer, whose values are stale until the next ``zero_grad()``.
"""

from __future__ import annotations

from typing import Any

import torch

from .flat import FlatBuffer
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

    def dots(
        self,
        kernels: KernelSet,
        x: torch.Tensor,
        grad: torch.Tensor,
        coeffs: torch.Tensor | None,
    ) -> torch.Tensor:
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


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class SwapGradPrevStore(GradPrevStore):
    """G_{t-1} that trades places with the gradient buffer after each step.

    The ``update_swap_`` kernel leaves G_t where autograd wrote it (accept) or copies
    G_{t-1} over it (retrace); then the two buffers swap roles: the old gradient buffer
    holds G_{t-1}, the old G_{t-1} buffer receives the next gradients. ``.grad`` and the
    per-parameter state entries are re-pointed at precomputed views (two assignments per
    parameter, no allocation). While a CUDA graph is captured the copying ``update_`` is
    used instead: a replay cannot re-point Python attributes.
    """

    def __init__(
        self, buffer: FlatBuffer, grad_prev: torch.Tensor, param_states: list[dict[str, Any]]
    ) -> None:
        super().__init__(grad_prev)
        self.buffer = buffer
        self.param_states = param_states
        count = len(buffer.params)
        self._views = {
            flat.data_ptr(): [buffer.view(flat, i) for i in range(count)]
            for flat in (buffer.grad, grad_prev)
        }

    def update_(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        if _capturing(x.device):
            kernels.update_(x, grad, self.tensor, coeffs)
            return
        kernels.update_swap_(x, grad, self.tensor, coeffs)
        buffer = self.buffer
        buffer.grad, self.tensor = self.tensor, buffer.grad
        grad_views = self._views[buffer.grad.data_ptr()]
        prev_views = self._views[self.tensor.data_ptr()]
        for param, grad_view, prev_view, state in zip(
            buffer.params, grad_views, prev_views, self.param_states, strict=True
        ):
            param.grad = grad_view
            state[GRAD_PREV_KEY] = prev_view


class GradPrevList:
    """G_{t-1} of each parameter in the per-parameter layout (``flat=False``).

    One instance per (device, wd) segment of a step; ``x`` and ``grad`` are lists of the
    parameters' own tensors (autograd's gradients: nothing is zero-filled or copied into
    a buffer). Two ways to keep G_{t-1}:

    * by reference (``keep_reference=True``, G_{t-1} has the parameters' dtype): after an
      accept the gradient tensor G_t itself becomes G_{t-1} (``update_swap_list_``: the
      pass reads x and G and writes only x); a retrace copies G_{t-1} into it first, so
      the new reference again holds G_{t-1}. The state entries are re-pointed and each
      tensor's version counter is recorded in ``versions`` (the optimizer's, keyed by
      parameter): an in-place change of that tensor before the next step
      (``zero_grad(set_to_none=False)`` elsewhere, gradients accumulated across steps)
      is detected instead of silently corrupting G_{t-1}.
      While a CUDA graph is captured the copying pass is used (a replay cannot re-point
      Python references).
    * by copy (a compact ``state_dtype``, or gradients that are views into another
      buffer, e.g. DDP's ``gradient_as_bucket_view=True``): ``update_list_`` writes G_t
      into the state (whose versions are recorded the same way).
    """

    state_key = GRAD_PREV_KEY

    def __init__(
        self,
        prevs: list[torch.Tensor],
        param_states: list[dict[str, Any]],
        keep_reference: bool,
        versions: dict[torch.Tensor, int],
    ) -> None:
        self.prevs = prevs
        self.param_states = param_states
        self.keep_reference = keep_reference
        self.versions = versions
        self.retired: list[torch.Tensor] = []

    def dots(
        self,
        kernels: KernelSet,
        x: list[torch.Tensor],
        grad: list[torch.Tensor],
        coeffs: torch.Tensor | None,
    ) -> torch.Tensor:
        return kernels.dots_list(grad, self.prevs)

    def update_(
        self,
        kernels: KernelSet,
        x: list[torch.Tensor],
        grad: list[torch.Tensor],
        coeffs: torch.Tensor,
    ) -> None:
        versions = self.versions
        if not self.keep_reference or _capturing(x[0].device):
            kernels.update_list_(x, grad, self.prevs, coeffs)
            for param, grad_prev in zip(x, self.prevs, strict=True):
                versions[param] = grad_prev._version
            return
        kernels.update_swap_list_(x, grad, self.prevs, coeffs)
        for param, state, grad_now in zip(x, self.param_states, grad, strict=True):
            state[GRAD_PREV_KEY] = grad_now
            versions[param] = grad_now._version
        # The replaced G_{t-1} tensors stay alive until the optimizer lets them go (in
        # zero_grad, where torch's optimizers free gradients): releasing large tensors
        # costs time (the allocator returns the pages), which belongs to zero_grad.
        self.retired, self.prevs = self.prevs, list(grad)

    def synchronize(self) -> None:
        """Nothing in flight: the tensors are always current."""
