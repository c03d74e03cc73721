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
* ``"offload"``: like recover, with x_{t-1} in (pinned) host memory, streamed in chunks
  (:class:`elra_fused.offload.OffloadedPrev`).

Every store implements :class:`PrevStore`: it builds its own kernel coefficients from the
step's values (a point store divides by alpha_{t-1}), so the functional core
(:mod:`elra_fused.core`) runs every mode the same way.

``reuse_grad_buffer=True`` (standard mode, :class:`SwapGradPrevStore`) makes G_t become
G_{t-1} by swapping the roles of the gradient and G_{t-1} buffers instead of copying:
the accept pass then reads x and G and writes only x (12 instead of 16 bytes per fp32
parameter). The price: after ``step()`` the parameters' ``.grad`` views point at the
recycled buffer, whose values are stale until the next ``zero_grad()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ._torch_compat import local_shard
from .amp import GradScales
from .control import Decision
from .flat import FlatBuffer
from .ops import KernelSet

__all__ = [
    "GRAD_PREV_KEY",
    "POINT_MODES",
    "X_PREV_KEY",
    "GradPrevList",
    "GradPrevStore",
    "PointPrevStore",
    "PrevStore",
    "SwapGradPrevStore",
    "coefficient_tensor",
]

#: Modes that keep the previous point x_{t-1} rather than the previous gradient.
POINT_MODES = ("recover", "offload")
#: Per-parameter state key of each kind of store (what state_dict() holds).
GRAD_PREV_KEY = "grad_prev"
X_PREV_KEY = "x_prev"

Scalar = float | torch.Tensor


class PrevStore(Protocol):
    """What the functional core needs of a previous-step store.

    ``x`` and ``grad`` are one flat buffer each, or (per-parameter layout) lists of the
    parameters' own tensors. ``dots`` gives the fp64 partials [<G_t,G_t>, <G_{t-1},G_t>],
    and a third entry where <G_{t-1},G_t> is only known within an error bound (point
    stores). Coefficient tensors are shared by every store of the same
    ``coeff_kind``, ``wd`` and device in one step (the core caches them).
    """

    #: Key of the per-parameter state entry the store keeps (what state_dict() holds).
    state_key: str
    #: Stores of one kind build the same coefficients from the same (wd, device).
    coeff_kind: str
    #: Whether the coefficients need alpha_{t-1} (read before the control law runs).
    needs_alpha_prev: bool

    def dots_coeffs(
        self, wd: float, alpha_prev: Scalar | None, device: torch.device
    ) -> torch.Tensor | None: ...

    def update_coeffs(
        self,
        decision: Decision,
        wd: float,
        alpha_prev: Scalar | None,
        device: torch.device,
        scales: GradScales | None = None,
    ) -> torch.Tensor: ...

    def unscale(self, partial: torch.Tensor, scales: GradScales | None) -> torch.Tensor: ...

    def dots(
        self, kernels: KernelSet, x: Any, grad: Any, coeffs: torch.Tensor | None
    ) -> torch.Tensor: ...

    def update_(self, kernels: KernelSet, x: Any, grad: Any, coeffs: torch.Tensor) -> None: ...

    def synchronize(self) -> None: ...


def coefficient_tensor(values: Sequence[Scalar], device: torch.device) -> torch.Tensor:
    """``values`` as one float64 coefficient vector on ``device``, without a host read.

    Floats (the host-side control law) become one small host tensor, copied once to a
    non-CPU device; 0-d device tensors (the device law) are stacked where they are.
    """
    anchor = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if anchor is None:
        host = torch.tensor(values, dtype=torch.float64)
        return host if device.type == "cpu" else host.to(device, non_blocking=True)
    stacked = torch.stack(
        [v if isinstance(v, torch.Tensor) else torch.full_like(anchor, v) for v in values]
    )
    return stacked.to(device, non_blocking=True)


