"""The flat layout (``flat=True``; the default on CUDA, needed for
``memory="recover"/"offload"`` and ``reuse_grad_buffer``): parameters and gradients are
views into one buffer per (group, device, dtype) (:mod:`elra_fused.flat`), so each pass is
one kernel launch per buffer and every tensor keeps its address (what CUDA-graph capture
needs); the price on the host: ``zero_grad`` fills the buffer and backward adds each
gradient into it. How a parameter without gradient is stepped (saved before the step,
restored by :meth:`FlatLayout.finish`) and the point modes' x_{t-1} fix-up are described
in :mod:`elra_fused.layouts`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import checks, control
from .core import OptimizerState, ParamGroups, Segment, StepWork, decision_tensors
from .flat import FlatBuffer, build_flat_buffers
from .memory import GradPrevStore, PointPrevStore, PrevStore, SwapGradPrevStore
from .offload import OffloadedPrev, check_not_capturing


class _Unused(NamedTuple):
    """A flat parameter without gradient in a step of a decaying group: its view ``x``,
    its value before the step, its gradient view, its x_{t-1} view (point modes, else
    None) with the store that holds it, and the group's wd."""

    x: torch.Tensor
    saved: torch.Tensor
    grad: torch.Tensor
    prev: torch.Tensor | None
    store: PrevStore
    wd: float


class _FlatWork(StepWork):
    """A flat step's work: the parameters without gradient are :class:`_Unused`."""

    __slots__ = ("unused",)

    def __init__(self) -> None:
        super().__init__()
        self.unused: list[_Unused] = []


