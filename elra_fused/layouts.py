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

from typing import Any, NamedTuple, Protocol

import torch

from . import _torch_compat, checks, control
from .core import Segment
from .flat import FlatBuffer, build_flat_buffers
from .memory import (
    GRAD_PREV_KEY,
    GradPrevList,
    GradPrevStore,
    PointPrevStore,
    PrevStore,
    SwapGradPrevStore,
)
from .offload import OffloadedPrev, check_not_capturing
from .ops import backends
from .sharding import replicas

ParamGroups = list[dict[str, Any]]
OptimizerState = dict[torch.Tensor, dict[str, Any]]


class StepWork:
    """What one step works on: the segments and the parameters that had no gradient
    (``skipped``: what the layout's ``finish`` needs to fix them up)."""

    __slots__ = ("segments", "skipped")

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.skipped: list[tuple[torch.Tensor, torch.Tensor]] = []


class Layout(Protocol):
    """What the optimizer needs of a layout (both kinds below implement it)."""

    is_flat: bool

    def add_group(self, group_index: int, group: dict[str, Any], state: OptimizerState) -> None: ...

    def gather(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork: ...

    def finish(self, work: StepWork, decision: control.Decision) -> None: ...

    def zero_grad(self, param_groups: ParamGroups, set_to_none: bool) -> None: ...

    def load_state(self, state: OptimizerState) -> None: ...

    def synchronize(self) -> None: ...


def _as_tensors(decision: control.Decision) -> control.Decision:
    """The decision as 0-d float64 tensors (a host law gives floats)."""
    return control.Decision(*(torch.as_tensor(v, dtype=torch.float64) for v in decision))


def _same_order(tensor: torch.Tensor, param: torch.Tensor, param_contiguous: bool) -> bool:
    """Whether ``tensor`` holds its elements in ``param``'s memory order (both dense, same
    shape; ``param_contiguous`` is ``param.is_contiguous()``). For a contiguous parameter
    that is ``tensor.is_contiguous()``: equal strides imply it, and contiguous tensors of
    one shape hold their elements in the same order (strides of size-1 dims aside)."""
    if param_contiguous:
        return tensor.is_contiguous()
    return tensor.stride() == param.stride()


def _storage_ptr(tensor: torch.Tensor, sharded: bool) -> int:
    """The address of ``tensor``'s first element (a DTensor's: of its local shard)."""
    return (_torch_compat.local_shard(tensor) if sharded else tensor).data_ptr()


#: Types the one-call check takes for a parameter, its gradient and its G_{t-1}
#: (:meth:`ListLayout._gather_plain`; None: no gradient or no G_{t-1} yet).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, type(None))
#: The kinds plain_list_step gives a parameter (csrc/layout_checks.h, kPlain*): stepped,
#: or skipped (a G_{t-1} but no gradient now); 0 is frozen.
_STEPPED, _SKIPPED = 1, 2


def _local_shards(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    prevs: list[torch.Tensor | None],
    recorded: list[int],
    dtensor: type,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]] | None:
    """The local shards of a sharded model's parameters, gradients and G_{t-1} (None where
    a tensor is None) for the one-call check; None where the full loop must run: a
    gradient or G_{t-1} that is not a DTensor, a local shard that is a subclass itself,
    or a G_{t-1} changed since the last step. That last check is made here, on the
    DTensors: their version counters are the ones the layout records (an in-place op on a
    DTensor bumps its own counter), not the local shards'.

    Read as :func:`~elra_fused._torch_compat.local_shard` reads them, in bulk (this runs
    over every parameter per step); a torch whose DTensor lacks ``_local_tensor`` takes
    the loop, which falls back to ``to_local()``."""
    if not {type(t) for t in (*grads, *prevs)}.issubset((dtensor, type(None))):
        return None
    for prev, version in zip(prevs, recorded, strict=True):
        if version >= 0 and prev is not None and prev._version != version:
            return None
    try:
        local_params = [param._local_tensor for param in params]
        local_grads = [None if grad is None else grad._local_tensor for grad in grads]
        local_prevs = [None if prev is None else prev._local_tensor for prev in prevs]
    except AttributeError:
        return None
    if not {type(t) for t in (*local_params, *local_grads, *local_prevs)}.issubset(_PLAIN_TYPES):
        return None
    return local_params, local_grads, local_prevs