class GradCoefficients:
    """Coefficients of the stores that keep G_{t-1}: the update pass takes
    ``[accept, decay, step, back]`` with back = alpha_{t-1} - alpha_t along G_{t-1}."""

    __slots__ = ()
    state_key = GRAD_PREV_KEY
    coeff_kind = "grad"
    needs_alpha_prev = False

    def dots_coeffs(
        self, wd: float, alpha_prev: Scalar | None, device: torch.device
    ) -> torch.Tensor | None:
        return None  # dots(G_t, G_{t-1}) needs none

    def update_coeffs(
        self,
        decision: Decision,
        wd: float,
        alpha_prev: Scalar | None,
        device: torch.device,
        scales: GradScales | None = None,
    ) -> torch.Tensor:
        if scales is None:
            return coefficient_tensor([decision.accept, wd, decision.alpha, decision.back], device)
        step = decision.alpha * scales.inv  # G_t carries s_t, G_{t-1} carries s_{t-1}
        back = decision.back * scales.inv_prev
        return coefficient_tensor([decision.accept, wd, step, back], device)

    @staticmethod
    def unscale(partial: torch.Tensor, scales: GradScales | None) -> torch.Tensor:
        """[<G,G> / s_t^2, <G_prev,G> / (s_{t-1} s_t)] (:mod:`elra_fused.amp`)."""
        if scales is None:
            return partial
        factors = torch.stack([scales.inv * scales.inv, scales.inv * scales.inv_prev])
        return partial * factors.to(partial.device)

    def synchronize(self) -> None:
        """Nothing in flight: the tensors are always current."""


def _over_step(value: Scalar, alpha_prev: Scalar) -> Scalar:
    """``value / alpha_{t-1}``, and 0 where the last step was 0 long (taken at lr = 0, as
    a warm-up schedule starts): x_t - wd x_{t-1} is then 0 and holds nothing of G_{t-1},
    so the point stores recover G_{t-1} = 0 (the dot is 0, as after a parameter without
    gradient) and a retrace has no line to move back along. A float for the host law, a
    0-d tensor for the device law (no host read)."""
    if isinstance(alpha_prev, torch.Tensor):
        return torch.where(alpha_prev > 0, value / alpha_prev, 0.0)
    return value / alpha_prev if alpha_prev > 0 else 0.0