class FlatLayout:
    """Flat buffers per (group, device, dtype), each with one previous-step store."""

    is_flat = True

    def __init__(
        self,
        memory: str,
        state_dtype: torch.dtype | None,
        offload_chunk: int,
        reuse_grad_buffer: bool,
    ) -> None:
        self.memory = memory
        self.state_dtype = state_dtype
        self.offload_chunk = offload_chunk
        self.reuse_grad_buffer = reuse_grad_buffer
        self.buffers: list[FlatBuffer] = []
        self.stores: list[PrevStore] = []
        #: (group index, index in the group, parameter) of each parameter left out of the
        #: buffers because it was frozen; one that becomes trainable joins at the next step.
        self.frozen: list[tuple[int, int, torch.Tensor]] = []

    def add_group(self, group_index: int, group: dict[str, Any], state: OptimizerState) -> None:
        """Move the group's trainable parameters into flat buffers, one store each."""
        self._add_buffers(
            build_flat_buffers([group], checks.describe, group_offset=group_index),
            state,
            group["wd"],
        )
        self.frozen.extend(
            (group_index, index, param)
            for index, param in enumerate(group["params"])
            if not param.requires_grad
        )

    def _add_buffers(self, buffers: list[FlatBuffer], state: OptimizerState, wd: float) -> None:
        """Make every buffer's store first (what allocates), then register buffers, stores
        and state entries: a failure while allocating leaves the layout as it was (the
        parameters keep their values in the new buffers, and a retry builds anew)."""
        stores = []
        for buffer in buffers:
            store = self._make_store(buffer, state)
            if self.memory != "standard" and wd != 1.0:
                # x_{t-1} = x / wd: the recovered G_{t-1} of a parameter without gradient
                # so far is then 0 (x_{t-1} = x would read as the decay, (wd - 1) x / alpha:
                # a parameter unfrozen mid-run would join with a large false G_{t-1}).
                store.tensor.copy_(_x_prev_without_gradient(buffer.data, wd, store.tensor.dtype))
            stores.append(store)
        for buffer, store in zip(buffers, stores, strict=True):
            for index, param in enumerate(buffer.params):
                state[param][store.state_key] = buffer.view(store.tensor, index)
            if wd != 1.0:  # grad None and G = 0 differ only by the decay (module docstring)
                buffer.track_touched(assume_touched=False)  # as built: .grad None or not
        self.buffers.extend(buffers)
        self.stores.extend(stores)

    def _adopt_unfrozen(self, param_groups: ParamGroups, state: OptimizerState) -> None:
        """Parameters unfrozen since the optimizer was built (``requires_grad_(True)``,
        e.g. a backbone unfrozen mid fine-tuning) move into new flat buffers of their
        group, with a fresh previous-step store (G_{t-1} = 0, or x_{t-1} = x / wd: as a
        parameter that had no gradient so far)."""
        unfrozen = [entry for entry in self.frozen if entry[2].requires_grad]
        for group_index in sorted({entry[0] for entry in unfrozen}):
            members = [(index, param) for g, index, param in unfrozen if g == group_index]
            buffers = build_flat_buffers(
                [{"params": [param for _, param in members]}],
                lambda g, i, param, members=members: checks.describe(g, members[i][0], param),
                group_offset=group_index,
            )
            self._add_buffers(buffers, state, param_groups[group_index]["wd"])
            # Out of the frozen list once adopted: a failure above leaves them there, and
            # the next step adopts them again (not a parameter that is never trained).
            adopted = {id(param) for _, param in members}
            self.frozen = [entry for entry in self.frozen if id(entry[2]) not in adopted]

    def _make_store(self, buffer: FlatBuffer, state: OptimizerState) -> PrevStore:
        if self.memory == "recover":
            # x_{t-1} starts as x_0: finite, and ignored by the first step anyway.
            return PointPrevStore(buffer.data.detach().clone())
        if self.memory == "offload":
            return OffloadedPrev(buffer.data, self.offload_chunk)
        dtype = self.state_dtype or buffer.data.dtype
        grad_prev = torch.zeros_like(buffer.data, dtype=dtype)
        if self.reuse_grad_buffer and dtype == buffer.data.dtype:
            return SwapGradPrevStore(buffer, grad_prev, [state[p] for p in buffer.params])
        return GradPrevStore(grad_prev)  # a compact G_{t-1} cannot trade places with G

    def gather(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork:
        """One segment per flat buffer; grad-less parameters keep their value.

        Where the group decays (wd != 1) each parameter without gradient (``.grad`` None,
        or a view backward did not reach since ``zero_grad(set_to_none=True)``:
        :meth:`FlatBuffer.gather_grads`) is saved for :meth:`finish`. With wd == 1 the
        kernels' G = 0 step is already exactly the skip (x - alpha * 0 = x, and
        G_{t-1} / x_{t-1} become what the skip leaves), so nothing is tracked there.
        """
        if self.memory == "offload" and self.buffers:  # refused before anything moves
            check_not_capturing(self.buffers[0].data.device)
        for buffer in self.buffers:  # every moved parameter fails before the layout changes
            buffer.check()
        if self.frozen and any(param.requires_grad for _, _, param in self.frozen):
            self._adopt_unfrozen(param_groups, state)
        work = _FlatWork()
        point = self.memory != "standard"
        for buffer, store in zip(self.buffers, self.stores, strict=True):
            wd = param_groups[buffer.group_index]["wd"]
            if wd != 1.0 and not buffer.tracking:
                buffer.track_touched(assume_touched=True)  # wd set != 1 after construction
            missing = buffer.gather_grads()
            if missing and wd != 1.0:
                for index in missing:
                    view = buffer.view(buffer.data, index)
                    work.unused.append(
                        _Unused(
                            view,
                            view.detach().clone(),
                            buffer.view(buffer.grad, index),
                            buffer.view(store.tensor, index) if point else None,
                            store,
                            wd,
                        )
                    )
            work.segments.append(Segment(buffer.data, buffer.grad, store, wd, buffer.data.device))
        return work

    def finish(self, work: StepWork, decision: control.Decision) -> None:
        """On an accept, a parameter without gradient gets back the value the decay took
        (``x <- wd x - alpha * 0``): it keeps its bits, as in the per-parameter layout. A
        point mode then also sets its x_{t-1} to x / wd (rounded once), so that the
        recovered G_{t-1} = (wd x_{t-1} - x) / alpha is zero up to that rounding, not the
        decay. A view that turns out to hold a gradient written by hand (not zero) is an
        ordinary step. Decided on the device: no host read, except for
        ``memory="offload"``, whose x_{t-1} lives on the host (one wait for its copies).
        A retrace needs nothing: G = 0 leaves it exactly as the skip does."""
        unused = getattr(work, "unused", None)
        if not unused:
            return
        accepted = decision_tensors(decision).accept > 0
        with torch.no_grad():
            for entry in unused:
                keep = accepted.to(entry.x.device) & ~entry.grad.any()
                entry.x.copy_(torch.where(keep, entry.saved, entry.x))
                if entry.prev is None:
                    continue
                # The kernel left x_{t-1} = x_t (the saved value) on an accept.
                prev = entry.prev
                entry.store.synchronize()  # offload: the host copy may still be in flight
                lifted = _x_prev_without_gradient(entry.saved, entry.wd, prev.dtype)
                keep = keep.to(prev.device)
                prev.copy_(torch.where(keep, lifted.to(prev.device), prev))

    def zero_grad(self, param_groups: ParamGroups, set_to_none: bool) -> None:
        """One fill per gradient buffer; the ``.grad`` views stay (a None gradient would
        make autograd allocate a new tensor outside the buffer, which then has to be
        copied in). ``set_to_none`` (the default) keeps its meaning all the same: a
        parameter that backward then does not reach counts as having no gradient (kept,
        not decayed), one that it reaches with zeros as G = 0 (decayed), exactly as with
        ``.grad = None``; where wd == 1 the two are the same step and nothing is tracked."""
        for buffer in self.buffers:
            buffer.zero_grad(set_to_none)

    def load_state(self, state: OptimizerState, param_groups: ParamGroups) -> None:
        """torch rebuilt the per-parameter state as new tensors: copy the values back into
        the stores' flat buffers and restore the views."""
        for buffer, store in zip(self.buffers, self.stores, strict=True):
            store.synchronize()
            for index, param in enumerate(buffer.params):
                view = buffer.view(store.tensor, index)
                loaded = state[param].get(store.state_key)
                if loaded is not None:
                    view.copy_(loaded)
                elif isinstance(store, GradPrevStore):
                    view.zero_()  # never had a gradient: G_{t-1} = 0
                else:  # x_{t-1} = x_t / wd: the recovered G_{t-1} is 0 (as _add_buffers)
                    wd = param_groups[buffer.group_index]["wd"]
                    view.copy_(_x_prev_without_gradient(param, wd, view.dtype))
                state[param][store.state_key] = view
            if isinstance(store, SwapGradPrevStore):
                # The loader replaced the state entries the store re-points each step.
                store.param_states = [state[p] for p in buffer.params]

    def synchronize(self) -> None:
        """Offload: copies to the host may be in flight."""
        for store in self.stores:
            store.synchronize()


def _x_prev_without_gradient(x: torch.Tensor, wd: float, dtype: torch.dtype) -> torch.Tensor:
    """The x_{t-1} a point store keeps for a parameter that had no gradient: x / wd,
    rounded once (from float64), so that the recovered G_{t-1} = (wd x_{t-1} - x) / alpha
    is 0 up to that rounding (module docstring of :mod:`elra_fused.layouts`)."""
    return (x.detach().double() / wd).to(dtype)