class ListLayout:
    """Per-parameter tensor lists; G_{t-1} kept by reference where it can be."""

    is_flat = False

    def __init__(
        self, state_dtype: torch.dtype | None, backend: str, supported: tuple[torch.dtype, ...]
    ) -> None:
        self.state_dtype = state_dtype
        self.backend = backend
        #: Storage dtypes the kernels take (None: the reference takes any float dtype).
        self.supported = supported if backend != "reference" else None
        #: The version counter of each G_{t-1} tensor when the last step left it, to
        #: detect an in-place change of a gradient kept by reference.
        self.prev_versions: dict[torch.Tensor, int] = {}
        #: The G_{t-1} tensors the last step replaced, released by zero_grad.
        self.retired: list[torch.Tensor] = []

    def add_group(self, group_index: int, group: dict[str, Any], state: OptimizerState) -> None:
        """G_{t-1} = 0 for each trainable parameter (exact for the first <G_{t-1}, G_t>),
        laid out like it. Each step gathers the parameters' own tensors; the first accept
        replaces these by the gradients themselves. Built now rather than at the first
        step so that the state exists before any step, as torch.distributed.checkpoint
        expects of an optimizer (it would otherwise call ``step()`` to make it)."""
        checks.check_state_dtype(group_index, group["params"], self.state_dtype)
        for param in group["params"]:
            if param.requires_grad and GRAD_PREV_KEY not in state[param]:
                state[param][GRAD_PREV_KEY] = torch.zeros_like(
                    param, dtype=self.state_dtype or param.dtype
                )

    def gather(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork:
        """One segment per (device, wd, replicas: :mod:`elra_fused.sharding`); grad-less
        parameters are skipped. Sharded (DTensor) parameters step their local shards
        (:class:`~elra_fused.memory.GradPrevList`). Everything is
        checked before the first kernel runs; error messages are only formatted when
        raised (this loop runs over every parameter per step). The common case -- every
        parameter plain -- is recognised in one call first (:meth:`_gather_plain`)."""
        work = self._gather_plain(param_groups, state)
        if work is not None:
            return work
        work = StepWork()
        segments: dict[tuple[torch.device, float, int], GradPrevList] = {}
        # Hoisted: this loop runs over every parameter per step; at ~300 small tensors it
        # is most of a step's host time. Each check below costs one or two C calls in the
        # common case (a contiguous parameter with autograd's own gradient).
        versions = self.prev_versions
        strided = torch.strided
        supported = self.supported
        state_dtype = self.state_dtype
        dtensor_class = _torch_compat.dtensor_class()
        for group_index, group in enumerate(param_groups):
            wd = group["wd"]
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                param_state = state[param]
                grad_prev = param_state.get(GRAD_PREV_KEY)
                if grad_prev is not None:
                    recorded = versions.get(param)
                    if recorded is not None and grad_prev._version != recorded:
                        name = checks.describe(group_index, param_index, param)
                        raise checks.grad_prev_changed(name)
                if grad is None:
                    if grad_prev is not None:
                        work.skipped.append((param, grad_prev))
                    continue
                device = param.device
                dtype = param.dtype
                if (
                    grad.layout != strided
                    or grad.is_complex()
                    or grad.shape != param.shape
                    or grad.device != device
                    or (supported is not None and dtype not in supported)
                ):
                    name = checks.describe(group_index, param_index, param)
                    checks.reject_list_grad(name, param, self.backend)
                contiguous = param.is_contiguous()
                if not contiguous and not checks.is_dense(param):
                    name = checks.describe(group_index, param_index, param)
                    raise checks.not_dense(name, param)
                sharded = dtensor_class is not None and isinstance(param, dtensor_class)
                if (
                    grad.dtype != dtype
                    or not _same_order(grad, param, contiguous)
                    or (
                        grad_prev is not None
                        and _storage_ptr(grad, sharded) == _storage_ptr(grad_prev, sharded)
                    )
                ):
                    # Rare: a gradient assigned by hand, or a second step without backward
                    # (the gradient is still last step's tensor, now G_{t-1}). One copy
                    # in the parameter's dtype and strides keeps it apart. (Autograd's own
                    # gradients follow the parameter's strides, channels_last included.)
                    grad = torch.empty_like(param).copy_(grad)
                    param.grad = grad
                if grad_prev is not None and grad_prev.numel() != param.numel():
                    name = checks.describe(group_index, param_index, param)
                    raise checks.param_reshaped(name, param, grad_prev)
                if (
                    grad_prev is None
                    or not _same_order(grad_prev, param, contiguous)
                    or grad_prev.device != device
                    or (grad_prev.dtype != dtype and grad_prev.dtype != state_dtype)
                ):
                    # A parameter seen for the first time had no gradient before: its
                    # previous gradient is zero, which is exact for <G_{t-1}, G_t>. A
                    # loaded G_{t-1}, or one kept from before the model was cast or
                    # moved, is laid out like its parameter (the kernels read the three
                    # tensors' storage as vectors of the same order).
                    fresh = torch.empty_like(param, dtype=state_dtype or dtype)
                    if grad_prev is None:
                        grad_prev = fresh.zero_()
                    else:
                        grad_prev = fresh.copy_(grad_prev)
                    param_state[GRAD_PREV_KEY] = grad_prev
                key = (device, wd, replicas(param) if sharded else 1)
                store = segments.get(key)
                if store is None:
                    store = segments[key] = GradPrevList(versions)
                store.add(param, grad, grad_prev, param_state, sharded, contiguous)
        for (device, wd, copies), store in segments.items():
            work.segments.append(Segment(store.xs, store.grads, store, wd, device, 1.0 / copies))
        return work

    def _gather_plain(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork | None:
        """:meth:`gather`'s result when every parameter is plain, else None (then the full
        loop runs and does what a parameter needs, errors included).

        Plain: a G_{t-1} unchanged since the last step, and either no gradient
        (frozen, or skipped: listed for :meth:`finish`) or -- on the first parameter's
        device, contiguous -- a gradient the loop would take as it is (the parameter's
        dtype, shape and memory order, not last step's G_{t-1} itself) with a G_{t-1} it
        would keep (laid out like the parameter, in its dtype or state_dtype).
        ``elra_fused._C.plain_list_step`` checks all of it in one call
        (csrc/layout_checks.cpp); without the extension the full loop always runs. A
        model sharded throughout (every parameter a DTensor, as FSDP2 leaves it) is
        checked on its local shards (:func:`_local_shards`). The segments are the loop's:
        one per (wd, replicas), in order of first appearance.
        """
        check = getattr(backends._C, "plain_list_step", None)
        if check is None:
            return None
        params = [param for group in param_groups for param in group["params"]]
        if not params:
            return None
        # Tensor subclasses (wrappers that answer shape or layout in Python) go through
        # the loop, which sees them as Python does. A model sharded throughout (FSDP2:
        # every parameter a DTensor) is checked on its local shards. Parameters first: a
        # model of any other kind declines before any state lookup.
        kinds_of_params = set(map(type, params))
        dtensor = _torch_compat.dtensor_class()
        sharded = dtensor is not None and kinds_of_params == {dtensor}
        if not sharded and not kinds_of_params.issubset(_PLAIN_TYPES):
            return None
        states = [state[param] for param in params]
        grads = [param.grad for param in params]
        prevs = [param_state.get(GRAD_PREV_KEY) for param_state in states]
        versions = self.prev_versions
        recorded = [versions.get(param, -1) for param in params]
        if sharded:
            checked = _local_shards(params, grads, prevs, recorded, dtensor)
            if checked is None:
                return None
            local_params, local_grads, local_prevs = checked
            recorded = [-1] * len(params)  # compared on the DTensors by _local_shards
        else:
            if any(type(t) not in _PLAIN_TYPES for t in (*grads, *prevs)):
                return None
            local_params, local_grads, local_prevs = params, grads, prevs
        any_dtype = self.supported is None
        supported = [] if any_dtype else list(self.supported)
        first_not_plain, kinds = check(
            local_params,
            local_grads,
            local_prevs,
            recorded,
            self.state_dtype,
            supported,
            any_dtype,
        )
        if first_not_plain >= 0:
            return None
        work = StepWork()
        # Segments in the order the loop creates them: a (wd, replicas) enters when its
        # first parameter with a gradient does (a frozen or empty group creates none).
        rows: dict[tuple[float, int], list[int]] = {}
        copies_of: dict[Any, int] = {}  # replicas by (mesh, placements): few distinct
        start = 0
        for group in param_groups:
            end = start + len(group["params"])
            for i in range(start, end):
                if kinds[i] != _STEPPED:
                    continue
                copies = 1
                if sharded:
                    key = (id(params[i].device_mesh), params[i].placements)
                    copies = copies_of.get(key)
                    if copies is None:
                        copies = copies_of[key] = replicas(params[i])
                rows.setdefault((group["wd"], copies), []).append(i)
            start = end
        work.skipped = [(params[i], prevs[i]) for i, kind in enumerate(kinds) if kind == _SKIPPED]
        device = local_params[0].device
        for (wd, copies), indices in rows.items():
            store = GradPrevList.of_plain(
                versions,
                [params[i] for i in indices],
                [grads[i] for i in indices],
                [prevs[i] for i in indices],
                [states[i] for i in indices],
                [
                    [local_params[i] for i in indices],
                    [local_grads[i] for i in indices],
                    [local_prevs[i] for i in indices],
                ]
                if sharded
                else None,
            )
            work.segments.append(Segment(store.xs, store.grads, store, wd, device, 1.0 / copies))
        return work

    def finish(self, work: StepWork, decision: control.Decision) -> None:
        """Parameters without gradient: their G_t is zero. An accept leaves x alone (no
        decay) and the stored G_{t-1} becomes 0; a retrace still undoes their last step.
        Then record what the next step checks and what zero_grad releases."""
        if work.skipped:
            decision = _as_tensors(decision)
            keep = 1.0 - decision.accept
            with torch.no_grad():  # also when called outside ELRA.step (the tests' oracle)
                for param, grad_prev in work.skipped:
                    back = (keep * decision.back).to(param.device, grad_prev.dtype)
                    param.add_(grad_prev * back)
                    grad_prev.mul_(keep.to(grad_prev.device, grad_prev.dtype))
                    self.prev_versions[param] = grad_prev._version
        self.retired = [t for seg in work.segments for t in seg.store.retired]

    def zero_grad(self, param_groups: ParamGroups, set_to_none: bool) -> None:
        """``set_to_none=False`` gives each parameter a new zero tensor instead of zeroing
        the old one in place: that one may be G_{t-1}."""
        self.retired.clear()
        for group in param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad = None if set_to_none else torch.zeros_like(param.grad)

    def load_state(self, state: OptimizerState) -> None:
        """torch cast the loaded state to each parameter's dtype (a compact G_{t-1} goes
        back to state_dtype) and may have kept the caller's tensors: the layout takes its
        own contiguous copies, whose versions it then starts tracking."""
        self.prev_versions.clear()
        self.retired.clear()
        for param_state in state.values():
            loaded = param_state.get(GRAD_PREV_KEY)
            if loaded is not None:
                param_state[GRAD_PREV_KEY] = loaded.to(
                    self.state_dtype or loaded.dtype,
                    memory_format=torch.contiguous_format,
                    copy=True,
                )

    def synchronize(self) -> None:
        """Nothing in flight."""


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
        checks.check_state_dtype(group_index, group["params"], self.state_dtype)
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
        self.buffers.extend(buffers)
        for buffer in buffers:
            store = self._make_store(buffer, state)
            self.stores.append(store)
            for index, param in enumerate(buffer.params):
                state[param][store.state_key] = buffer.view(store.tensor, index)
            if wd != 1.0:  # grad None and G = 0 differ only by the decay (module docstring)
                buffer.track_touched(assume_touched=False)  # as built: .grad None or not

    def _adopt_unfrozen(self, param_groups: ParamGroups, state: OptimizerState) -> None:
        """Parameters unfrozen since the optimizer was built (``requires_grad_(True)``,
        e.g. a backbone unfrozen mid fine-tuning) move into new flat buffers of their
        group, with a fresh previous-step store (G_{t-1} = 0, or x_{t-1} = x: as a
        parameter that had no gradient so far)."""
        unfrozen = [entry for entry in self.frozen if entry[2].requires_grad]
        self.frozen = [entry for entry in self.frozen if not entry[2].requires_grad]
        for group_index in sorted({entry[0] for entry in unfrozen}):
            members = [(index, param) for g, index, param in unfrozen if g == group_index]
            buffers = build_flat_buffers(
                [{"params": [param for _, param in members]}],
                lambda g, i, param, members=members: checks.describe(g, members[i][0], param),
                group_offset=group_index,
            )
            self._add_buffers(buffers, state, param_groups[group_index]["wd"])

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
        accepted = _as_tensors(decision).accept > 0
        with torch.no_grad():
            for entry in unused:
                keep = accepted.to(entry.x.device) & ~entry.grad.any()
                entry.x.copy_(torch.where(keep, entry.saved, entry.x))
                if entry.prev is None:
                    continue
                # The kernel left x_{t-1} = x_t (the saved value) on an accept.
                prev = entry.prev
                entry.store.synchronize()  # offload: the host copy may still be in flight
                lifted = (entry.saved.double() / entry.wd).to(prev.dtype)
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

    def load_state(self, state: OptimizerState) -> None:
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
                else:
                    view.copy_(param.detach())  # x_{t-1} = x_t: recovered G_{t-1} ~ 0
                state[param][store.state_key] = view
            if isinstance(store, SwapGradPrevStore):
                # The loader replaced the state entries the store re-points each step.
                store.param_states = [state[p] for p in buffer.params]

    def synchronize(self) -> None:
        """Offload: copies to the host may be in flight."""
        for store in self.stores:
            store.synchronize()


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