class PointCoefficients:
    """Coefficients of the stores that keep x_{t-1} (memory "recover" / "offload").

    dots: ``[wd, 1 / alpha_{t-1}]`` to recover G_{t-1} = (wd x_{t-1} - x_t) / alpha_{t-1}
    per element. update: a retrace steps along (wd x_{t-1} - x_t) = alpha_{t-1} G_{t-1},
    so its back coefficient is (alpha_{t-1} - alpha_t) / alpha_{t-1}. (alpha_{t-1} is the
    step taken, lr alpha; after a step of 0 both are 0: :func:`_over_step`.)

    The recovered G_{t-1} is only as exact as x_t: writing x_t rounded each element by up
    to u |x_t,i| (u: the unit roundoff of x's dtype), so the recovered <G_{t-1}, G_t> is off
    by at most sum_i u |x_t,i| |G_t,i| / alpha_{t-1} <= u ||x_t|| ||G_t|| / alpha_{t-1}.
    The worst case is real: a step below half an ulp of x_i is rounded away entirely, so
    at small steps the recovered dot is biased towards 0, not merely noisy. Relative to
    ||G_{t-1}|| ||G_t|| the bound is u ||x_t|| / ||x_t - x_{t-1}||: small while the steps
    are large against x's resolution, above 1 once they shrink to it.
    :meth:`with_error_bound` appends it (times 2, for the decay's and the retrace's own
    roundings) to the dots; the control runner trusts the dot only as far as the bound
    allows (:func:`elra_fused.control_runner.trusted_dot`).
    """

    state_key = X_PREV_KEY
    coeff_kind = "point"
    needs_alpha_prev = True

    def dots_coeffs(self, wd: float, alpha_prev: Scalar, device: torch.device) -> torch.Tensor:
        return coefficient_tensor([wd, _over_step(1.0, alpha_prev)], device)

    def update_coeffs(
        self,
        decision: Decision,
        wd: float,
        alpha_prev: Scalar,
        device: torch.device,
        scales: GradScales | None = None,
    ) -> torch.Tensor:
        back = _over_step(decision.back, alpha_prev)
        step = decision.alpha if scales is None else decision.alpha * scales.inv
        return coefficient_tensor([decision.accept, wd, step, back], device)

    @staticmethod
    def unscale(partial: torch.Tensor, scales: GradScales | None) -> torch.Tensor:
        """The dots (and the bound, ~||G_t||) of a G_t scaled by s_t; the recovered
        G_{t-1} is unscaled (:mod:`elra_fused.amp`)."""
        if scales is None:
            return partial
        inv = scales.inv
        return partial * torch.stack([inv * inv, inv, inv]).to(partial.device)

    @staticmethod
    def with_error_bound(
        partial: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        """``[<G,G>, <G_prev,G>, bound]``: the dots and the bound of the recovered dot's
        error, 2 u ||x_t|| ||G_t|| / alpha_{t-1} (class docstring), on the device.

        ||x_t|| is one more read of x, accumulated in fp32 (on the CPU a float64 norm is
        ~30x slower; an overflow to inf only makes the bound distrust the dot).
        """
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        x_norm = torch.linalg.vector_norm(x, dtype=wide).to(torch.float64)
        eps = torch.finfo(x.dtype).eps  # 2 u
        bound = eps * x_norm * partial[0].sqrt() * coeffs[1].to(partial.device)
        return torch.cat([partial, bound.reshape(1)])

    def synchronize(self) -> None:
        """Nothing in flight: the tensor is always current."""


class GradPrevStore(GradCoefficients):
    """G_{t-1} of one flat buffer, on the parameters' device (``memory="standard"``)."""

    def __init__(self, grad_prev: torch.Tensor) -> None:
        self.tensor = grad_prev

    def dots(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: None
    ) -> torch.Tensor:
        return kernels.dots(grad, self.tensor)

    def update_(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        kernels.update_(x, grad, self.tensor, coeffs)


class PointPrevStore(PointCoefficients):
    """x_{t-1} of one flat buffer, on the parameters' device (``memory="recover"``)."""

    def __init__(self, x_prev: torch.Tensor) -> None:
        self.tensor = x_prev

    def dots(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        return self.with_error_bound(kernels.dots_recover(self.tensor, x, grad, coeffs), x, coeffs)

    def update_(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        kernels.update_recover_(x, grad, self.tensor, coeffs)


def keeps_by_reference(grad: torch.Tensor, grad_prev: torch.Tensor) -> bool:
    """Whether G_t can become G_{t-1} by reference (else it is copied into G_{t-1}): not
    with a compact state (another dtype), nor for a gradient that is a view into a shared
    buffer (DDP's gradient_as_bucket_view), which the next backward rewrites in place."""
    return grad_prev.dtype == grad.dtype and grad._base is None


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
        #: The optimizer's state entry of each parameter (replaced by load_state_dict,
        #: which hands the new ones over through :meth:`FlatLayout.load_state`).
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


def _storage_vector(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor's storage block as one contiguous vector (its elements in memory
    order; no copy)."""
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


class GradPrevList(GradCoefficients):
    """G_{t-1} of each parameter of one (device, wd) segment of the per-parameter layout.

    Built anew each step by :class:`elra_fused.list_layout.ListLayout` (:meth:`add` per
    parameter with a gradient): ``xs`` and ``grads`` are the parameters' own tensors
    (autograd's gradients: nothing is zero-filled or copied into a buffer). Two ways to
    keep G_{t-1}:

    * by reference (G_{t-1} has the parameters' dtype and every gradient owns its memory):
      after an accept the gradient tensor G_t itself becomes G_{t-1}
      (``update_swap_list_``: the pass reads x and G and writes only x); a retrace copies
      G_{t-1} into it first, so the new reference again holds G_{t-1}. The state entries
      are re-pointed and each tensor's version counter is recorded in ``versions`` (the
      layout's, keyed by parameter): an in-place change of that tensor before the next
      step (``zero_grad(set_to_none=False)`` elsewhere, gradients accumulated across
      steps) is detected instead of silently corrupting G_{t-1}. While a CUDA graph is
      captured the copying pass is used (a replay cannot re-point Python references).
    * by copy (a compact ``state_dtype``, or gradients that are views into another
      buffer, e.g. DDP's ``gradient_as_bucket_view=True``, which the next backward
      rewrites in place): ``update_list_`` writes G_t into the state (whose versions are
      recorded the same way).
    """

    __slots__ = (
        "xs",
        "grads",
        "prevs",
        "params",
        "grad_tensors",
        "param_states",
        "by_reference",
        "versions",
        "retired",
    )

    def __init__(self, versions: dict[torch.Tensor, int]) -> None:
        #: What the kernels take: the tensors themselves, or for a dense non-contiguous
        #: parameter (channels_last) 1-D views of their storage blocks, which hold the
        #: three tensors' elements in the same order (the layout checked the strides).
        self.xs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.prevs: list[torch.Tensor] = []
        #: The parameters and gradients themselves (state entries and version keys).
        self.params: list[torch.Tensor] = []
        self.grad_tensors: list[torch.Tensor] = []
        self.param_states: list[dict[str, Any]] = []
        self.by_reference = True
        self.versions = versions
        #: The G_{t-1} tensors this step replaced (released by the layout's zero_grad).
        self.retired: list[torch.Tensor] = []

    @classmethod
    def of_plain(
        cls,
        versions: dict[torch.Tensor, int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        prevs: list[torch.Tensor],
        states: list[dict[str, Any]],
        local: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> GradPrevList:
        """The store of plain parameters, all checked at once by the layout (contiguous:
        the kernels take the tensors themselves); as :meth:`add` per parameter would
        build it. Sharded parameters (DTensors) come with ``local``: the local shards of
        ``params``, ``grads`` and ``prevs``, which the kernels step in place."""
        store = cls(versions)
        store.params, store.grad_tensors, store.param_states = params, grads, states
        store.by_reference = all(map(keeps_by_reference, grads, prevs))
        if local is None:
            store.xs, store.grads, store.prevs = list(params), list(grads), prevs
        else:
            store.xs, store.grads, store.prevs = local
        return store

    def add(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        grad_prev: torch.Tensor,
        state: dict[str, Any],
        sharded: bool,
        contiguous: bool,
    ) -> None:
        """One parameter ``x`` with its gradient and G_{t-1}, checked by the layout;
        ``sharded``: ``x`` is a DTensor, ``contiguous``: ``x.is_contiguous()``."""
        self.params.append(x)
        self.grad_tensors.append(grad)
        if not keeps_by_reference(grad, grad_prev):
            self.by_reference = False
        if sharded:  # the kernels step the local shards in place
            x, grad, grad_prev = (local_shard(t) for t in (x, grad, grad_prev))
            contiguous = x.is_contiguous()
        if not contiguous:
            x, grad, grad_prev = (_storage_vector(t) for t in (x, grad, grad_prev))
        self.xs.append(x)
        self.grads.append(grad)
        self.prevs.append(grad_prev)
        self.param_states.append(state)

    def dots(
        self, kernels: KernelSet, x: list[torch.Tensor], grad: list[torch.Tensor], coeffs: None
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
        if not self.by_reference or _capturing(x[0].device):
            kernels.update_list_(x, grad, self.prevs, coeffs)
            for param, grad_prev in zip(self.params, self.prevs, strict=True):
                versions[param] = grad_prev._version  # a view shares its base's counter
            return
        kernels.update_swap_list_(x, grad, self.prevs, coeffs)
        for param, state, grad_now in zip(
            self.params, self.param_states, self.grad_tensors, strict=True
        ):
            state[GRAD_PREV_KEY] = grad_now
            versions[param] = grad_now._version
        # The replaced G_{t-1} tensors stay alive until the optimizer lets them go (in
        # zero_grad, where torch's optimizers free gradients): releasing large tensors
        # costs time (the allocator returns the pages), which belongs to zero_grad.
        self.retired, self.prevs = self.prevs, list(grad)
