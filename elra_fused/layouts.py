"""How the optimizer lays out its parameters for the kernels: flat buffers or tensor lists.

A layout owns everything that depends on where the tensors live: its set-up per param
group, gathering one step's :class:`~elra_fused.core.Segment` list (with the checks that
must pass before anything is written), the fix-ups after the step (``finish``),
``zero_grad``, loading a state dict into its stores, and its bookkeeping. The optimizer
holds one layout object and never asks which kind it is.

* :class:`ListLayout` (``flat=False``; the default except on CUDA): the passes take the
  parameters' own tensors and autograd's own gradients as tensor lists (one op call per
  pass). G_{t-1} is kept *by reference* (:class:`~elra_fused.memory.GradPrevList`): after
  an accept the gradient tensor itself becomes G_{t-1}, so the update pass reads x and G
  and writes only x, and backward writes each gradient once.
* :class:`FlatLayout` (``flat=True``; the default on CUDA, needed for
  ``memory="recover"/"offload"`` and ``reuse_grad_buffer``): parameters and gradients are
  views into one buffer per (group, device, dtype) (:mod:`elra_fused.flat`), so each pass
  is one kernel launch per buffer and every tensor keeps its address (what CUDA-graph
  capture needs). The price on the host: ``zero_grad`` fills the buffer and backward adds
  each gradient into it.

A parameter without a gradient in a step follows torch's rule in both layouts, every
memory mode and every way of zeroing: a gradient that is None after backward
(``set_to_none=True`` zeroing, then not reached by backward) means no step: an accept
leaves the value alone, bit for bit (no decay, as torch's AdamW skips it), and G_{t-1}
becomes 0; a retrace still undoes its last step. A gradient that exists and is zero
(``set_to_none=False``, or zero from backward) is an ordinary G = 0 step, decayed by wd.
With wd == 1 the two are the same step.

* :class:`ListLayout` sees None directly (``opt.zero_grad()`` sets it) and skips the
  parameter (:meth:`ListLayout.finish` does the retrace and G_{t-1} = 0).
* :class:`FlatLayout` keeps the ``.grad`` views through ``opt.zero_grad()``, so in groups
  with wd != 1 each buffer records which parameters backward reaches (one
  post-accumulate-grad hook per parameter, ~1-2 us each per backward on the CPU, none
  where wd == 1; :meth:`~elra_fused.flat.FlatBuffer.track_touched`). A parameter whose
  ``.grad`` is None or whose view backward did not reach since the last
  ``zero_grad(set_to_none=True)`` is saved before the step, the kernels run G = 0, and
  :meth:`FlatLayout.finish` restores its value on an accept (decided on the device; a
  view holding a non-zero gradient written by hand is stepped on instead).
* Point modes (``memory="recover"/"offload"``) keep x_{t-1}, from which G_{t-1} =
  (wd x_{t-1} - x_t) / alpha is recovered: after restoring x, finish sets x_{t-1} := x / wd
  (rounded once), so the recovered G_{t-1} is 0 up to that rounding (<= ~1 ulp of x over
  alpha per element, inside the error bound the point stores report for the dot), where
  the decay would have left (wd - 1) x / alpha. x keeps its bits on the accept; a retrace
  right after moves it by at most that rounding (the reference: not at all). Offload's
  x_{t-1} lives on the host: writing it waits for its copies (one host sync, only in
  steps with such a parameter).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from . import checks, control
from .core import OptimizerState, ParamGroups, StepWork
from .flat_layout import FlatLayout
from .list_layout import ListLayout

__all__ = ["FlatLayout", "Layout", "ListLayout", "StepWork", "default_flat"]


class Layout(Protocol):
    """What the optimizer needs of a layout (both kinds below implement it)."""

    is_flat: bool
    state_dtype: torch.dtype | None

    def add_group(self, group_index: int, group: dict[str, Any], state: OptimizerState) -> None: ...

    def gather(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork: ...

    def finish(self, work: StepWork, decision: control.Decision) -> None: ...

    def zero_grad(self, param_groups: ParamGroups, set_to_none: bool) -> None: ...

    def load_state(self, state: OptimizerState, param_groups: ParamGroups) -> None: ...

    def synchronize(self) -> None: ...


def default_flat(
    memory: str,
    reuse_grad_buffer: bool,
    backend: str,
    device: torch.device,
    params: list[torch.Tensor],
) -> bool:
    """flat=None: flat buffers for the point memory modes and reuse_grad_buffer (they need
    them), on CUDA (graph capture, one launch per pass) and for parameters that are views
    with gaps or overlaps (the per-parameter layout steps each one through its storage
    block); tensor lists otherwise."""
    if memory != "standard" or reuse_grad_buffer:
        return True
    if device.type == "cuda" and backend != "reference":
        return True
    return not all(checks.is_dense(p) for p in params)
